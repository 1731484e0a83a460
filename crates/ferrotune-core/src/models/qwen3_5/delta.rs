//! The gated delta rule as one CPU op with a hand-written backward pass.
//!
//! Built from candle ops (as [`super::gdn::delta_rule_chunked`] is) the rule costs a few dozen small tensor
//! operations per chunk, each a pass over freshly allocated memory, and candle keeps every intermediate of them
//! until the backward pass ends. Here each head runs the recurrence token by token on its (dk × dv) state, which
//! stays in the core's cache: the forward is two passes over the state per token, the backward recomputes the
//! states of a block of tokens from a checkpoint and walks them in reverse (two passes per token), and nothing
//! but the packed inputs, the outputs and their gradients is ever allocated. Heads run in parallel.
//!
//! Per head and token t, with α = exp(g_t) and β = beta_t (S is dk × dv):
//!   S̃ = α·S_{t−1};  kv = S̃ᵀk;  δ = β·(v − kv);  S_t = S̃ + k·δᵀ;  o_t = S_tᵀq.
//! The backward follows these in reverse (see [`backward_head`]).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Tokens whose states the backward pass recomputes and keeps at once (16 state slices of 32 KiB at the 4B
/// shapes).
const BLOCK: usize = 16;

/// The gated delta rule on the CPU, same inputs and outputs as [`super::gdn::delta_rule_recurrent`]: q, k (N, S,
/// dk), v (N, S, dv), g and beta (N, S), all f32, and the state (N, dk, dv) to continue from. Gradients flow to
/// q, k, v, g and beta (and from the returned state); the initial state is taken as a constant.
pub fn delta_rule_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (n, s, dk) = k.dims3()?;
    let dv = v.dim(2)?;
    for (name, t) in [("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)] {
        if t.dtype() != DType::F32 {
            candle_core::bail!("delta rule: {name} must be f32, got {:?}", t.dtype());
        }
    }
    let init = match state {
        Some(st) => {
            if st.dims3()? != (n, dk, dv) {
                candle_core::bail!("delta rule: state {:?} for {n} heads of {dk}×{dv}", st.dims());
            }
            Some(st.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        }
        None => None,
    };
    // One input tensor for the op: per head and token [q | k | v | g | beta].
    let packed = Tensor::cat(&[q, k, v, &g.unsqueeze(2)?, &beta.unsqueeze(2)?], 2)?.contiguous()?;
    let out = packed.apply_op1(DeltaRule { dk, dv, init })?;
    Ok((out.narrow(1, 0, s)?, out.narrow(1, s, dk)?.contiguous()?))
}

struct DeltaRule {
    dk: usize,
    dv: usize,
    /// The state to start from, (N, dk, dv) flattened; zeros when None.
    init: Option<Vec<f32>>,
}

impl DeltaRule {
    /// The packed input as a slice with its (heads, tokens, width).
    fn input<'a>(&self, s: &'a CpuStorage, l: &Layout) -> Result<(&'a [f32], usize, usize)> {
        let (n, t, p) = l.shape().dims3()?;
        if p != 2 * self.dk + self.dv + 2 {
            candle_core::bail!("delta rule: packed width {p} for dk {} and dv {}", self.dk, self.dv);
        }
        let CpuStorage::F32(x) = s else { candle_core::bail!("delta rule: the packed input must be f32") };
        if !l.is_contiguous() {
            candle_core::bail!("delta rule: the packed input must be contiguous");
        }
        Ok((&x[l.start_offset()..l.start_offset() + n * t * p], n, t))
    }

    fn init_of(&self, h: usize) -> Option<&[f32]> {
        let len = self.dk * self.dv;
        self.init.as_ref().map(|v| &v[h * len..(h + 1) * len])
    }
}

impl CustomOp1 for DeltaRule {
    fn name(&self) -> &'static str {
        "gated-delta-rule"
    }

    /// Output (N, S + dk, dv): each head's S outputs, then its final state.
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, n, t) = self.input(s, l)?;
        let (dk, dv) = (self.dk, self.dv);
        let p = 2 * dk + dv + 2;
        let mut out = vec![0f32; n * (t + dk) * dv];
        out.par_chunks_mut((t + dk) * dv).enumerate().for_each(|(h, o)| {
            let (outs, st) = o.split_at_mut(t * dv);
            match self.init_of(h) {
                Some(init) => st.copy_from_slice(init),
                None => st.fill(0.0),
            }
            forward(&x[h * t * p..(h + 1) * t * p], dk, dv, st, outs);
        });
        Ok((CpuStorage::F32(out), Shape::from((n, t + dk, dv))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (dk, dv) = (self.dk, self.dv);
        let (n, t, p) = arg.dims3()?;
        let (arg, grad) = (arg.contiguous()?, grad.contiguous()?);
        let (xs, xl) = arg.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(xs)), Storage::Cpu(CpuStorage::F32(gs))) = (&*xs, &*gs) else {
            candle_core::bail!("delta rule backward: expected f32 CPU tensors")
        };
        let x = &xs[xl.start_offset()..xl.start_offset() + n * t * p];
        let gr = &gs[gl.start_offset()..gl.start_offset() + n * (t + dk) * dv];
        let mut gx = vec![0f32; n * t * p];
        gx.par_chunks_mut(t * p).enumerate().for_each(|(h, gxh)| {
            let go = &gr[h * (t + dk) * dv..(h + 1) * (t + dk) * dv];
            backward(&x[h * t * p..(h + 1) * t * p], dk, dv, self.init_of(h), go, gxh);
        });
        Ok(Some(Tensor::from_vec(gx, (n, t, p), arg.device())?))
    }
}

