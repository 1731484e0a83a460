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

use crate::nn::fused::{dot16 as dot, f32_slice};

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
        Ok((f32_slice(s, l, "delta rule: the packed input")?, n, t))
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

/// The `wide` kernel `$f` instantiated for value heads of `$dv` = 16·n columns (1 ≤ n ≤ 8).
#[cfg(target_arch = "x86_64")]
macro_rules! by_width {
    ($dv:expr, $f:ident) => {
        match $dv / 16 {
            1 => wide::$f::<1>,
            2 => wide::$f::<2>,
            3 => wide::$f::<3>,
            4 => wide::$f::<4>,
            5 => wide::$f::<5>,
            6 => wide::$f::<6>,
            7 => wide::$f::<7>,
            _ => wide::$f::<8>,
        }
    };
}

/// One head's forward: the AVX-512 kernel for value heads of 16·n columns (n ≤ 8), else the portable loops.
fn forward(x: &[f32], dk: usize, dv: usize, st: &mut [f32], outs: &mut [f32]) {
    // SAFETY: `st` is initialised and the kernel reads and writes it in place.
    unsafe { forward_from(x, dk, dv, None, st.as_mut_ptr(), outs) }
}

/// [`forward`] from the state `src` (or `st` itself) into `st`.
///
/// # Safety
/// `st` (and `src`) point to dk·dv floats; without `src`, `st` holds the state to continue from. With `src` and
/// at least one token, `st` may be uninitialised: every value of it is written.
unsafe fn forward_from(x: &[f32], dk: usize, dv: usize, src: Option<*const f32>, st: *mut f32, outs: &mut [f32]) {
    let steps = outs.len() / dv;
    #[cfg(target_arch = "x86_64")]
    if steps > 0 && dv.is_multiple_of(16) && (16..=128).contains(&dv) && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; the buffers have the sizes the kernel reads (checked by the callers).
        let sweep = by_width!(dv, sweep);
        sweep(x, dk, steps, st, src, Some(outs), None);
        return;
    }
    if let Some(src) = src {
        std::ptr::copy_nonoverlapping(src, st, dk * dv);
    }
    forward_head(x, dk, dv, std::slice::from_raw_parts_mut(st, dk * dv), outs)
}

