//! Elementwise chains as single CPU ops with hand-written backward passes: SwiGLU and the zero-centred RMSNorm.
//!
//! Composed of candle ops, `silu(g) · u` is two passes forward and, for its backward, half a dozen more over
//! fresh (rows × intermediate) tensors, all kept until the backward ends; an RMSNorm is six ops each way. As one
//! op each is one pass forward and one backward, and keeps only its inputs. They apply to contiguous f32 tensors
//! on the CPU; elsewhere callers compose tensor ops.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// `e^x` in a form that vectorises (the library's `expf` is a call per element): Cody–Waite reduction to
/// `r` in [−ln2/2, ln2/2] and a degree-7 polynomial, within 2.5e-7 relative of `expf` for x in [−87, 88]; below,
/// the smallest normal f32 (the terms it feeds are then negligible), above, the value at 88.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    // SAFETY: n is an integer in [−126, 127]: the exponent field of a normal f32.
    p * f32::from_bits(((unsafe { n.to_int_unchecked::<i32>() } + 127) as u32) << 23)
}

/// tanh in a form the compiler vectorises, within a few ulp of libm's: the odd Taylor series to x¹⁵ below
/// |x| = 0.5 (the next term is under 1e-8 of the value there), 1 − 2 / (e^{2|x|} + 1) above, both computed and one
/// selected, so the loop has no branch.
#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    const C: [f32; 7] = [
        -1.0 / 3.0,
        2.0 / 15.0,
        -17.0 / 315.0,
        62.0 / 2835.0,
        -1382.0 / 155_925.0,
        21_844.0 / 6_081_075.0,
        -929_569.0 / 638_512_875.0,
    ];
    let a = x.abs();
    let z = x * x;
    let mut p = C[6];
    for c in C[..6].iter().rev() {
        p = p * z + c;
    }
    let small = x + x * z * p;
    let big = (1.0 - 2.0 / (exp(2.0 * a) + 1.0)).copysign(x);
    if a < 0.5 {
        small
    } else {
        big
    }
}

