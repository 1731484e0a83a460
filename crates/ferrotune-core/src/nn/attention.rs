//! Self-attention (causal, or over the whole sequence) with partial rotary embeddings and grouped key/value
//! heads, as one CPU op with a hand-written backward pass.
//!
//! Composed of candle ops, the rotary embedding alone is a dozen ops on q and k, the key/value heads are copied
//! once per query head, and the scores, their softmax and its gradient are several (heads × S × S) tensors kept
//! until the backward pass ends. Here each key/value head and its query heads are one task: rotations are
//! applied row by row, the two products per head go through gemm, the softmax and its gradient are formed in place,
//! and only q, k and v are kept.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::dpbf16::SendPtr;
use super::frozen::gemm_f32_with;
use super::fused::{dot16, f32_slice};

/// Attention of q (B, S, H, hd) over k, v (B, S, KV, hd), all f32 on the CPU: the first `rot` channels of q and k
/// rotated by `cos`, `sin` (B, S, rot), scores scaled by `scale`, query head h reading key/value head h / (H / KV),
/// each query seeing the keys up to its own position (`causal`) or all of them. Returns (B, S, H·hd). None where
/// the op does not apply (another device or dtype).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if ![q, k, v, cos, sin].iter().all(|t| f32_cpu(t)) {
        return Ok(None);
    }
    let (b, s, h, hd) = q.dims4()?;
    let (_, _, kv, _) = k.dims4()?;
    let rot = cos.dim(2)?;
    if kv == 0 || h % kv != 0 || rot > hd || rot % 2 != 0 || cos.dims3()? != (b, s, rot) {
        return Ok(None);
    }
    let vec = |t: &Tensor| t.contiguous()?.flatten_all()?.to_vec1::<f32>();
    let op = Attention { cos: vec(cos)?, sin: vec(sin)?, rot, scale: scale as f32, kv, causal };
    Ok(Some(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?))
}

struct Attention {
    /// (B, S, rot)
    cos: Vec<f32>,
    sin: Vec<f32>,
    rot: usize,
    scale: f32,
    kv: usize,
    causal: bool,
}

/// Dimensions of one call.
#[derive(Clone, Copy)]
struct Dims {
    s: usize,
    kv: usize,
    hd: usize,
}

impl Attention {
    /// Rows t of head `head` of sample `bi` from x (B, S, heads, hd), rotated (row-major S × hd).
    fn rotated(&self, x: &[f32], heads: usize, d: Dims, bi: usize, head: usize) -> Vec<f32> {
        let (s, hd, rot) = (d.s, d.hd, self.rot);
        let half = rot / 2;
        let mut out = vec![0f32; s * hd];
        for (t, o) in out.chunks_exact_mut(hd).enumerate() {
            let xr = &x[((bi * s + t) * heads + head) * hd..][..hd];
            let (c, sn) = (&self.cos[(bi * s + t) * rot..][..rot], &self.sin[(bi * s + t) * rot..][..rot]);
            for i in 0..half {
                o[i] = xr[i] * c[i] - xr[i + half] * sn[i];
                o[i + half] = xr[i + half] * c[i + half] + xr[i] * sn[i + half];
            }
            o[rot..].copy_from_slice(&xr[rot..]);
        }
        out
    }

    /// The gradient of [`Self::rotated`]'s input from that of its output (S × hd), added into row t of `head` in
    /// `dx` (B, S, heads, hd).
    ///
    /// # Safety
    /// The rows written belong to the calling task alone.
    unsafe fn unrotate(&self, dy: &[f32], dx: SendPtr, heads: usize, d: Dims, bi: usize, head: usize) {
        let (s, hd, rot) = (d.s, d.hd, self.rot);
        let half = rot / 2;
        for (t, g) in dy.chunks_exact(hd).enumerate() {
            let o = std::slice::from_raw_parts_mut(dx.at(((bi * s + t) * heads + head) * hd), hd);
            let (c, sn) = (&self.cos[(bi * s + t) * rot..][..rot], &self.sin[(bi * s + t) * rot..][..rot]);
            for i in 0..half {
                o[i] += g[i] * c[i] + g[i + half] * sn[i + half];
                o[i + half] += g[i + half] * c[i + half] - g[i] * sn[i];
            }
            for i in rot..hd {
                o[i] += g[i];
            }
        }
    }