/// The pieces of token `t` of a head's packed rows.
struct Token<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    alpha: f32,
    beta: f32,
}

fn token(x: &[f32], t: usize, dk: usize, dv: usize) -> Token<'_> {
    let p = 2 * dk + dv + 2;
    let r = &x[t * p..(t + 1) * p];
    Token { q: &r[..dk], k: &r[dk..2 * dk], v: &r[2 * dk..2 * dk + dv], alpha: r[2 * dk + dv].exp(), beta: r[p - 1] }
}

/// Sum of products with 16 independent lanes (one vector register once compiled for AVX-512), the lanes summed
/// as a tree of vector adds: summed in order, their 16 dependent adds would take longer than the products.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// `kv = S̃ᵀk` and `δ = β·(v − kv)` for the state before token t (S̃ = α·S).
#[inline(always)]
fn delta_of(st: &[f32], tk: &Token, dv: usize, kv: &mut [f32], delta: &mut [f32]) {
    kv.fill(0.0);
    for (row, &ki) in st.chunks_exact(dv).zip(tk.k) {
        let c = tk.alpha * ki;
        for (a, &s) in kv.iter_mut().zip(row) {
            *a += c * s;
        }
    }
    for ((d, &vv), &a) in delta.iter_mut().zip(tk.v).zip(kv.iter()) {
        *d = tk.beta * (vv - a);
    }
}

crate::nn::amx::wide_fn! {
    /// Every token of one head in order: the outputs (S × dv) and the state, updated in place.
    fn forward_head(x: &[f32], dk: usize, dv: usize, st: &mut [f32], outs: &mut [f32]) {
        let mut kv = vec![0f32; dv];
        let mut delta = vec![0f32; dv];
        for (t, o) in outs.chunks_exact_mut(dv).enumerate() {
            let tk = token(x, t, dk, dv);
            delta_of(st, &tk, dv, &mut kv, &mut delta);
            o.fill(0.0);
            for ((row, &ki), &qi) in st.chunks_exact_mut(dv).zip(tk.k).zip(tk.q) {
                for ((s, &d), oo) in row.iter_mut().zip(delta.iter()).zip(o.iter_mut()) {
                    *s = tk.alpha * *s + ki * d;
                    *oo += qi * *s;
                }
            }
        }
    }
}