crate::nn::amx::wide_fn! {
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`), as candle writes it, with [`tanh`].
    fn gelu_tanh_into(x: &[f32], y: &mut [f32]) {
        const K: f32 = 0.797_884_6; // sqrt(2/π)
        for (y, &v) in y.iter_mut().zip(x) {
            *y = 0.5 * v * (1.0 + tanh(K * v * (1.0 + 0.044_715 * v * v)));
        }
    }
}

/// GELU (tanh form) of an f32 CPU tensor nothing differentiates, vectorised and on the pool; elsewhere candle's
/// (libm's tanhf per element, which takes two thirds of the vision tower's time). Within 3e-7 of candle's over
/// −10..10 (test below); training keeps candle's, so that its numbers stay LLaMA-Factory's.
pub fn gelu_tanh_fast(x: &Tensor) -> Result<Tensor> {
    if !fits(&[x]) || x.track_op() {
        return x.gelu();
    }
    let x = x.contiguous()?;
    let (st, l) = x.storage_and_layout();
    let Storage::Cpu(cs) = &*st else { return x.gelu() };
    let v = f32_slice(cs, l, "gelu input")?;
    let mut y = vec![0f32; v.len()];
    if v.len() < SERIAL_BELOW {
        gelu_tanh_into(v, &mut y);
    } else {
        y.par_chunks_mut(CHUNK).zip(v.par_chunks(CHUNK)).for_each(|(y, v)| gelu_tanh_into(v, y));
    }
    Tensor::from_vec(y, x.shape(), x.device())
}

/// The contiguous f32 elements of a CPU operand (`what` names it in the error).
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) if l.is_contiguous() => Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()]),
        _ => candle_core::bail!("{what} must be a contiguous f32 CPU tensor"),
    }
}

/// Whether the fused ops take these tensors.
fn fits(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

/// Elements one parallel task handles.
const CHUNK: usize = 1 << 14;

/// Jobs smaller than this many elements run on the calling thread: handing one to the pool's threads costs more
/// than the job itself (decoding a token runs hundreds of such ops).
pub(crate) const SERIAL_BELOW: usize = 1 << 15;

/// `silu(g) · u` (SwiGLU), one op on the CPU for f32 tensors of the same shape, composed elsewhere.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if !fits(&[g, u]) || g.shape() != u.shape() {
        return g.silu()? * u;
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}

struct SwiGlu;

crate::nn::amx::wide_fn! {
    fn swiglu_into(o: &mut [f32], g: &[f32], u: &[f32]) {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + exp(-g)) * u;
        }
    }
}

crate::nn::amx::wide_fn! {
    /// dg = dy·u·silu'(g) with silu'(g) = σ(g)·(1 + g·(1 − σ(g))), du = dy·silu(g).
    fn swiglu_grad(dg: &mut [f32], du: &mut [f32], dy: &[f32], g: &[f32], u: &[f32]) {
        for ((((dg, du), &dy), &g), &u) in dg.iter_mut().zip(du.iter_mut()).zip(dy).zip(g).zip(u) {
            let s = 1.0 / (1.0 + exp(-g));
            *du = dy * g * s;
            *dg = dy * u * s * (1.0 + g * (1.0 - s));
        }
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (f32_slice(s1, l1, "swiglu gate")?, f32_slice(s2, l2, "swiglu input")?);
        let mut y = vec![0f32; g.len()];
        if g.len() < SERIAL_BELOW {
            swiglu_into(&mut y, g, u);
        } else {
            y.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                .for_each(|(o, (g, u))| swiglu_into(o, g, u));
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (gs, gl) = g.storage_and_layout();
        let (us, ul) = u.storage_and_layout();
        let (ds, dl) = grad.storage_and_layout();
        let (Storage::Cpu(gs), Storage::Cpu(us), Storage::Cpu(ds)) = (&*gs, &*us, &*ds) else {
            candle_core::bail!("swiglu backward: expected CPU tensors")
        };
        let (gv, uv, dy) =
            (f32_slice(gs, gl, "swiglu gate")?, f32_slice(us, ul, "swiglu input")?, f32_slice(ds, dl, "gradient")?);
        let (mut dg, mut du) = (vec![0f32; gv.len()], vec![0f32; gv.len()]);
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(dy.par_chunks(CHUNK).zip(gv.par_chunks(CHUNK).zip(uv.par_chunks(CHUNK))))
            .for_each(|((dg, du), (dy, (g, u)))| swiglu_grad(dg, du, dy, g, u));
        let shape = g.shape().clone();
        Ok((Some(Tensor::from_vec(dg, shape.clone(), g.device())?), Some(Tensor::from_vec(du, shape, g.device())?)))
    }
}

/// `x · rsqrt(mean(x², −1) + eps) · w` over the last dim (w: f32, its length), one op on the CPU for f32 x,
/// composed elsewhere. Gradients to x and w.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let n = x.dim(candle_core::D::Minus1)?;
    if !fits(&[x, w]) || w.dims() != [n] {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })?))
}

struct RmsNorm {
    eps: f32,
}

crate::nn::amx::wide_fn! {
    /// One row: `o = x · r · w` with r = rsqrt(mean(x²) + eps).
    fn norm_row(o: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        let ss = dot16(x, x);
        let r = 1.0 / (ss / x.len() as f32 + eps).sqrt();
        for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
            *o = x * r * w;
        }
    }
}

crate::nn::amx::wide_fn! {
    /// One row's dx = r·(dy∘w) − (r³/n)·(x·(dy∘w))·x, and dw += dy∘x·r.
    fn norm_row_grad(dx: &mut [f32], dw: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], eps: f32) {
        let n = x.len() as f32;
        let r = 1.0 / (dot16(x, x) / n + eps).sqrt();
        for ((dx, &dy), &w) in dx.iter_mut().zip(dy).zip(w) {
            *dx = dy * w;
        }
        let xd = dot16(x, dx);
        let c = r * r * r / n * xd;
        for ((dx, &x), (dw, &dy)) in dx.iter_mut().zip(x).zip(dw.iter_mut().zip(dy)) {
            *dw += dy * x * r;
            *dx = r * *dx - c * x;
        }
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32_slice(s1, l1, "norm input")?, f32_slice(s2, l2, "norm weight")?);
        let n = w.len();
        let mut y = vec![0f32; x.len()];
        let row = |(o, x): (&mut [f32], &[f32])| norm_row(o, x, w, self.eps);
        if x.len() < SERIAL_BELOW {
            y.chunks_mut(n).zip(x.chunks(n)).for_each(row);
        } else {
            y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(row);
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (ds, dl) = grad.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(ds)) = (&*xs, &*ws, &*ds) else {
            candle_core::bail!("rms norm backward: expected CPU tensors")
        };
        let (xv, wv, dy) =
            (f32_slice(xs, xl, "norm input")?, f32_slice(ws, wl, "norm weight")?, f32_slice(ds, dl, "gradient")?);
        let n = wv.len();
        let rows = xv.len() / n;
        let mut dx = vec![0f32; xv.len()];
        // dw per block of rows, summed in block order (the same sum on any number of threads).
        let per = rows.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(per * n)
            .zip(xv.par_chunks(per * n).zip(dy.par_chunks(per * n)))
            .map(|(dx, (x, dy))| {
                let mut dw = vec![0f32; n];
                for ((dx, x), dy) in dx.chunks_mut(n).zip(x.chunks(n)).zip(dy.chunks(n)) {
                    norm_row_grad(dx, &mut dw, dy, x, wv, self.eps);
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; n];
        for p in partial {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
        Ok((
            Some(Tensor::from_vec(dx, x.shape().clone(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape().clone(), w.device())?),
        ))
    }
}

/// Sum of products with 16 independent lanes (one vector register once compiled for AVX-512), the lanes summed
/// as a tree of vector adds: summed in order, their 16 dependent adds would take longer than the products.
#[inline(always)]
pub(crate) fn dot16(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    for w in [8, 4, 2, 1] {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    let mut s = acc[0];
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// Largest difference over the largest magnitude of `b` (the reference).
    pub(crate) fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let m = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        d / m.max(1e-30)
    }

    /// The vectorised GELU against candle's (libm's tanhf) and an f64 reference, over −10..10 in steps of 1e-4.
    #[test]
    fn fast_gelu_tanh_matches_candles() {
        let xs: Vec<f32> = (-100_000..=100_000).map(|i| i as f32 * 1e-4).collect();
        let x = Tensor::from_vec(xs.clone(), xs.len(), &candle_core::Device::Cpu).unwrap();
        let fast: Vec<f32> = gelu_tanh_fast(&x).unwrap().to_vec1().unwrap();
        let candle: Vec<f32> = x.gelu().unwrap().to_vec1().unwrap();
        let (mut vs_candle, mut vs_f64) = (0f64, 0f64);
        for ((&v, &f), &c) in xs.iter().zip(&fast).zip(&candle) {
            let v64 = v as f64;
            let want = 0.5 * v64 * (1.0 + (0.797_884_560_802_865_4 * v64 * (1.0 + 0.044_715 * v64 * v64)).tanh());
            vs_candle = vs_candle.max((f - c).abs() as f64);
            vs_f64 = vs_f64.max((f as f64 - want).abs() / want.abs().max(1.0));
        }
        eprintln!("fast GELU: max abs diff vs candle {vs_candle:e}, vs f64 {vs_f64:e}");
        assert!(vs_candle <= 3e-7, "vs candle: {vs_candle:e}");
        assert!(vs_f64 <= 3e-7, "vs f64: {vs_f64:e}");
    }

    #[test]
    fn the_vectorised_exp_is_within_its_bound_of_the_library_exp() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (a, b) = (exp(x), x.exp());
            worst = worst.max((a - b).abs() / b);
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37 && exp(1000.0).is_finite());
    }

    #[test]
    fn swiglu_and_rms_norm_equal_the_composed_ops_and_their_gradients() {
        let dev = Device::Cpu;
        for (rows, n) in [(1, 5), (7, 37), (33, 256)] {
            let g = Var::from_tensor(&Tensor::randn(0f32, 3.0, (rows, n), &dev).unwrap()).unwrap();
            let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, n), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, n, &dev).unwrap()).unwrap();
            let wo = Tensor::randn(0f32, 1.0, (rows, n), &dev).unwrap();
            let want = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
            let got = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
            assert!(rel(&got, &want) < 1e-6, "swiglu ({rows},{n}): {}", rel(&got, &want));
            let gw = (want * &wo).unwrap().sum_all().unwrap().backward().unwrap();
            let gg = (got * &wo).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&g, &u] {
                let (a, b) = (gg.get(v.as_tensor()).unwrap(), gw.get(v.as_tensor()).unwrap());
                assert!(rel(a, b) < 1e-5, "swiglu ({rows},{n}) gradient: {}", rel(a, b));
            }

            let x = g.as_tensor();
            let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let want = x.broadcast_mul(&(ms + 1e-6).unwrap().sqrt().unwrap().recip().unwrap()).unwrap();
            let want = want.broadcast_mul(w.as_tensor()).unwrap();
            let got = rms_norm(x, w.as_tensor(), 1e-6).unwrap().unwrap();
            assert!(rel(&got, &want) < 1e-6, "norm ({rows},{n}): {}", rel(&got, &want));
            let gw = (want * &wo).unwrap().sum_all().unwrap().backward().unwrap();
            let gg = (got * &wo).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&g, &w] {
                let (a, b) = (gg.get(v.as_tensor()).unwrap(), gw.get(v.as_tensor()).unwrap());
                assert!(rel(a, b) < 1e-5, "norm ({rows},{n}) gradient: {}", rel(a, b));
            }
        }
    }
}