    /// Rows of key/value head `g` of sample `bi` from v (B, S, KV, hd), unrotated.
    fn rows(&self, v: &[f32], d: Dims, bi: usize, g: usize) -> Vec<f32> {
        let mut out = vec![0f32; d.s * d.hd];
        for (t, o) in out.chunks_exact_mut(d.hd).enumerate() {
            o.copy_from_slice(&v[((bi * d.s + t) * d.kv + g) * d.hd..][..d.hd]);
        }
        out
    }

    /// Keys query row `i` sees.
    fn seen(&self, i: usize, s: usize) -> usize {
        if self.causal {
            i + 1
        } else {
            s
        }
    }

    /// The softmax of `qr · krᵀ · scale` (S × S; causal: zero above the diagonal).
    fn probabilities(&self, qr: &[f32], kr: &[f32], d: Dims) -> Vec<f32> {
        let (s, hd) = (d.s, d.hd);
        let mut p = vec![0f32; s * s];
        // SAFETY: qr and kr are S × hd, p is S × S, row-major.
        unsafe {
            gemm_f32_with(
                s,
                s,
                hd,
                p.as_mut_ptr(),
                s,
                false,
                (qr.as_ptr(), 1, hd),
                (kr.as_ptr(), hd, 1),
                self.scale,
                gemm::Parallelism::None,
            )
        };
        for (i, row) in p.chunks_exact_mut(s).enumerate() {
            softmax_prefix(row, self.seen(i, s));
        }
        p
    }
}

crate::nn::amx::wide_fn! {
    /// Softmax of the first `n` entries of `row` in place, the rest zeroed (keys after the query).
    fn softmax_prefix(row: &mut [f32], n: usize) {
        let (live, masked) = row.split_at_mut(n);
        let max = live.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        // The exponentials in a loop of their own (it vectorises), then summed in order as before.
        for x in live.iter_mut() {
            *x = crate::nn::fused::exp(*x - max);
        }
        let sum = live.iter().fold(0f32, |s, &x| s + x);
        let inv = 1.0 / sum;
        for x in live.iter_mut() {
            *x *= inv;
        }
        masked.fill(0.0);
    }
}