crate::nn::amx::wide_fn! {
    /// The gradients of one head's packed inputs (`gx`, per token [dq | dk | dv | dg | dβ]) from those of its
    /// outputs and final state (`go`: S rows of dv, then dk rows of dv).
    ///
    /// Walking back from token t with dS = ∂L/∂S_t (the final state's gradient at the start):
    ///   dq = S_t·do_t;  dS += q·do_tᵀ;  dk = dS·δ;  dδ = dSᵀk;
    ///   dv = β·dδ;  dβ = dδ·(v − kv);  dkv = −β·dδ;  dS̃ = dS + k·dkvᵀ;
    ///   dk += S̃·dkv;  dg = Σ dS̃∘S̃;  dS_{t−1} = α·dS̃.
    /// The states come from checkpoints every [`BLOCK`] tokens, recomputed a block at a time.
    fn backward_head(x: &[f32], dk: usize, dv: usize, init: Option<&[f32]>, go: &[f32], gx: &mut [f32]) {
        let p = 2 * dk + dv + 2;
        let steps = gx.len() / p;
        let len = dk * dv;
        let blocks = steps.div_ceil(BLOCK);
        // The state before each block.
        let mut marks = vec![0f32; blocks * len];
        let mut st = init.map_or_else(|| vec![0f32; len], |s| s.to_vec());
        let (mut kv, mut delta) = (vec![0f32; dv], vec![0f32; dv]);
        for b in 0..blocks {
            marks[b * len..(b + 1) * len].copy_from_slice(&st);
            for t in b * BLOCK..((b + 1) * BLOCK).min(steps) {
                let tk = token(x, t, dk, dv);
                delta_of(&st, &tk, dv, &mut kv, &mut delta);
                for (row, &ki) in st.chunks_exact_mut(dv).zip(tk.k) {
                    for (s, &d) in row.iter_mut().zip(delta.iter()) {
                        *s = tk.alpha * *s + ki * d;
                    }
                }
            }
        }
        // states[i] is the state after token b·BLOCK + i − 1 of the current block; kvs/deltas per token.
        let mut states = vec![0f32; (BLOCK + 1) * len];
        let mut kvs = vec![0f32; BLOCK * dv];
        let mut deltas = vec![0f32; BLOCK * dv];
        let mut ds = go[steps * dv..].to_vec();
        let mut ddelta = vec![0f32; dv];
        let mut dkv = vec![0f32; dv];
        for b in (0..blocks).rev() {
            let t0 = b * BLOCK;
            let n = BLOCK.min(steps - t0);
            states[..len].copy_from_slice(&marks[b * len..(b + 1) * len]);
            for i in 0..n {
                let tk = token(x, t0 + i, dk, dv);
                let (prev, next) = states.split_at_mut((i + 1) * len);
                let prev = &prev[i * len..];
                let (kv, delta) = (&mut kvs[i * dv..(i + 1) * dv], &mut deltas[i * dv..(i + 1) * dv]);
                delta_of(prev, &tk, dv, kv, delta);
                for ((nr, pr), &ki) in next[..len].chunks_exact_mut(dv).zip(prev.chunks_exact(dv)).zip(tk.k) {
                    for ((s, &sp), &d) in nr.iter_mut().zip(pr).zip(delta.iter()) {
                        *s = tk.alpha * sp + ki * d;
                    }
                }
            }
            for i in (0..n).rev() {
                let t = t0 + i;
                let tk = token(x, t, dk, dv);
                let cur = &states[(i + 1) * len..(i + 2) * len];
                let prev = &states[i * len..(i + 1) * len];
                let (kv, delta) = (&kvs[i * dv..(i + 1) * dv], &deltas[i * dv..(i + 1) * dv]);
                let dout = &go[t * dv..(t + 1) * dv];
                let g = &mut gx[t * p..(t + 1) * p];
                let (gq, rest) = g.split_at_mut(dk);
                let (gk, rest) = rest.split_at_mut(dk);
                let (gv, rest) = rest.split_at_mut(dv);
                // Pass over S_t: dq, dS += q·doᵀ, dk = dS·δ, dδ = dSᵀk.
                ddelta.fill(0.0);
                for r in 0..dk {
                    let (srow, dsrow) = (&cur[r * dv..(r + 1) * dv], &mut ds[r * dv..(r + 1) * dv]);
                    gq[r] = dot(srow, dout);
                    let qr = tk.q[r];
                    for (d, &o) in dsrow.iter_mut().zip(dout) {
                        *d += qr * o;
                    }
                    gk[r] = dot(dsrow, delta);
                    let kr = tk.k[r];
                    for (dd, &d) in ddelta.iter_mut().zip(dsrow.iter()) {
                        *dd += kr * d;
                    }
                }
                let mut dbeta = 0f32;
                for j in 0..dv {
                    gv[j] = tk.beta * ddelta[j];
                    dbeta += ddelta[j] * (tk.v[j] - kv[j]);
                    dkv[j] = -tk.beta * ddelta[j];
                }
                rest[1] = dbeta;
                // Pass over S_{t−1}: dS̃ = dS + k·dkvᵀ, dk += α·S_{t−1}·dkv, dg = α·Σ dS̃∘S_{t−1}, dS = α·dS̃.
                let mut dg = 0f32;
                for r in 0..dk {
                    let (prow, dsrow) = (&prev[r * dv..(r + 1) * dv], &mut ds[r * dv..(r + 1) * dv]);
                    let kr = tk.k[r];
                    for (d, &c) in dsrow.iter_mut().zip(dkv.iter()) {
                        *d += kr * c;
                    }
                    gk[r] += tk.alpha * dot(prow, &dkv);
                    dg += dot(dsrow, prow);
                    for d in dsrow.iter_mut() {
                        *d *= tk.alpha;
                    }
                }
                rest[0] = tk.alpha * dg;
            }
        }
    }
}

/// One head's forward: the AVX-512 kernel for value heads of 16·n columns (n ≤ 8), else the portable loops.
fn forward(x: &[f32], dk: usize, dv: usize, st: &mut [f32], outs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if dv % 16 == 0 && (16..=128).contains(&dv) && std::is_x86_feature_detected!("avx512f") {
        let steps = outs.len() / dv;
        // SAFETY: the CPU has AVX-512F; the buffers have the sizes the kernel reads (checked by the callers).
        unsafe {
            match dv / 16 {
                8 => wide::sweep::<8>(x, dk, steps, st, Some(outs), None),
                4 => wide::sweep::<4>(x, dk, steps, st, Some(outs), None),
                2 => wide::sweep::<2>(x, dk, steps, st, Some(outs), None),
                1 => wide::sweep::<1>(x, dk, steps, st, Some(outs), None),
                _ => forward_head(x, dk, dv, st, outs),
            }
        }
        return;
    }
    forward_head(x, dk, dv, st, outs)
}