/// One head's backward, dispatched as [`forward`].
fn backward(x: &[f32], dk: usize, dv: usize, init: Option<&[f32]>, go: &[f32], gx: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if dv.is_multiple_of(16) && (16..=128).contains(&dv) && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: as in `forward`.
        unsafe {
            let backward = by_width!(dv, backward);
            backward(x, dk, init, go, gx)
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

    /// Tokens 0..steps on the state `st` (dk × 16·NV), in place, or starting from `src` (then `st` is only
    /// written: decoding writes the next state without first copying the previous one). Writes each token's
    /// output to `outs`, and with `saved` = (kv, δ, marks) each token's kv and δ and the state before every
    /// BLOCK-th token.
    ///
    /// # Safety
    /// AVX-512F; `x` holds `steps` ≥ 1 packed tokens, `st` (and `src`) dk rows, `outs` and the saved rows `steps`
    /// rows of 16·NV, the marks one state per block; `saved` only without `src`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sweep<const NV: usize>(
        x: &[f32],
        dk: usize,
        steps: usize,
        st: *mut f32,
        src: Option<*const f32>,
        mut outs: Option<&mut [f32]>,
        mut saved: Option<(&mut [f32], &mut [f32], &mut [f32])>,
    ) {
        let dv = 16 * NV;
        if steps == 0 {
            return;
        }
        debug_assert!(src.is_none() || saved.is_none());
        let sp = st;
        // Where token t's rows are read: `src` for the first, then the state written.
        let mut rp = src.unwrap_or(sp);
        // kv of the first token.
        let first = token(x, 0, dk, dv);
        let mut kv = [_mm512_setzero_ps(); NV];
        for r in 0..dk {
            let c = _mm512_set1_ps(first.alpha * first.k[r]);
            let row = load::<NV>(rp.add(r * dv));
            for j in 0..NV {
                kv[j] = _mm512_fmadd_ps(c, row[j], kv[j]);
            }
        }
        for t in 0..steps {
            let tk = token(x, t, dk, dv);
            if let Some((kvs, deltas, marks)) = saved.as_mut() {
                if t % BLOCK == 0 {
                    marks[t / BLOCK * dk * dv..][..dk * dv].copy_from_slice(std::slice::from_raw_parts(sp, dk * dv));
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
                let row = load::<NV>(rp.add(r * dv));
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
            rp = sp;
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
        sweep::<NV>(x, dk, steps, st.as_mut_ptr(), None, None, Some((&mut kvs, &mut deltas, &mut marks)));
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
    let (conv, new_state) = Conv::new(x, w, state, b, s, c)?;
    let y = x.contiguous()?.apply_op1(ConvSilu(conv))?;
    Ok((y, new_state))
}

/// A causal depthwise conv1d with its weight and the rows before the first.
struct Conv {
    /// (K, C): tap j's weight for every channel.
    wt: Vec<f32>,
    k: usize,
    /// (B, K − 1, C): the rows before the first.
    prev: Vec<f32>,
    c: usize,
}

crate::nn::amx::wide_fn! {
    /// `o += w ∘ v`.
    fn add_product(o: &mut [f32], w: &[f32], v: &[f32]) {
        for ((o, &w), &v) in o.iter_mut().zip(w).zip(v) {
            *o += w * v;
        }
    }
}

impl Conv {
    /// The conv of `w` (C, K) over x (B, S, C) continuing from `state` (B, K − 1, C), and the state after x.
    fn new(x: &Tensor, w: &Tensor, state: Option<&Tensor>, b: usize, s: usize, c: usize) -> Result<(Self, Tensor)> {
        let k = w.dim(1)?;
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
        Ok((Self { wt, k, prev, c }, new_state.contiguous()?))
    }

    /// Pre-activation row t of sample `bi`: Σ_j w_j ∘ x[t − (K − 1) + j], rows before 0 from `prev`. Rows of x
    /// are `stride` floats apart, their first C the channels.
    fn pre_row(&self, x: &[f32], stride: usize, bi: usize, t: usize, s: usize, out: &mut [f32]) {
        let (k, c) = (self.k, self.c);
        out.fill(0.0);
        for j in 0..k {
            let u = t + j; // index into [prev; x]
            let row = if u < k - 1 {
                &self.prev[(bi * (k - 1) + u) * c..][..c]
            } else {
                &x[(bi * s + u - (k - 1)) * stride..][..c]
            };
            add_product(out, &self.wt[j * c..(j + 1) * c], row);
        }
    }

    /// Pre-activations and their SiLU for every row, (B·S, C) each.
    fn forward(&self, x: &[f32], stride: usize, b: usize, s: usize) -> (Vec<f32>, Vec<f32>) {
        let c = self.c;
        let (mut pre, mut post) = (vec![0f32; b * s * c], vec![0f32; b * s * c]);
        let rows = |(ci, (pr, po)): (usize, (&mut [f32], &mut [f32]))| {
            for (r, (pr, po)) in pr.chunks_exact_mut(c).zip(po.chunks_exact_mut(c)).enumerate() {
                let row = ci * CONV_ROWS + r;
                self.pre_row(x, stride, row / s, row % s, s, pr);
                silu_into(po, pr);
            }
        };
        if pre.len() < crate::nn::fused::SERIAL_BELOW {
            pre.chunks_mut(CONV_ROWS * c).zip(post.chunks_mut(CONV_ROWS * c)).enumerate().for_each(rows);
        } else {
            pre.par_chunks_mut(CONV_ROWS * c).zip(post.par_chunks_mut(CONV_ROWS * c)).enumerate().for_each(rows);
        }
        (pre, post)
    }

    /// The input gradient from that of the SiLU's output: dpre = dpost · silu'(pre) (in place), then
    /// dx[t] = Σ_j w_j ∘ dpre[t + (K − 1) − j], written to the first C of rows `stride` apart.
    fn backward(&self, dpost: &mut [f32], pre: &[f32], s: usize, dx: &mut [f32], stride: usize) {
        let (k, c) = (self.k, self.c);
        dpost.par_chunks_mut(CONV_ROWS * c).zip(pre.par_chunks(CONV_ROWS * c)).for_each(|(d, p)| {
            for (d, p) in d.chunks_exact_mut(c).zip(p.chunks_exact(c)) {
                silu_grad_inplace(d, p);
            }
        });
        let dpre = &*dpost;
        dx.par_chunks_mut(CONV_ROWS * stride).enumerate().for_each(|(ci, out)| {
            for (r, o) in out.chunks_mut(stride).enumerate() {
                let row = ci * CONV_ROWS + r;
                let (bi, t) = (row / s, row % s);
                let o = &mut o[..c];
                o.fill(0.0);
                for j in 0..k {
                    let u = t + (k - 1) - j;
                    if u < s {
                        add_product(o, &self.wt[j * c..(j + 1) * c], &dpre[(bi * s + u) * c..][..c]);
                    }
                }
            }
        });
    }
}

struct ConvSilu(Conv);

crate::nn::amx::wide_fn! {
    /// `o = silu(pre)` elementwise.
    fn silu_into(o: &mut [f32], pre: &[f32]) {
        for (o, &z) in o.iter_mut().zip(pre) {
            *o = z / (1.0 + crate::nn::fused::exp(-z));
        }
    }
}

crate::nn::amx::wide_fn! {
    /// `d = d · silu'(pre)`, with silu'(z) = σ(z)·(1 + z·(1 − σ(z))).
    fn silu_grad_inplace(d: &mut [f32], pre: &[f32]) {
        for (d, &z) in d.iter_mut().zip(pre) {
            let sg = 1.0 / (1.0 + crate::nn::fused::exp(-z));
            *d *= sg * (1.0 + z * (1.0 - sg));
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
        let x = f32_slice(st, l, "causal conv1d: the input")?;
        let (_, post) = self.0.forward(x, c, b, s);
        Ok((CpuStorage::F32(post), Shape::from((b, s, c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, s, c) = arg.dims3()?;
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dy = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (pre, _) = self.0.forward(&x, c, b, s);
        let mut dx = vec![0f32; b * s * c];
        self.0.backward(&mut dy, &pre, s, &mut dx, c);
        Ok(Some(Tensor::from_vec(dx, (b, s, c), arg.device())?))
    }
}

/// The constants of a Gated-DeltaNet mixer between its projections (none of them trained).
pub struct GdnConsts<'a> {
    /// (C, K) depthwise conv weight over the [q | k | v] channels.
    pub conv: &'a Tensor,
    /// (Hv) `A_log`: the decay rate is −exp(A_log).
    pub a_log: &'a Tensor,
    /// (Hv)
    pub dt_bias: &'a Tensor,
    /// (dv) weight of the gated RMSNorm.
    pub norm: &'a Tensor,
    pub eps: f64,
    pub hk: usize,
    pub hv: usize,
    pub dk: usize,
    pub dv: usize,
}

/// A Gated-DeltaNet mixer from its projections' outputs to the input of `out_proj`, as one CPU op: conv + SiLU,
/// the l2-normalised and scaled q and k (each key head serving Hv / Hk value heads), β = σ(b),
/// g = −exp(A_log)·softplus(a + dt_bias), the delta rule, and the RMSNorm gated by silu(z). mixed (B, S, C), z
/// (B, S, Hv·dv), b and a (B, S, Hv), f32; continues from the conv rows and recurrent state given. Returns the
/// output (B, S, Hv·dv), the conv rows after it and the recurrent state (B·Hv, dk, dv). Gradients flow to mixed,
/// z, b and a; the backward keeps only the packed inputs (the composed ops keep about twenty tensors of this size).
pub fn gated_delta_net_fused(
    mixed: &Tensor,
    z: &Tensor,
    b: &Tensor,
    a: &Tensor,
    consts: &GdnConsts,
    prev_conv: Option<&Tensor>,
    prev_state: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (bsz, s, c) = mixed.dims3()?;
    let GdnConsts { hv, dk, dv, .. } = *consts;
    let (conv, conv_state) = Conv::new(mixed, consts.conv, prev_conv, bsz, s, c)?;
    let inference = [mixed, z, b, a].iter().all(|t| !t.track_op());
    let init = match prev_state {
        Some(st) if !inference => Some(vec1(st)?),
        _ => None,
    };
    let op = GdnCore::new(consts, c, conv, init)?;
    let packed = Tensor::cat(&[mixed, z, b, a], 2)?.contiguous()?;
    if inference {
        // Nothing to differentiate (decoding, evaluation): the state is read where it lies and the new one written
        // once in its final layout, where the op would copy it four times (a decoding step moves little else).
        let prev = match prev_state {
            Some(t) => (0..bsz).map(|bi| t.narrow(0, bi * hv, hv).map(Some)).collect::<Result<Vec<_>>>()?,
            None => vec![None; bsz],
        };
        let (y, mut states) = op.infer_tensors(&packed, &prev)?;
        let state = if states.len() == 1 { states.remove(0) } else { Tensor::cat(&states, 0)? };
        return Ok((y, conv_state, state));
    }
    let out = packed.apply_op1(op)?;
    let y = out.narrow(1, 0, s)?;
    // State rows: (B, dk, Hv, dv) -> (B·Hv, dk, dv).
    let state =
        out.narrow(1, s, dk)?.reshape((bsz, dk, hv, dv))?.transpose(1, 2)?.contiguous()?.reshape((bsz * hv, dk, dv))?;
    Ok((y, conv_state, state))
}

/// [`gated_delta_net_fused`] for the rows of a decoding batch, each a sequence of its own: mixed (B, S, C), z, b
/// and a as there, untracked; `prev[i]` row i's conv rows (1, K − 1, C) and state (Hv, dk, dv), or none for a
/// fresh sequence. Every row's heads run as one parallel loop, and each new state is written without copying the
/// previous one first. Returns the output (B, S, Hv·dv) and each row's conv rows and state after it.
pub fn gated_delta_net_rows(
    mixed: &Tensor,
    z: &Tensor,
    b: &Tensor,
    a: &Tensor,
    consts: &GdnConsts,
    prev: &[Option<(&Tensor, &Tensor)>],
) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
    let (bsz, s, c) = mixed.dims3()?;
    if prev.len() != bsz {
        candle_core::bail!("gated delta net: {} caches for {bsz} rows", prev.len());
    }
    let k = consts.conv.dim(1)?;
    let convs = prev
        .iter()
        .map(|p| match p {
            Some((conv, _)) => conv.to_dtype(DType::F32),
            None => Tensor::zeros((1, k - 1, c), DType::F32, mixed.device()),
        })
        .collect::<Result<Vec<_>>>()?;
    let (conv, conv_state) = Conv::new(mixed, consts.conv, Some(&Tensor::cat(&convs, 0)?), bsz, s, c)?;
    let op = GdnCore::new(consts, c, conv, None)?;
    let packed = Tensor::cat(&[mixed, z, b, a], 2)?.contiguous()?;
    let states: Vec<Option<Tensor>> = prev.iter().map(|p| p.map(|(_, st)| st.clone())).collect();
    let (y, states) = op.infer_tensors(&packed, &states)?;
    let rows = states
        .into_iter()
        .enumerate()
        .map(|(r, st)| Ok((conv_state.narrow(0, r, 1)?, st)))
        .collect::<Result<Vec<_>>>()?;
    Ok((y, rows))
}

fn vec1(t: &Tensor) -> Result<Vec<f32>> {
    t.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

struct GdnCore {
    conv: Conv,
    /// −exp(A_log) per value head.
    neg_a: Vec<f32>,
    dt_bias: Vec<f32>,
    norm: Vec<f32>,
    eps: f32,
    hk: usize,
    hv: usize,
    dk: usize,
    dv: usize,
    /// (B·Hv, dk, dv) state to continue from.
    init: Option<Vec<f32>>,
}

/// softplus as torch computes it: max(x, 0) + log1p(exp(−|x|)).
fn softplus(x: f32) -> f32 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl GdnCore {
    /// The op for `c` mixed channels (checked against the heads) with its conv.
    fn new(consts: &GdnConsts, c: usize, conv: Conv, init: Option<Vec<f32>>) -> Result<Self> {
        let GdnConsts { hk, hv, dk, dv, .. } = *consts;
        if c != 2 * hk * dk + hv * dv || hk == 0 || hv % hk != 0 {
            candle_core::bail!(
                "gated delta net: {c} mixed channels for {hk} key heads of {dk} and {hv} value heads of {dv}"
            );
        }
        Ok(Self {
            conv,
            neg_a: vec1(consts.a_log)?.iter().map(|v| -v.exp()).collect(),
            dt_bias: vec1(consts.dt_bias)?,
            norm: vec1(consts.norm)?,
            eps: consts.eps as f32,
            hk,
            hv,
            dk,
            dv,
            init,
        })
    }

    /// Width of a packed input row: [mixed | z | b | a].
    fn width(&self) -> usize {
        self.conv.c + self.hv * self.dv + 2 * self.hv
    }

    /// The delta-rule rows of value head h of sample bi (S × (2dk + dv + 2): [q̂ | k̂ | v | g | β]) from the
    /// conv's output and the packed input, with each token's 1/‖q‖ and 1/‖k‖.
    fn rule_rows(&self, x: &[f32], post: &[f32], bi: usize, h: usize, s: usize) -> (Vec<f32>, Vec<(f32, f32)>) {
        let (c, dk, dv, hk, hv) = (self.conv.c, self.dk, self.dv, self.hk, self.hv);
        let kh = h / (hv / hk);
        let p = 2 * dk + dv + 2;
        let w = self.width();
        let scale = 1.0 / (dk as f32).sqrt();
        let mut rows = vec![0f32; s * p];
        let mut norms = Vec::with_capacity(s);
        for (t, r) in rows.chunks_exact_mut(p).enumerate() {
            let row = bi * s + t;
            let pc = &post[row * c..(row + 1) * c];
            let (q, k) = (&pc[kh * dk..(kh + 1) * dk], &pc[(hk + kh) * dk..(hk + kh + 1) * dk]);
            let rq = 1.0 / (dot(q, q) + 1e-6).sqrt();
            let rk = 1.0 / (dot(k, k) + 1e-6).sqrt();
            for i in 0..dk {
                r[i] = q[i] * rq * scale;
                r[dk + i] = k[i] * rk;
            }
            r[2 * dk..2 * dk + dv].copy_from_slice(&pc[2 * hk * dk + h * dv..2 * hk * dk + (h + 1) * dv]);
            let xr = &x[row * w..(row + 1) * w];
            let (bb, aa) = (xr[c + hv * dv + h], xr[c + hv * dv + hv + h]);
            r[2 * dk + dv] = self.neg_a[h] * softplus(aa + self.dt_bias[h]);
            r[p - 1] = sigmoid(bb);
            norms.push((rq, rk));
        }
        (rows, norms)
    }

    /// The forward pass without anything kept for a backward: the output (B, S, Hv·dv) and each sample's state
    /// (Hv, dk, dv), continuing from `prev[bi]` (same layout) when given. A state continued over at least one
    /// token is written straight into its new buffer (no copy of the previous one first).
    fn infer(&self, x: &[f32], bsz: usize, s: usize, prev: &[Option<&[f32]>]) -> (Vec<f32>, Vec<Vec<f32>>) {
        let (dk, dv, hv, c) = (self.dk, self.dv, self.hv, self.conv.c);
        let w = self.width();
        let len = hv * dk * dv;
        let (_, post) = self.conv.forward(x, w, bsz, s);
        let ow = hv * dv;
        let mut y = vec![0f32; bsz * s * ow];
        let mut states: Vec<Vec<f32>> = prev
            .iter()
            .map(|p| match p {
                Some(_) if s > 0 => Vec::with_capacity(len),
                Some(p) => p.to_vec(),
                None => vec![0f32; len],
            })
            .collect();
        let dst: Vec<_> = states.iter_mut().map(|v| crate::nn::dpbf16::SendPtr::new(v.as_mut_ptr())).collect();
        let yp = crate::nn::dpbf16::SendPtr::new(y.as_mut_ptr());
        let head = |task: usize| {
            let (bi, h) = (task / hv, task % hv);
            let (rows, _) = self.rule_rows(x, &post, bi, h, s);
            let mut o = vec![0f32; s * dv];
            let src = prev[bi].filter(|_| s > 0).map(|p| p[h * dk * dv..].as_ptr());
            // SAFETY: head h's dk·dv values of sample bi's buffer (its capacity), written by this task alone; with
            // `src` every one of them is written, otherwise they hold the state to continue.
            unsafe { forward_from(&rows, dk, dv, src, dst[bi].at(h * dk * dv), &mut o) };
            let mut out = vec![0f32; dv];
            for t in 0..s {
                let row = bi * s + t;
                let z = &x[row * w + c + h * dv..][..dv];
                gated_norm(&mut out, &o[t * dv..(t + 1) * dv], z, &self.norm, self.eps);
                // SAFETY: row t of sample bi, columns h·dv.., belong to this task alone.
                unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), yp.at(row * ow + h * dv), dv) };
            }
        };
        if bsz * hv * s * dk * dv < 8 * crate::nn::fused::SERIAL_BELOW {
            (0..bsz * hv).for_each(head);
        } else {
            (0..bsz * hv).into_par_iter().for_each(head);
        }
        for (v, p) in states.iter_mut().zip(prev) {
            if p.is_some() && s > 0 {
                // SAFETY: every head wrote its dk·dv values above.
                unsafe { v.set_len(len) };
            }
        }
        (y, states)
    }

    /// [`GdnCore::infer`] on tensors: the packed input (B, S, width) and each sample's state (Hv, dk, dv) or none.
    /// Returns the output (B, S, Hv·dv) and each sample's new state.
    fn infer_tensors(&self, packed: &Tensor, prev: &[Option<Tensor>]) -> Result<(Tensor, Vec<Tensor>)> {
        let (bsz, s, _) = packed.dims3()?;
        let (dk, dv, hv) = (self.dk, self.dv, self.hv);
        let prev = prev.iter().map(|t| t.as_ref().map(|t| t.contiguous()).transpose()).collect::<Result<Vec<_>>>()?;
        let guards: Vec<_> = prev.iter().map(|t| t.as_ref().map(|t| t.storage_and_layout())).collect();
        let mut slices = Vec::with_capacity(bsz);
        for g in &guards {
            slices.push(match g {
                Some((st, l)) => match &**st {
                    Storage::Cpu(cs) => {
                        let v = f32_slice(cs, l, "gated delta net: the state")?;
                        if v.len() != hv * dk * dv {
                            candle_core::bail!(
                                "gated delta net: a state of {} values for {hv} heads of {dk}×{dv}",
                                v.len()
                            );
                        }
                        Some(v)
                    }
                    _ => candle_core::bail!("gated delta net: the state is not on the CPU"),
                },
                None => None,
            });
        }
        if slices.len() != bsz {
            candle_core::bail!("gated delta net: {} states for {bsz} samples", slices.len());
        }
        let (ps, pl) = packed.storage_and_layout();
        let Storage::Cpu(ps) = &*ps else { candle_core::bail!("gated delta net: the input is not on the CPU") };
        let x = f32_slice(ps, pl, "gated delta net: the packed input")?;
        let (y, states) = self.infer(x, bsz, s, &slices);
        let dev = packed.device();
        let states = states.into_iter().map(|v| Tensor::from_vec(v, (hv, dk, dv), dev)).collect::<Result<_>>()?;
        Ok((Tensor::from_vec(y, (bsz, s, hv * dv), dev)?, states))
    }

    fn init_of(&self, bi: usize, h: usize) -> Option<&[f32]> {
        let len = self.dk * self.dv;
        self.init.as_ref().map(|v| &v[(bi * self.hv + h) * len..(bi * self.hv + h + 1) * len])
    }
}

impl CustomOp1 for GdnCore {
    fn name(&self) -> &'static str {
        "gated-delta-net"
    }

    /// Output (B, S + dk, Hv·dv): the mixer's output rows, then each value head's final state in its columns.
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (bsz, s, w) = l.shape().dims3()?;
        let (dk, dv, hv, c) = (self.dk, self.dv, self.hv, self.conv.c);
        if w != self.width() {
            candle_core::bail!("gated delta net: packed width {w}, expected {}", self.width());
        }
        let x = f32_slice(st, l, "gated delta net: the packed input")?;
        let (_, post) = self.conv.forward(x, w, bsz, s);
        let ow = hv * dv;
        let mut out = vec![0f32; bsz * (s + dk) * ow];
        let op = crate::nn::dpbf16::SendPtr::new(out.as_mut_ptr());
        let head = |task: usize| {
            let (bi, h) = (task / hv, task % hv);
            let (rows, _) = self.rule_rows(x, &post, bi, h, s);
            let mut stt = self.init_of(bi, h).map_or_else(|| vec![0f32; dk * dv], |v| v.to_vec());
            let mut o = vec![0f32; s * dv];
            forward(&rows, dk, dv, &mut stt, &mut o);
            let mut y = vec![0f32; dv];
            for t in 0..s {
                let row = bi * s + t;
                let z = &x[row * w + c + h * dv..][..dv];
                gated_norm(&mut y, &o[t * dv..(t + 1) * dv], z, &self.norm, self.eps);
                // SAFETY: row t of sample bi, columns h·dv.., belong to this task alone.
                unsafe { std::ptr::copy_nonoverlapping(y.as_ptr(), op.at((bi * (s + dk) + t) * ow + h * dv), dv) };
            }
            for i in 0..dk {
                // SAFETY: as above, in the state rows.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        stt[i * dv..].as_ptr(),
                        op.at((bi * (s + dk) + s + i) * ow + h * dv),
                        dv,
                    )
                };
            }
        };
        // A decoding step's state is small next to handing each head to the pool (at the 4B shapes it is not).
        if bsz * hv * s * dk * dv < 8 * crate::nn::fused::SERIAL_BELOW {
            (0..bsz * hv).for_each(head);
        } else {
            (0..bsz * hv).into_par_iter().for_each(head);
        }
        Ok((CpuStorage::F32(out), Shape::from((bsz, s + dk, ow))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (bsz, s, w) = arg.dims3()?;
        let (dk, dv, hk, hv, c) = (self.dk, self.dv, self.hk, self.hv, self.conv.c);
        let (arg, grad) = (arg.contiguous()?, grad.contiguous()?);
        let (xs, xl) = arg.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(xs)), Storage::Cpu(CpuStorage::F32(gs))) = (&*xs, &*gs) else {
            candle_core::bail!("gated delta net backward: expected f32 CPU tensors")
        };
        let ow = hv * dv;
        let x = &xs[xl.start_offset()..xl.start_offset() + bsz * s * w];
        let gy = &gs[gl.start_offset()..gl.start_offset() + bsz * (s + dk) * ow];
        let (pre, post) = self.conv.forward(x, w, bsz, s);
        let mut dpost = vec![0f32; bsz * s * c];
        let mut dx = vec![0f32; bsz * s * w];
        let (dpp, dxp) =
            (crate::nn::dpbf16::SendPtr::new(dpost.as_mut_ptr()), crate::nn::dpbf16::SendPtr::new(dx.as_mut_ptr()));
        let p = 2 * dk + dv + 2;
        let rep = hv / hk;
        let scale = 1.0 / (dk as f32).sqrt();
        // One task per key head: its value heads add into the same q and k channels.
        (0..bsz * hk).into_par_iter().for_each(|task| {
            let (bi, kh) = (task / hk, task % hk);
            for h in kh * rep..(kh + 1) * rep {
                let (rows, norms) = self.rule_rows(x, &post, bi, h, s);
                let init = self.init_of(bi, h);
                let mut stt = init.map_or_else(|| vec![0f32; dk * dv], |v| v.to_vec());
                let mut o = vec![0f32; s * dv];
                forward(&rows, dk, dv, &mut stt, &mut o);
                // Through the gated norm: dz into dx, do into go; the state rows' gradient as given.
                let mut go = vec![0f32; (s + dk) * dv];
                let mut dz = vec![0f32; dv];
                for t in 0..s {
                    let row = bi * s + t;
                    let z = &x[row * w + c + h * dv..][..dv];
                    let dy = &gy[(bi * (s + dk) + t) * ow + h * dv..][..dv];
                    gated_norm_grad(
                        &mut go[t * dv..(t + 1) * dv],
                        &mut dz,
                        dy,
                        &o[t * dv..(t + 1) * dv],
                        z,
                        &self.norm,
                        self.eps,
                    );
                    // SAFETY: z's columns of value head h in this row belong to this task alone.
                    unsafe { std::ptr::copy_nonoverlapping(dz.as_ptr(), dxp.at(row * w + c + h * dv), dv) };
                }
                for i in 0..dk {
                    go[(s + i) * dv..(s + i + 1) * dv]
                        .copy_from_slice(&gy[(bi * (s + dk) + s + i) * ow + h * dv..][..dv]);
                }
                let mut gx = vec![0f32; s * p];
                backward(&rows, dk, dv, init, &go, &mut gx);
                for t in 0..s {
                    let row = bi * s + t;
                    let (g, r) = (&gx[t * p..(t + 1) * p], &rows[t * p..(t + 1) * p]);
                    let (rq, rk) = norms[t];
                    let pc = &post[row * c..(row + 1) * c];
                    // q̂ = s·q/‖q‖: dq = s·(rq·dq̂ − rq³·(q·dq̂)·q); k̂ likewise without s.
                    let (q, k) = (&pc[kh * dk..(kh + 1) * dk], &pc[(hk + kh) * dk..(hk + kh + 1) * dk]);
                    let (qd, kd) = (dot(q, &g[..dk]), dot(k, &g[dk..2 * dk]));
                    for i in 0..dk {
                        // SAFETY: q and k channels of key head kh (this task's) and v channels of head h in row.
                        unsafe {
                            *dpp.at(row * c + kh * dk + i) += scale * (rq * g[i] - rq * rq * rq * qd * q[i]);
                            *dpp.at(row * c + (hk + kh) * dk + i) += rk * g[dk + i] - rk * rk * rk * kd * k[i];
                        }
                    }
                    for j in 0..dv {
                        // SAFETY: as above.
                        unsafe { *dpp.at(row * c + 2 * hk * dk + h * dv + j) = g[2 * dk + j] };
                    }
                    // β = σ(b): db = dβ·β·(1 − β); g = −e^A·softplus(a + dt): da = dg·(−e^A)·σ(a + dt).
                    let xr = &x[row * w..(row + 1) * w];
                    let beta = r[p - 1];
                    let aa = xr[c + hv * dv + hv + h] + self.dt_bias[h];
                    // SAFETY: b's and a's columns of value head h belong to this task alone.
                    unsafe {
                        *dxp.at(row * w + c + hv * dv + h) = g[p - 1] * beta * (1.0 - beta);
                        *dxp.at(row * w + c + hv * dv + hv + h) = g[p - 2] * self.neg_a[h] * sigmoid(aa);
                    }
                }
            }
        });
        self.conv.backward(&mut dpost, &pre, s, &mut dx, w);
        Ok(Some(Tensor::from_vec(dx, (bsz, s, w), arg.device())?))
    }
}