crate::nn::amx::wide_fn! {
    /// One row of the softmax's backward in place: dS = P ∘ (dP − Σ P∘dP) · scale.
    fn softmax_grad_row(dp: &mut [f32], p: &[f32], scale: f32) {
        let dsum = dot16(dp, p);
        for (d, &pp) in dp.iter_mut().zip(p) {
            *d = pp * (*d - dsum) * scale;
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, s, h, hd) = l1.shape().dims4()?;
        let d = Dims { s, kv: self.kv, hd };
        let (q, k, v) = (
            f32_slice(s1, l1, "attention: q")?,
            f32_slice(s2, l2, "attention: k")?,
            f32_slice(s3, l3, "attention: v")?,
        );
        let rep = h / self.kv;
        let mut out = vec![0f32; b * s * h * hd];
        let op = SendPtr::new(out.as_mut_ptr());
        (0..b * self.kv).into_par_iter().for_each(|task| {
            let (bi, g) = (task / self.kv, task % self.kv);
            let kr = self.rotated(k, self.kv, d, bi, g);
            let vv = self.rows(v, d, bi, g);
            for head in g * rep..(g + 1) * rep {
                let qr = self.rotated(q, h, d, bi, head);
                let p = self.probabilities(&qr, &kr, d);
                // SAFETY: p (S × S) · vv (S × hd) into the rows of this head in out (row stride H·hd), which only
                // this task writes.
                unsafe {
                    gemm_f32_with(
                        s,
                        hd,
                        s,
                        op.at((bi * s) * h * hd + head * hd),
                        h * hd,
                        false,
                        (p.as_ptr(), 1, s),
                        (vv.as_ptr(), 1, hd),
                        1.0,
                        gemm::Parallelism::None,
                    )
                };
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, s, h * hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, s, h, hd) = q.dims4()?;
        let d = Dims { s, kv: self.kv, hd };
        let grad = grad.contiguous()?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs), Storage::Cpu(gs)) = (&*qs, &*ks, &*vs, &*gs) else {
            candle_core::bail!("attention backward: expected CPU tensors")
        };
        let (qv, kv_, vv_) = (
            f32_slice(qs, ql, "attention: q")?,
            f32_slice(ks, kl, "attention: k")?,
            f32_slice(vs, vl, "attention: v")?,
        );
        let gy = f32_slice(gs, gl, "attention: the gradient")?;
        let rep = h / self.kv;
        let (mut dq, mut dk, mut dv) = (vec![0f32; qv.len()], vec![0f32; kv_.len()], vec![0f32; vv_.len()]);
        let (dqp, dkp, dvp) =
            (SendPtr::new(dq.as_mut_ptr()), SendPtr::new(dk.as_mut_ptr()), SendPtr::new(dv.as_mut_ptr()));
        let np = gemm::Parallelism::None;
        (0..b * self.kv).into_par_iter().for_each(|task| {
            let (bi, g) = (task / self.kv, task % self.kv);
            let kr = self.rotated(kv_, self.kv, d, bi, g);
            let vv = self.rows(vv_, d, bi, g);
            let (mut dkr, mut dvv) = (vec![0f32; s * hd], vec![0f32; s * hd]);
            let mut dp = vec![0f32; s * s];
            let mut dqr = vec![0f32; s * hd];
            for head in g * rep..(g + 1) * rep {
                let qr = self.rotated(qv, h, d, bi, head);
                let p = self.probabilities(&qr, &kr, d);
                let go = gy[(bi * s) * h * hd + head * hd..].as_ptr();
                // SAFETY: every operand is a row-major buffer of the sizes named (the head's rows of the output
                // gradient at row stride H·hd); this task's buffers only.
                unsafe {
                    // dV += Pᵀ · dO; dP = dO · Vᵀ.
                    gemm_f32_with(s, hd, s, dvv.as_mut_ptr(), hd, true, (p.as_ptr(), s, 1), (go, 1, h * hd), 1.0, np);
                    gemm_f32_with(s, s, hd, dp.as_mut_ptr(), s, false, (go, 1, h * hd), (vv.as_ptr(), hd, 1), 1.0, np);
                }
                for (i, (row, prow)) in dp.chunks_exact_mut(s).zip(p.chunks_exact(s)).enumerate() {
                    let n = self.seen(i, s);
                    softmax_grad_row(&mut row[..n], &prow[..n], self.scale);
                    row[n..].fill(0.0);
                }
                // SAFETY: as above.
                unsafe {
                    // dQr = dS · Kr; dKr += dSᵀ · Qr.
                    gemm_f32_with(
                        s,
                        hd,
                        s,
                        dqr.as_mut_ptr(),
                        hd,
                        false,
                        (dp.as_ptr(), 1, s),
                        (kr.as_ptr(), 1, hd),
                        1.0,
                        np,
                    );
                    gemm_f32_with(
                        s,
                        hd,
                        s,
                        dkr.as_mut_ptr(),
                        hd,
                        true,
                        (dp.as_ptr(), s, 1),
                        (qr.as_ptr(), 1, hd),
                        1.0,
                        np,
                    );
                    self.unrotate(&dqr, dqp, h, d, bi, head);
                }
            }
            // SAFETY: key/value head g of sample bi belongs to this task alone.
            unsafe {
                self.unrotate(&dkr, dkp, self.kv, d, bi, g);
                for (t, row) in dvv.chunks_exact(hd).enumerate() {
                    std::ptr::copy_nonoverlapping(row.as_ptr(), dvp.at(((bi * s + t) * self.kv + g) * hd), hd);
                }
            }
        });
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape().clone(), dev)?),
            Some(Tensor::from_vec(dk, k.shape().clone(), dev)?),
            Some(Tensor::from_vec(dv, v.shape().clone(), dev)?),
        ))
    }
}