/// One head's backward, dispatched as [`forward`].
fn backward(x: &[f32], dk: usize, dv: usize, init: Option<&[f32]>, go: &[f32], gx: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if dv % 16 == 0 && (16..=128).contains(&dv) && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: as in `forward`.
        unsafe {
            match dv / 16 {
                8 => wide::backward::<8>(x, dk, init, go, gx),
                4 => wide::backward::<4>(x, dk, init, go, gx),
                2 => wide::backward::<2>(x, dk, init, go, gx),
                1 => wide::backward::<1>(x, dk, init, go, gx),
                _ => backward_head(x, dk, dv, init, go, gx),
            }
        }
        return;
    }
    backward_head(x, dk, dv, init, go, gx)
}

/// The delta rule with AVX-512 for value heads of `16·NV` columns: each row of the state is NV registers, each
/// token one pass over the state in either direction.
///
/// Forward: the pass that updates row r of S_t also adds its share of o_t = S_tᵀq_t and of the next token's
/// kv = α'·S_tᵀk', so no second pass is needed. Backward: the pass over S_{t−1} finishes token t (its dS̃, the
/// second part of dk, dg, and dS_{t−1}) and starts token t − 1 (dq, dS += q·doᵀ, dk, dδ), which reads the same
/// rows. The forward's δ and kv of every token are kept, so recomputing a block's states needs no kv pass.
#[cfg(target_arch = "x86_64")]
mod wide {
    use super::{token, Token};
    use std::arch::x86_64::*;

    /// States recomputed and kept at once by the backward pass (8 of 64 KiB at the 4B shapes, in L2).
    const BLOCK: usize = 8;

    #[inline(always)]
    unsafe fn load<const NV: usize>(p: *const f32) -> [__m512; NV] {
        std::array::from_fn(|j| _mm512_loadu_ps(p.add(16 * j)))
    }

    #[inline(always)]
    unsafe fn store<const NV: usize>(p: *mut f32, v: &[__m512; NV]) {
        for (j, x) in v.iter().enumerate() {
            _mm512_storeu_ps(p.add(16 * j), *x);
        }
    }

