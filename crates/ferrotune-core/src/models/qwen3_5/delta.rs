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

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Tokens whose states the backward pass recomputes and keeps at once (16 states of 64 KiB at the 4B shapes).
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
            forward_head(&x[h * t * p..(h + 1) * t * p], dk, dv, st, outs);
        });
        Ok((CpuStorage::F32(out), Shape::from((n, t + dk, dv))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (dk, dv) = (self.dk, self.dv);
        let (n, t, p) = arg.dims3()?;
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let gr = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut gx = vec![0f32; n * t * p];
        gx.par_chunks_mut(t * p).enumerate().for_each(|(h, gxh)| {
            let go = &gr[h * (t + dk) * dv..(h + 1) * (t + dk) * dv];
            backward_head(&x[h * t * p..(h + 1) * t * p], dk, dv, self.init_of(h), go, gxh);
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

/// Sum of products with 16 independent lanes (one vector register once compiled for AVX-512).
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
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    acc.iter().sum::<f32>() + s
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

    /// Outputs, final state and every input gradient against candle's autograd through the step-by-step
    /// reference, with and without a starting state, across block boundaries and with a gradient on the state.
    #[test]
    fn fused_rule_and_its_gradients_equal_the_step_by_step_reference() -> Result<()> {
        let dev = Device::Cpu;
        for (s, dk, dv, with_state) in [(1, 8, 8, true), (5, 16, 24, false), (37, 16, 8, true), (40, 12, 20, false)] {
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