/// Attention of one new position per sequence over a decoding cache, on the CPU in f32: q (B, H, 1, hd) after
/// its rotary embedding; k and v the cache tensors (B, KV, capacity, hd) of which the first `len` positions are
/// filled. Query head h reads key/value head h / (H / KV) in place (no expanded copies of the cache). Returns
/// (B, 1, H·hd), or None where it does not apply (another device or dtype, a non-contiguous cache).
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, len: usize, kv: usize) -> Result<Option<Tensor>> {
    let b = q.dim(0)?;
    if k.dim(0)? != b || v.dim(0)? != b {
        candle_core::bail!("decode attention: {b} queries for a cache of {} rows", k.dim(0)?);
    }
    let rows = (0..b).map(|r| Ok((k.narrow(0, r, 1)?, v.narrow(0, r, 1)?, len))).collect::<Result<Vec<_>>>()?;
    decode_attention_rows(q, &rows, kv)
}

/// [`decode_attention`] for rows with caches of their own: row r's keys and values (1, KV, capacity_r, hd), of
/// which the first len_r positions are filled. Every row's query heads run as one parallel loop.
pub fn decode_attention_rows(q: &Tensor, caches: &[(Tensor, Tensor, usize)], kv: usize) -> Result<Option<Tensor>> {
    let (b, h, s, hd) = q.dims4()?;
    if caches.len() != b {
        candle_core::bail!("decode attention: {b} queries for {} caches", caches.len());
    }
    if s != 1 || !q.device().is_cpu() || q.dtype() != DType::F32 {
        return Ok(None);
    }
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let Storage::Cpu(qs) = &*qs else { return Ok(None) };
    let qv = f32_slice(qs, ql, "decode attention: q")?;
    let guards: Vec<_> =
        caches.iter().map(|(k, v, len)| (k.storage_and_layout(), v.storage_and_layout(), *len)).collect();
    let mut rows = Vec::with_capacity(b);
    for (((ks, kl), (vs, vl), len), (k, _, _)) in guards.iter().zip(caches) {
        let (Storage::Cpu(ks), Storage::Cpu(vs)) = (&**ks, &**vs) else { return Ok(None) };
        let (kb, kh, cap, khd) = k.dims4()?;
        if k.dtype() != DType::F32 || !kl.is_contiguous() || !vl.is_contiguous() || kb != 1 || kh != kv || khd != hd {
            return Ok(None);
        }
        if *len > cap || vl.shape() != kl.shape() {
            candle_core::bail!("decode attention: {len} positions in a cache of {cap}");
        }
        rows.push((
            f32_slice(ks, kl, "decode attention: keys")?,
            f32_slice(vs, vl, "decode attention: values")?,
            cap,
            *len,
        ));
    }
    let mut o = vec![0f32; b * h * hd];
    let scale = 1.0 / (hd as f32).sqrt();
    let rep = h / kv;
    // Query heads of every row: each reads its key/value head of its row's cache.
    let head = |(t, oh): (usize, &mut [f32])| {
        let (r, hh) = (t / h, t % h);
        let (kc, vc, cap, len) = rows[r];
        let base = (hh / rep) * cap * hd;
        let mut scores = vec![0f32; len];
        decode_head(
            oh,
            &qv[t * hd..(t + 1) * hd],
            &kc[base..base + len * hd],
            &vc[base..base + len * hd],
            scale,
            &mut scores,
        );
    };
    let work: usize = rows.iter().map(|r| r.3).sum::<usize>() * h * hd;
    if work < 1 << 15 {
        o.chunks_mut(hd).enumerate().for_each(head);
    } else {
        o.par_chunks_mut(hd).enumerate().for_each(head);
    }
    Ok(Some(Tensor::from_vec(o, (b, 1, h * hd), q.device())?))
}