    /// Σ a∘b over NV registers, two accumulator chains, then the lanes.
    #[inline(always)]
    unsafe fn dot<const NV: usize>(a: &[__m512; NV], b: &[__m512; NV]) -> f32 {
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for j in 0..NV {
            if j % 2 == 0 {
                s0 = _mm512_fmadd_ps(a[j], b[j], s0);
            } else {
                s1 = _mm512_fmadd_ps(a[j], b[j], s1);
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
    }

    /// `β·(v − kv)` for token `tk`.
    #[inline(always)]
    unsafe fn delta<const NV: usize>(tk: &Token, kv: &[__m512; NV]) -> [__m512; NV] {
        let v = load::<NV>(tk.v.as_ptr());
        let beta = _mm512_set1_ps(tk.beta);
        std::array::from_fn(|j| _mm512_mul_ps(beta, _mm512_sub_ps(v[j], kv[j])))
    }

    /// Tokens 0..steps on the state `st` (dk × 16·NV), in place. Writes each token's output to `outs`, and with
    /// `saved` = (kv, δ, marks) each token's kv and δ and the state before every BLOCK-th token.
    ///
    /// # Safety
    /// AVX-512F; `x` holds `steps` packed tokens, `st` dk rows, `outs` and the saved rows `steps` rows of 16·NV,
    /// the marks one state per block.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sweep<const NV: usize>(
        x: &[f32],
        dk: usize,
        steps: usize,
        st: &mut [f32],
        mut outs: Option<&mut [f32]>,
        mut saved: Option<(&mut [f32], &mut [f32], &mut [f32])>,
    ) {
        let dv = 16 * NV;
        if steps == 0 {
            return;
        }
        let sp = st.as_mut_ptr();
        // kv of the first token.
        let first = token(x, 0, dk, dv);
        let mut kv = [_mm512_setzero_ps(); NV];
        for r in 0..dk {
            let c = _mm512_set1_ps(first.alpha * first.k[r]);
            let row = load::<NV>(sp.add(r * dv));
            for j in 0..NV {
                kv[j] = _mm512_fmadd_ps(c, row[j], kv[j]);
            }
        }
        for t in 0..steps {
            let tk = token(x, t, dk, dv);
            if let Some((kvs, deltas, marks)) = saved.as_mut() {
                if t % BLOCK == 0 {
                    marks[t / BLOCK * dk * dv..][..dk * dv].copy_from_slice(&st[..dk * dv]);
                }
                store(kvs.as_mut_ptr().add(t * dv), &kv);
                store(deltas.as_mut_ptr().add(t * dv), &delta::<NV>(&tk, &kv));
            }
            let d = delta::<NV>(&tk, &kv);
            let next = (t + 1 < steps).then(|| token(x, t + 1, dk, dv));
            let alpha = _mm512_set1_ps(tk.alpha);
            let mut o = [_mm512_setzero_ps(); NV];
            let mut kvn = [_mm512_setzero_ps(); NV];
            for r in 0..dk {
                let p = sp.add(r * dv);
                let row = load::<NV>(p);
                let kr = _mm512_set1_ps(tk.k[r]);
                let s: [__m512; NV] = std::array::from_fn(|j| _mm512_fmadd_ps(kr, d[j], _mm512_mul_ps(alpha, row[j])));
                store(p, &s);
                let qr = _mm512_set1_ps(tk.q[r]);
                for j in 0..NV {
                    o[j] = _mm512_fmadd_ps(qr, s[j], o[j]);
                }
                if let Some(n) = &next {
                    let c = _mm512_set1_ps(n.alpha * n.k[r]);
                    for j in 0..NV {
                        kvn[j] = _mm512_fmadd_ps(c, s[j], kvn[j]);
                    }
                }
            }
            if let Some(outs) = outs.as_mut() {
                store(outs.as_mut_ptr().add(t * dv), &o);
            }
            kv = kvn;
        }
    }

    /// The second half of token t's backward (`b`: the token and its dkv) and the first half of token t − 1's
    /// (`a`: the token, its do and δ) in one pass over `rows` = S_{t−1} and `ds`, which holds ∂L/∂S_t on entry and
    /// ∂L/∂S_{t−1} with token t − 1's output term added on exit. Adds α_t·(S_{t−1}·dkv) to `gk_b`, writes dq and
    /// dk of token t − 1 to `gq_a`, `gk_a`. Returns Σ dS̃∘S_{t−1} (for dg_t) and dδ of token t − 1.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pass<const NV: usize>(
        dk: usize,
        rows: *const f32,
        ds: *mut f32,
        b: Option<(&Token, &[__m512; NV])>,
        a: Option<(&Token, &[__m512; NV], &[__m512; NV])>,
        gk_b: &mut [f32],
        gq_a: &mut [f32],
        gk_a: &mut [f32],
    ) -> (f32, [__m512; NV]) {
        let dv = 16 * NV;
        let (mut g0, mut g1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut ddelta = [_mm512_setzero_ps(); NV];
        for r in 0..dk {
            let sp = load::<NV>(rows.add(r * dv));
            let mut d = load::<NV>(ds.add(r * dv));
            if let Some((tb, dkv)) = b {
                let kr = _mm512_set1_ps(tb.k[r]);
                for j in 0..NV {
                    d[j] = _mm512_fmadd_ps(kr, dkv[j], d[j]);
                }
                gk_b[r] += tb.alpha * dot(&sp, dkv);
                let alpha = _mm512_set1_ps(tb.alpha);
                for j in 0..NV {
                    if j % 2 == 0 {
                        g0 = _mm512_fmadd_ps(d[j], sp[j], g0);
                    } else {
                        g1 = _mm512_fmadd_ps(d[j], sp[j], g1);
                    }
                    d[j] = _mm512_mul_ps(alpha, d[j]);
                }
            }
            if let Some((ta, dout, dl)) = a {
                gq_a[r] = dot(&sp, dout);
                let qr = _mm512_set1_ps(ta.q[r]);
                for j in 0..NV {
                    d[j] = _mm512_fmadd_ps(qr, dout[j], d[j]);
                }
                gk_a[r] = dot(&d, dl);
                let kr = _mm512_set1_ps(ta.k[r]);
                for j in 0..NV {
                    ddelta[j] = _mm512_fmadd_ps(kr, d[j], ddelta[j]);
                }
            }
            store(ds.add(r * dv), &d);
        }
        (_mm512_reduce_add_ps(_mm512_add_ps(g0, g1)), ddelta)
    }

    /// The gradients of one head's packed inputs (`gx`, zero on entry) from those of its outputs and final state
    /// (`go`), as [`super::backward_head`] computes them.
    ///
    /// # Safety
    /// AVX-512F; the buffers are one head's, as for [`super::backward_head`], with dv = 16·NV.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn backward<const NV: usize>(x: &[f32], dk: usize, init: Option<&[f32]>, go: &[f32], gx: &mut [f32]) {
        let dv = 16 * NV;
        let p = 2 * dk + dv + 2;
        let steps = gx.len() / p;
        if steps == 0 {
            return;
        }
        let len = dk * dv;
        let blocks = steps.div_ceil(BLOCK);
        let (mut kvs, mut deltas, mut marks) =
            (vec![0f32; steps * dv], vec![0f32; steps * dv], vec![0f32; blocks * len]);
        let mut st = init.map_or_else(|| vec![0f32; len], |s| s.to_vec());
        sweep::<NV>(x, dk, steps, &mut st, None, Some((&mut kvs, &mut deltas, &mut marks)));
        let mut ds = go[steps * dv..steps * dv + len].to_vec();
        // Finishes token t's first half: dv, dβ, and dkv for its second half.
        let finish = |t: usize, ddelta: &[__m512; NV], gx: &mut [f32]| -> [__m512; NV] {
            let tk = token(x, t, dk, dv);
            let kv = load::<NV>(kvs.as_ptr().add(t * dv));
            let v = load::<NV>(tk.v.as_ptr());
            let g = &mut gx[t * p..(t + 1) * p];
            let beta = _mm512_set1_ps(tk.beta);
            let mut db = _mm512_setzero_ps();
            for j in 0..NV {
                store(g.as_mut_ptr().add(2 * dk + 16 * j), &[_mm512_mul_ps(beta, ddelta[j])]);
                db = _mm512_fmadd_ps(ddelta[j], _mm512_sub_ps(v[j], kv[j]), db);
            }
            g[p - 1] = _mm512_reduce_add_ps(db);
            std::array::from_fn(|j| _mm512_mul_ps(_mm512_set1_ps(-tk.beta), ddelta[j]))
        };
        // Token T − 1's first half over S_{T−1} (the state the sweep ends with).
        let last = token(x, steps - 1, dk, dv);
        let dout = load::<NV>(go.as_ptr().add((steps - 1) * dv));
        let dl = load::<NV>(deltas.as_ptr().add((steps - 1) * dv));
        let (gq, rest) = gx[(steps - 1) * p..].split_at_mut(dk);
        let (_, ddelta) =
            pass::<NV>(dk, st.as_ptr(), ds.as_mut_ptr(), None, Some((&last, &dout, &dl)), &mut [], gq, &mut rest[..dk]);
        let mut dkv = finish(steps - 1, &ddelta, gx);
        let mut states = vec![0f32; BLOCK * len];
        for b in (0..blocks).rev() {
            let t0 = b * BLOCK;
            let n = BLOCK.min(steps - t0);
            // states[i] = S_{t0+i−1}, from the mark with the kept δ.
            states[..len].copy_from_slice(&marks[b * len..(b + 1) * len]);
            for i in 1..n {
                let tk = token(x, t0 + i - 1, dk, dv);
                let dl = load::<NV>(deltas.as_ptr().add((t0 + i - 1) * dv));
                let alpha = _mm512_set1_ps(tk.alpha);
                let (prev, next) = states.split_at_mut(i * len);
                let (prev, next) = (prev[(i - 1) * len..].as_ptr(), next.as_mut_ptr());
                for r in 0..dk {
                    let row = load::<NV>(prev.add(r * dv));
                    let kr = _mm512_set1_ps(tk.k[r]);
                    let s: [__m512; NV] =
                        std::array::from_fn(|j| _mm512_fmadd_ps(kr, dl[j], _mm512_mul_ps(alpha, row[j])));
                    store(next.add(r * dv), &s);
                }
            }
            for i in (0..n).rev() {
                let t = t0 + i;
                let tb = token(x, t, dk, dv);
                // Token t − 1's first half rides along, except before the first token.
                let (head, tail) = gx.split_at_mut(t * p);
                let gk_b = &mut tail[dk..2 * dk];
                let (dg, ddelta) = if t > 0 {
                    let ta = token(x, t - 1, dk, dv);
                    let dout = load::<NV>(go.as_ptr().add((t - 1) * dv));
                    let dl = load::<NV>(deltas.as_ptr().add((t - 1) * dv));
                    let (gq, rest) = head[(t - 1) * p..].split_at_mut(dk);
                    pass::<NV>(
                        dk,
                        states.as_ptr().add(i * len),
                        ds.as_mut_ptr(),
                        Some((&tb, &dkv)),
                        Some((&ta, &dout, &dl)),
                        gk_b,
                        gq,
                        &mut rest[..dk],
                    )
                } else {
                    pass::<NV>(
                        dk,
                        states.as_ptr().add(i * len),
                        ds.as_mut_ptr(),
                        Some((&tb, &dkv)),
                        None,
                        gk_b,
                        &mut [],
                        &mut [],
                    )
                };
                tail[p - 2] = tb.alpha * dg;
                if t > 0 {
                    dkv = finish(t - 1, &ddelta, gx);
                }
            }
        }
    }
}