crate::nn::amx::wide_fn! {
    /// One token of the gated RMSNorm: y = o·r·w·silu(z), r = rsqrt(mean(o²) + eps).
    fn gated_norm(y: &mut [f32], o: &[f32], z: &[f32], w: &[f32], eps: f32) {
        let r = 1.0 / (dot(o, o) / o.len() as f32 + eps).sqrt();
        for (((y, &o), &z), &w) in y.iter_mut().zip(o).zip(z).zip(w) {
            *y = o * r * w * (z / (1.0 + crate::nn::fused::exp(-z)));
        }
    }
}

crate::nn::amx::wide_fn! {
    /// The gradients of [`gated_norm`] for one token: with u = o·r, dz = dy·u·w·silu'(z), du = dy·w·silu(z) and
    /// do = r·du − (r³/n)·(o·du)·o.
    fn gated_norm_grad(d_o: &mut [f32], dz: &mut [f32], dy: &[f32], o: &[f32], z: &[f32], w: &[f32], eps: f32) {
        let n = o.len() as f32;
        let r = 1.0 / (dot(o, o) / n + eps).sqrt();
        for (((((d_o, dz), &dy), &o), &z), &w) in d_o.iter_mut().zip(dz.iter_mut()).zip(dy).zip(o).zip(z).zip(w) {
            let sg = 1.0 / (1.0 + crate::nn::fused::exp(-z));
            *dz = dy * o * r * w * sg * (1.0 + z * (1.0 - sg));
            *d_o = dy * w * z * sg;
        }
        let c = r * r * r / n * dot(o, d_o);
        for (d_o, &o) in d_o.iter_mut().zip(o) {
            *d_o = r * *d_o - c * o;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::gdn::delta_rule_recurrent;
    use super::super::gdn::tests::inputs;
    use super::*;
    use crate::nn::fused::tests::rel;
    use candle_core::{Device, Var};

    /// The whole mixer between the projections against the composed ops (conv, gates, l2 norms, the step-by-step
    /// rule, the gated norm): outputs, states and the gradients of all four inputs, fresh and continuing.
    #[test]
    fn fused_mixer_and_its_gradients_equal_the_composed_ops() -> Result<()> {
        use crate::nn::ops;
        let dev = Device::Cpu;
        for (bsz, s, hk, hv, dk, dv, cont) in [
            (1, 9, 1, 2, 8, 16, false),
            (2, 21, 2, 4, 8, 32, true),
            (1, 3, 1, 1, 4, 8, true),
            (2, 1, 1, 2, 8, 96, true),
        ] {
            let c = 2 * hk * dk + hv * dv;
            let kk = 4;
            let var = |shape: &[usize], sd: f32| Var::from_tensor(&Tensor::randn(0f32, sd, shape, &dev).unwrap());
            let (mixed, z, b, a) = (
                var(&[bsz, s, c], 1.0)?,
                var(&[bsz, s, hv * dv], 1.0)?,
                var(&[bsz, s, hv], 1.0)?,
                var(&[bsz, s, hv], 1.0)?,
            );
            let conv = Tensor::randn(0f32, 0.5, (c, kk), &dev)?;
            let a_log = Tensor::randn(0f32, 1.0, hv, &dev)?;
            let dt_bias = Tensor::randn(0f32, 0.5, hv, &dev)?;
            let norm = Tensor::randn(1f32, 0.2, dv, &dev)?;
            let prev_conv = cont.then(|| Tensor::randn(0f32, 1.0, (bsz, kk - 1, c), &dev)).transpose()?;
            let prev_state = cont.then(|| Tensor::randn(0f32, 0.3, (bsz * hv, dk, dv), &dev)).transpose()?;
            let consts =
                GdnConsts { conv: &conv, a_log: &a_log, dt_bias: &dt_bias, norm: &norm, eps: 1e-6, hk, hv, dk, dv };
            let (y, cs, st) = gated_delta_net_fused(
                mixed.as_tensor(),
                z.as_tensor(),
                b.as_tensor(),
                a.as_tensor(),
                &consts,
                prev_conv.as_ref(),
                prev_state.as_ref(),
            )?;
            // The composed reference, as GatedDeltaNet computes it.
            let (post, cs_ref) = super::super::gdn::causal_conv1d_silu(mixed.as_tensor(), &conv, prev_conv.as_ref())?;
            let q = post.narrow(2, 0, hk * dk)?.reshape((bsz, s, hk, dk))?;
            let k = post.narrow(2, hk * dk, hk * dk)?.reshape((bsz, s, hk, dk))?;
            let v = post.narrow(2, 2 * hk * dk, hv * dv)?.reshape((bsz, s, hv, dv))?;
            let rep = hv / hk;
            let spread = |x: &Tensor| x.unsqueeze(3)?.broadcast_as((bsz, s, hk, rep, dk))?.reshape((bsz, s, hv, dk));
            let heads = |x: &Tensor, d: usize| x.transpose(1, 2)?.contiguous()?.reshape((bsz * hv, s, d));
            let (qn, kn) = super::super::gdn::prepare_qk(&heads(&spread(&q)?, dk)?, &heads(&spread(&k)?, dk)?)?;
            let beta = ops::sigmoid(b.as_tensor())?.transpose(1, 2)?.contiguous()?.reshape((bsz * hv, s))?;
            let g = ops::softplus(&a.as_tensor().broadcast_add(&dt_bias)?)?.broadcast_mul(&a_log.exp()?.neg()?)?;
            let g = g.transpose(1, 2)?.contiguous()?.reshape((bsz * hv, s))?;
            let (o, st_ref) =
                super::super::gdn::delta_rule_recurrent(&qn, &kn, &heads(&v, dv)?, &g, &beta, prev_state.as_ref())?;
            let o = o.reshape((bsz, hv, s, dv))?.transpose(1, 2)?;
            let zr = z.as_tensor().reshape((bsz, s, hv, dv))?;
            let y_ref = ops::rms_norm_gated(&o, &norm, &zr, 1e-6)?.reshape((bsz, s, hv * dv))?;
            assert!(rel(&y, &y_ref) < 1e-5, "output: {}", rel(&y, &y_ref));
            assert!(rel(&st, &st_ref) < 1e-5, "state: {}", rel(&st, &st_ref));
            assert_eq!(rel(&cs, &cs_ref), 0.0, "conv rows");
            // Without anything to differentiate (decoding) the mixer skips the op and its copies: same numbers.
            let (yi, csi, sti) = gated_delta_net_fused(
                &mixed.as_tensor().detach(),
                &z.as_tensor().detach(),
                &b.as_tensor().detach(),
                &a.as_tensor().detach(),
                &consts,
                prev_conv.as_ref(),
                prev_state.as_ref(),
            )?;
            assert!(!yi.track_op());
            for (name, p, q) in [("output", &yi, &y), ("conv rows", &csi, &cs), ("state", &sti, &st)] {
                assert_eq!(rel(p, q), 0.0, "inference {name}");
            }
            let wo = Tensor::randn(0f32, 1.0, y.dims(), &dev)?;
            let ws = Tensor::randn(0f32, 1.0, st.dims(), &dev)?;
            let gf = ((y * &wo)?.sum_all()? + (st * &ws)?.sum_all()?)?.backward()?;
            let gr = ((y_ref * &wo)?.sum_all()? + (st_ref * &ws)?.sum_all()?)?.backward()?;
            for (name, v) in [("mixed", &mixed), ("z", &z), ("b", &b), ("a", &a)] {
                let (p, q) = (gf.get(v.as_tensor()).unwrap(), gr.get(v.as_tensor()).unwrap());
                assert!(rel(p, q) < 2e-5, "d{name}: {}", rel(p, q));
            }
        }
        Ok(())
    }

    /// A decoding batch's rows through one op: each row's output, conv rows and state equal the row alone, bit
    /// for bit (rows with a state and a fresh one; value heads on the AVX-512 kernel and on the portable loops).
    #[test]
    fn mixer_rows_together_equal_each_row_alone() -> Result<()> {
        let dev = Device::Cpu;
        for (hk, hv, dk, dv) in [(1, 2, 8, 96), (2, 4, 8, 24)] {
            let (bsz, c, kk) = (3, 2 * hk * dk + hv * dv, 4);
            let rnd = |shape: &[usize], sd: f32| Tensor::randn(0f32, sd, shape, &dev);
            let (mixed, z, b, a) = (
                rnd(&[bsz, 1, c], 1.0)?,
                rnd(&[bsz, 1, hv * dv], 1.0)?,
                rnd(&[bsz, 1, hv], 1.0)?,
                rnd(&[bsz, 1, hv], 1.0)?,
            );
            let conv = rnd(&[c, kk], 0.5)?;
            let (a_log, dt_bias, norm) = (rnd(&[hv], 1.0)?, rnd(&[hv], 0.5)?, (rnd(&[dv], 0.2)? + 1.0)?);
            let consts =
                GdnConsts { conv: &conv, a_log: &a_log, dt_bias: &dt_bias, norm: &norm, eps: 1e-6, hk, hv, dk, dv };
            let caches = [
                Some((rnd(&[1, kk - 1, c], 1.0)?, rnd(&[hv, dk, dv], 0.3)?)),
                None,
                Some((rnd(&[1, kk - 1, c], 1.0)?, rnd(&[hv, dk, dv], 0.3)?)),
            ];
            let prev: Vec<_> = caches.iter().map(|p| p.as_ref().map(|(c, s)| (c, s))).collect();
            let (y, next) = gated_delta_net_rows(&mixed, &z, &b, &a, &consts, &prev)?;
            for r in 0..bsz {
                let row = |t: &Tensor| t.narrow(0, r, 1);
                let (cp, sp) = (prev[r].map(|p| p.0), prev[r].map(|p| p.1));
                let (y1, c1, s1) =
                    gated_delta_net_fused(&row(&mixed)?, &row(&z)?, &row(&b)?, &row(&a)?, &consts, cp, sp)?;
                for (name, p, q) in
                    [("output", &row(&y)?, &y1), ("conv rows", &next[r].0, &c1), ("state", &next[r].1, &s1)]
                {
                    assert_eq!(rel(p, q), 0.0, "dv={dv} row {r}: {name}");
                }
            }
            // The previous states are read, not written: a cache cloned before the step still holds them.
            let again = gated_delta_net_rows(&mixed, &z, &b, &a, &consts, &prev)?;
            assert_eq!(rel(&again.0, &y), 0.0);
        }
        Ok(())
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
        let wide = [
            (1, 4, 16, true),
            (9, 8, 32, false),
            (37, 16, 64, true),
            (20, 8, 128, false),
            (11, 8, 96, true),
            (3, 4, 48, false),
        ];
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