crate::nn::amx::wide_fn! {
    /// One query head of [`decode_attention`]: o and q (hd), k and v (len, hd).
    fn decode_head(o: &mut [f32], q: &[f32], k: &[f32], v: &[f32], scale: f32, scores: &mut [f32]) {
        let hd = q.len();
        let mut max = f32::NEG_INFINITY;
        for (sc, kt) in scores.iter_mut().zip(k.chunks_exact(hd)) {
            *sc = crate::nn::fused::dot16(q, kt) * scale;
            max = max.max(*sc);
        }
        for sc in scores.iter_mut() {
            *sc = crate::nn::fused::exp(*sc - max);
        }
        let sum = scores.iter().fold(0f32, |s, &x| s + x);
        let inv = 1.0 / sum;
        o.fill(0.0);
        for (&p, vt) in scores.iter().zip(v.chunks_exact(hd)) {
            let p = p * inv;
            for (a, &x) in o.iter_mut().zip(vt) {
                *a += p * x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::fused::tests::rel;
    use candle_core::{Device, Var};

    /// Output and the three input gradients against the composed ops (rotary embedding, key/value heads repeated,
    /// masked softmax attention), with partial and full rotation, grouped heads, causal or not.
    #[test]
    fn fused_attention_and_its_gradients_equal_the_composed_ops() -> Result<()> {
        use crate::nn::ops;
        let dev = Device::Cpu;
        let shapes = [(1, 7, 4, 2, 8, 4, true), (2, 19, 4, 1, 16, 16, true), (1, 33, 2, 2, 32, 8, true)];
        for (b, s, h, kv, hd, rot, causal) in shapes.into_iter().chain([(1, 21, 2, 2, 16, 16, false)]) {
            let var = |shape: &[usize]| Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap());
            let (q, k, v) = (var(&[b, s, h, hd])?, var(&[b, s, kv, hd])?, var(&[b, s, kv, hd])?);
            let ang = Tensor::randn(0f32, 1.0, (b, s, rot), &dev)?;
            let (cos, sin) = (ang.cos()?, ang.sin()?);
            let scale = 1.0 / (hd as f64).sqrt();
            let got = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &cos, &sin, scale, causal)?.unwrap();
            // The composed reference, as the attention layer computes it.
            let (c1, s1) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
            let qr = ops::apply_rope(&q.as_tensor().transpose(1, 2)?, &c1, &s1)?;
            let kr = ops::apply_rope(&k.as_tensor().transpose(1, 2)?, &c1, &s1)?;
            let rep = h / kv;
            let expand = |x: &Tensor| x.unsqueeze(2)?.broadcast_as((b, kv, rep, s, hd))?.reshape((b, h, s, hd));
            let vt = v.as_tensor().transpose(1, 2)?.contiguous()?;
            let mask = causal.then(|| ops::causal_mask(s, 0, &dev)).transpose()?;
            let o = ops::attention(&qr, &expand(&kr.contiguous()?)?, &expand(&vt)?, scale, mask.as_ref())?;
            let want = o.transpose(1, 2)?.reshape((b, s, h * hd))?;
            assert!(rel(&got, &want) < 1e-5, "({b},{s},{h},{kv},{hd},{rot}): {}", rel(&got, &want));
            let wo = Tensor::randn(0f32, 1.0, (b, s, h * hd), &dev)?;
            let gg = (got * &wo)?.sum_all()?.backward()?;
            let gw = (want * &wo)?.sum_all()?.backward()?;
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, c) = (gg.get(x.as_tensor()).unwrap(), gw.get(x.as_tensor()).unwrap());
                assert!(rel(a, c) < 2e-5, "({b},{s},{h},{kv},{hd},{rot}) d{name}: {}", rel(a, c));
            }
        }
        Ok(())
    }
}