/// Causal depthwise conv1d over time followed by SiLU, as one CPU op: the same inputs and outputs as
/// [`super::gdn::causal_conv1d_silu`] for f32 `x` (B, S, C), with the gradient to x only (the weight (C, K) and
/// the previous rows are constants). Composed of tensor ops the conv makes and keeps K shifted products of the
/// whole input, and their backward as many again.
pub fn causal_conv1d_silu_fused(x: &Tensor, w: &Tensor, state: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let (b, s, c) = x.dims3()?;
    let k = w.dim(1)?;
    // The weight by tap, each row over the channels.
    let wt = w.detach().to_dtype(DType::F32)?.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let prev = match state {
        Some(st) => st.detach().to_dtype(DType::F32)?,
        None => Tensor::zeros((b, k - 1, c), DType::F32, x.device())?,
    };
    let new_state = if s >= k - 1 {
        x.detach().narrow(1, s - (k - 1), k - 1)?
    } else {
        Tensor::cat(&[&prev, &x.detach()], 1)?.narrow(1, s, k - 1)?
    };
    let prev = prev.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let y = x.contiguous()?.apply_op1(ConvSilu { wt, k, prev })?;
    Ok((y, new_state.contiguous()?))
}

struct ConvSilu {
    /// (K, C): tap j's weight for every channel.
    wt: Vec<f32>,
    k: usize,
    /// (B, K − 1, C): the rows before the first.
    prev: Vec<f32>,
}

impl ConvSilu {
    /// Pre-activation row t of sample `bi` into `out`: Σ_j w_j ∘ x[t − (K − 1) + j], rows before 0 from `prev`.
    #[inline(always)]
    fn pre_row(&self, x: &[f32], bi: usize, t: usize, s: usize, c: usize, out: &mut [f32]) {
        out.fill(0.0);
        for j in 0..self.k {
            let u = t + j; // index into [prev; x]
            let row = if u < self.k - 1 {
                &self.prev[(bi * (self.k - 1) + u) * c..][..c]
            } else {
                &x[(bi * s + u - (self.k - 1)) * c..][..c]
            };
            for ((o, &w), &v) in out.iter_mut().zip(&self.wt[j * c..(j + 1) * c]).zip(row) {
                *o += w * v;
            }
        }
    }
}

crate::nn::amx::wide_fn! {
    /// `o = silu(pre)` elementwise.
    fn silu_into(o: &mut [f32], pre: &[f32]) {
        for (o, &z) in o.iter_mut().zip(pre) {
            *o = z / (1.0 + crate::nn::fused::exp(-z));
        }
    }
}

crate::nn::amx::wide_fn! {
    /// `d = dy · silu'(pre)`, with silu'(z) = σ(z)·(1 + z·(1 − σ(z))).
    fn silu_grad_into(d: &mut [f32], dy: &[f32], pre: &[f32]) {
        for ((d, &g), &z) in d.iter_mut().zip(dy).zip(pre) {
            let sg = 1.0 / (1.0 + crate::nn::fused::exp(-z));
            *d = g * sg * (1.0 + z * (1.0 - sg));
        }
    }
}

/// Rows of the conv each task computes.
const CONV_ROWS: usize = 8;

impl CustomOp1 for ConvSilu {
    fn name(&self) -> &'static str {
        "causal-conv1d-silu"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, s, c) = l.shape().dims3()?;
        let x = match st {
            CpuStorage::F32(v) if l.is_contiguous() => &v[l.start_offset()..l.start_offset() + b * s * c],
            _ => candle_core::bail!("causal conv1d: the input must be contiguous f32"),
        };
        let mut y = vec![0f32; b * s * c];
        y.par_chunks_mut(CONV_ROWS * c).enumerate().for_each(|(ci, out)| {
            let mut pre = vec![0f32; c];
            for (r, o) in out.chunks_exact_mut(c).enumerate() {
                let row = ci * CONV_ROWS + r;
                self.pre_row(x, row / s, row % s, s, c, &mut pre);
                silu_into(o, &pre);
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((b, s, c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, s, c) = arg.dims3()?;
        let k = self.k;
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let dy = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        // dpre = dy · silu'(pre), pre recomputed.
        let mut dpre = vec![0f32; b * s * c];
        dpre.par_chunks_mut(CONV_ROWS * c).enumerate().for_each(|(ci, out)| {
            let mut pre = vec![0f32; c];
            for (r, o) in out.chunks_exact_mut(c).enumerate() {
                let row = ci * CONV_ROWS + r;
                self.pre_row(&x, row / s, row % s, s, c, &mut pre);
                silu_grad_into(o, &dy[row * c..(row + 1) * c], &pre);
            }
        });
        // dx[t] = Σ_j w_j ∘ dpre[t + (K − 1) − j] over the rows that exist.
        let mut dx = vec![0f32; b * s * c];
        dx.par_chunks_mut(CONV_ROWS * c).enumerate().for_each(|(ci, out)| {
            for (r, o) in out.chunks_exact_mut(c).enumerate() {
                let row = ci * CONV_ROWS + r;
                let (bi, t) = (row / s, row % s);
                for j in 0..k {
                    let u = t + (k - 1) - j;
                    if u >= s {
                        continue;
                    }
                    let d = &dpre[(bi * s + u) * c..][..c];
                    for ((o, &w), &g) in o.iter_mut().zip(&self.wt[j * c..(j + 1) * c]).zip(d) {
                        *o += w * g;
                    }
                }
            }
        });
        Ok(Some(Tensor::from_vec(dx, (b, s, c), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::gdn::{delta_rule_recurrent, prepare_qk};
    use super::*;
    use candle_core::{Device, Var};

    fn inputs(n: usize, s: usize, dk: usize, dv: usize, seed: u64) -> Result<[Tensor; 5]> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dev = Device::Cpu;
        let mut rnd =
            |len: usize, lo: f32, hi: f32| -> Vec<f32> { (0..len).map(|_| rng.random_range(lo..hi)).collect() };
        let q = Tensor::from_vec(rnd(n * s * dk, -1.0, 1.0), (n, s, dk), &dev)?;
        let k = Tensor::from_vec(rnd(n * s * dk, -1.0, 1.0), (n, s, dk), &dev)?;
        let v = Tensor::from_vec(rnd(n * s * dv, -1.0, 1.0), (n, s, dv), &dev)?;
        let g = Tensor::from_vec(rnd(n * s, -1.5, -0.01), (n, s), &dev)?;
        let beta = Tensor::from_vec(rnd(n * s, 0.05, 0.95), (n, s), &dev)?;
        let (q, k) = prepare_qk(&q, &k)?;
        Ok([q, k, v, g, beta])
    }

    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let m = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        d / m.max(1e-30)
    }

    #[test]
    fn fused_conv_and_its_gradient_equal_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        for (b, s, c, k, with_state) in [(1, 9, 5, 4, false), (2, 2, 33, 4, true), (2, 20, 17, 3, true)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (b, s, c), &dev)?)?;
            let w = Tensor::randn(0f32, 0.5, (c, k), &dev)?;
            let st = with_state.then(|| Tensor::randn(0f32, 1.0, (b, k - 1, c), &dev)).transpose()?;
            let (want, want_st) = super::super::gdn::causal_conv1d_silu(x.as_tensor(), &w, st.as_ref())?;
            let (got, got_st) = causal_conv1d_silu_fused(x.as_tensor(), &w, st.as_ref())?;
            assert!(rel(&got, &want) < 1e-6, "({b},{s},{c},{k}): {}", rel(&got, &want));
            assert!(rel(&got_st, &want_st) == 0.0, "the new state is the last rows");
            let wo = Tensor::randn(0f32, 1.0, (b, s, c), &dev)?;
            let gw = (want * &wo)?.sum_all()?.backward()?;
            let gg = (got * &wo)?.sum_all()?.backward()?;
            let (p, q) = (gg.get(x.as_tensor()).unwrap(), gw.get(x.as_tensor()).unwrap());
            assert!(rel(p, q) < 1e-5, "({b},{s},{c},{k}) dx: {}", rel(p, q));
        }
        Ok(())
    }

    /// Outputs, final state and every input gradient against candle's autograd through the step-by-step
    /// reference, with and without a starting state, across block boundaries and with a gradient on the state.
    #[test]
    fn fused_rule_and_its_gradients_equal_the_step_by_step_reference() -> Result<()> {
        let dev = Device::Cpu;
        // Value heads of 16·n columns take the AVX-512 kernel where the CPU has it, the others the portable loops;
        // lengths across the blocks of recomputed states (8 and 16 tokens).
        let shapes = [(1, 8, 8, true), (5, 16, 24, false), (37, 16, 8, true), (40, 12, 20, false)];
        let wide = [(1, 4, 16, true), (9, 8, 32, false), (37, 16, 64, true), (20, 8, 128, false)];
        for (s, dk, dv, with_state) in shapes.into_iter().chain(wide) {
            let n = 3;
            let [q, k, v, g, beta] = inputs(n, s, dk, dv, s as u64)?;
            let st = with_state.then(|| Tensor::randn(0f32, 0.5, (n, dk, dv), &dev)).transpose()?;
            let vars: Vec<Var> = [&q, &k, &v, &g, &beta].iter().map(|t| Var::from_tensor(t)).collect::<Result<_>>()?;
            let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            let (o_r, s_r) = delta_rule_recurrent(ts[0], ts[1], ts[2], ts[3], ts[4], st.as_ref())?;
            let (o_f, s_f) = delta_rule_fused(ts[0], ts[1], ts[2], ts[3], ts[4], st.as_ref())?;
            assert!(rel(&o_f, &o_r) < 1e-5, "S={s}: outputs differ by {}", rel(&o_f, &o_r));
            assert!(rel(&s_f, &s_r) < 1e-5, "S={s}: states differ by {}", rel(&s_f, &s_r));
            // A loss that weighs every output and the final state differently.
            let wo = Tensor::randn(0f32, 1.0, o_r.dims(), &dev)?;
            let ws = Tensor::randn(0f32, 1.0, s_r.dims(), &dev)?;
            let loss = |o: &Tensor, st: &Tensor| -> Result<Tensor> { (o * &wo)?.sum_all()? + (st * &ws)?.sum_all()? };
            let g_r = loss(&o_r, &s_r)?.backward()?;
            let g_f = loss(&o_f, &s_f)?.backward()?;
            for (name, v) in ["q", "k", "v", "g", "beta"].iter().zip(&vars) {
                let (a, b) = (g_f.get(v.as_tensor()).expect("fused grad"), g_r.get(v.as_tensor()).expect("ref grad"));
                assert!(rel(a, b) < 2e-5, "S={s} d{name}: rel err {}", rel(a, b));
            }
        }
        Ok(())
    }
}
