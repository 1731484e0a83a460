//! Gated-DeltaNet pieces: the causal depthwise conv1d and the gated delta rule, in a plain recurrent form
//! (the reference, and the decode step) and a chunked matmul form (prefill and training).
//!
//! Reference: transformers `modeling_qwen3_5.py` (`torch_recurrent_gated_delta_rule`,
//! `torch_chunk_gated_delta_rule`, `torch_causal_conv1d_update`). The chunked form replaces the reference's
//! row-by-row forward substitution with the exact product `(I − N)⁻¹ = Π_m (I + N^(2^m))` for the strictly
//! lower-triangular chunk matrix N, so it is built only from matmuls and has a backward pass in candle.

use candle_core::{DType, Result, Tensor, D};

/// Chunk length of the chunked delta rule (the reference uses 64).
pub const CHUNK: usize = 64;

/// Causal depthwise conv1d over time followed by SiLU.
///
/// x: (B, S, C) pre-conv channels; w: (C, K); state: the previous K−1 pre-conv rows (B, K−1, C) or None
/// (zeros). Returns the activated output (B, S, C) and the new state (the last K−1 pre-conv rows).
pub fn causal_conv1d_silu(x: &Tensor, w: &Tensor, state: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let (b, s, c) = x.dims3()?;
    let k = w.dim(1)?;
    let prev = match state {
        Some(st) => st.to_dtype(x.dtype())?,
        None => Tensor::zeros((b, k - 1, c), x.dtype(), x.device())?,
    };
    let padded = Tensor::cat(&[&prev, x], 1)?; // (B, K-1+S, C)
                                               // Accumulate in f32 and round once, as torch's conv1d does for low-precision inputs.
    let (xf, w) = (padded.to_dtype(DType::F32)?, w.to_dtype(DType::F32)?);
    let mut acc: Option<Tensor> = None;
    for j in 0..k {
        // Output t sees inputs t-(K-1) .. t, weight column j multiplies input t-(K-1)+j.
        let term = xf.narrow(1, j, s)?.broadcast_mul(&w.narrow(1, j, 1)?.squeeze(1)?)?;
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    let out = acc.expect("kernel size is at least 1").to_dtype(x.dtype())?.silu()?;
    let new_state = padded.narrow(1, s, k - 1)?;
    Ok((out, new_state))
}

/// The gated delta rule, step by step (exact reference). All inputs f32.
///
/// q, k: (N, S, dk) with q already l2-normalised and scaled, k l2-normalised; v: (N, S, dv); g (log decay)
/// and beta: (N, S); state: (N, dk, dv) or None. Returns o (N, S, dv) and the final state.
pub fn delta_rule_recurrent(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (n, s, dk) = k.dims3()?;
    let dv = v.dim(2)?;
    let mut st = match state {
        Some(x) => x.clone(),
        None => Tensor::zeros((n, dk, dv), DType::F32, q.device())?,
    };
    let decay = g.exp()?;
    let mut outs = Vec::with_capacity(s);
    for t in 0..s {
        let q_t = q.narrow(1, t, 1)?; // (N, 1, dk)
        let k_t = k.narrow(1, t, 1)?;
        let v_t = v.narrow(1, t, 1)?; // (N, 1, dv)
        let d_t = decay.narrow(1, t, 1)?.unsqueeze(2)?; // (N, 1, 1)
        let b_t = beta.narrow(1, t, 1)?.unsqueeze(2)?;
        st = st.broadcast_mul(&d_t)?;
        let kv = k_t.matmul(&st)?; // (N, 1, dv)
        let delta = (v_t - kv)?.broadcast_mul(&b_t)?;
        st = (st + k_t.transpose(1, 2)?.matmul(&delta)?)?;
        outs.push(q_t.matmul(&st)?);
    }
    Ok((Tensor::cat(&outs, 1)?, st))
}

/// The gated delta rule in chunks of [`CHUNK`], same inputs and outputs as [`delta_rule_recurrent`].
pub fn delta_rule_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    delta_rule_chunked_with(q, k, v, g, beta, state, CHUNK)
}

/// [`delta_rule_chunked`] with an explicit chunk length (a power of two).
pub fn delta_rule_chunked_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    state: Option<&Tensor>,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    let (n, s, dk) = k.dims3()?;
    let dv = v.dim(2)?;
    let dev = q.device();
    let c = chunk;
    let pad = (c - s % c) % c;
    let total = s + pad;
    let nc = total / c;
    // Zero padding at the end: beta = 0 and g = 0 make padded steps leave the state unchanged.
    let padt = |x: &Tensor| -> Result<Tensor> {
        if pad == 0 {
            Ok(x.clone())
        } else {
            x.pad_with_zeros(1, 0, pad)
        }
    };
    let (q, k, v, g, beta) = (padt(q)?, padt(k)?, padt(v)?, padt(g)?, padt(beta)?);

    let beta_e = beta.unsqueeze(2)?;
    let k_beta = k.broadcast_mul(&beta_e)?;
    let v_beta = v.broadcast_mul(&beta_e)?;
    let q = q.reshape((n, nc, c, dk))?;
    let k = k.reshape((n, nc, c, dk))?;
    let k_beta = k_beta.reshape((n, nc, c, dk))?;
    let v_beta = v_beta.reshape((n, nc, c, dv))?;
    let g = g.reshape((n, nc, c))?.cumsum(2)?; // within-chunk cumulative log-decay

    let lower = Tensor::tril2(c, DType::F32, dev)?; // 1 on and below the diagonal
    let strict = (&lower - Tensor::eye(c, DType::F32, dev)?)?;
    // decay[i, j] = exp(g_i − g_j) for j <= i, else 0 (masked before exp so the upper part cannot overflow).
    let diff = g.unsqueeze(3)?.broadcast_sub(&g.unsqueeze(2)?)?;
    let decay = diff.broadcast_mul(&lower)?.exp()?.broadcast_mul(&lower)?;

    // N = −strict_lower(k_beta kᵀ ∘ decay); T = (I − N)⁻¹ = Π_m (I + N^(2^m)) since N is nilpotent.
    let kk = k_beta.matmul(&k.transpose(2, 3)?.contiguous()?)?;
    let nmat = kk.mul(&decay)?.broadcast_mul(&strict)?.neg()?;
    let eye = Tensor::eye(c, DType::F32, dev)?;
    let mut t = nmat.broadcast_add(&eye)?;
    let mut p = nmat;
    let mut span = 2;
    while span < c {
        p = p.matmul(&p)?;
        t = t.matmul(&p.broadcast_add(&eye)?)?;
        span *= 2;
    }
    let u = t.matmul(&v_beta)?; // (n, nc, c, dv) pseudo-values
    let w = t.matmul(&k_beta.broadcast_mul(&g.exp()?.unsqueeze(3)?)?)?; // (n, nc, c, dk)

    let attn = q.matmul(&k.transpose(2, 3)?.contiguous()?)?.mul(&decay)?; // causal incl. diagonal
    let q_g = q.broadcast_mul(&g.exp()?.unsqueeze(3)?)?;
    let g_last = g.narrow(2, c - 1, 1)?; // (n, nc, 1)
    let k_tail = k.broadcast_mul(&g_last.broadcast_sub(&g)?.exp()?.unsqueeze(3)?)?.transpose(2, 3)?.contiguous()?;
    let last_decay = g_last.exp()?; // (n, nc, 1)

    let mut st = match state {
        Some(x) => x.clone(),
        None => Tensor::zeros((n, dk, dv), DType::F32, dev)?,
    };
    let mut outs = Vec::with_capacity(nc);
    for i in 0..nc {
        let chunk_of = |x: &Tensor| -> Result<Tensor> { x.narrow(1, i, 1)?.squeeze(1) };
        let v_new = (chunk_of(&u)? - chunk_of(&w)?.matmul(&st)?)?;
        let o = (chunk_of(&q_g)?.matmul(&st)? + chunk_of(&attn)?.matmul(&v_new)?)?;
        outs.push(o);
        let dec = chunk_of(&last_decay)?.unsqueeze(2)?; // (n, 1, 1)
        st = (st.broadcast_mul(&dec)? + chunk_of(&k_tail)?.matmul(&v_new)?)?;
    }
    let o = Tensor::cat(&outs, 1)?; // (n, total, dv)
    let o = if pad == 0 { o } else { o.narrow(1, 0, s)? };
    Ok((o, st))
}

/// Prepares delta-rule inputs as the reference kernel does: l2-normalise q and k (in their dtype), move to
/// f32, scale q by dk^-0.5. q, k: (N, S, dk).
pub fn prepare_qk(q: &Tensor, k: &Tensor) -> Result<(Tensor, Tensor)> {
    let dk = q.dim(D::Minus1)?;
    let q = crate::nn::ops::l2norm(q, 1e-6)?.to_dtype(DType::F32)?;
    let k = crate::nn::ops::l2norm(k, 1e-6)?.to_dtype(DType::F32)?;
    Ok(((q * (1.0 / (dk as f64).sqrt()))?, k))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::Device;

    /// Delta-rule inputs of the shapes given, q and k prepared as the layer prepares them.
    pub(in crate::models::qwen3_5) fn inputs(
        n: usize,
        s: usize,
        dk: usize,
        dv: usize,
        seed: u64,
    ) -> Result<[Tensor; 5]> {
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

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn chunked_equals_recurrent_for_any_length() -> Result<()> {
        // Lengths below, at and across chunk boundaries, not multiples of the chunk.
        for (s, chunk) in [(1, 64), (37, 64), (64, 64), (150, 64), (45, 16), (7, 4)] {
            let [q, k, v, g, beta] = inputs(3, s, 16, 8, s as u64)?;
            let (o_r, s_r) = delta_rule_recurrent(&q, &k, &v, &g, &beta, None)?;
            let (o_c, s_c) = delta_rule_chunked_with(&q, &k, &v, &g, &beta, None, chunk)?;
            assert!(max_diff(&o_r, &o_c) < 1e-5, "S={s}: output differs by {}", max_diff(&o_r, &o_c));
            assert!(max_diff(&s_r, &s_c) < 1e-5, "S={s}: state differs by {}", max_diff(&s_r, &s_c));
        }
        Ok(())
    }

    #[test]
    fn chunked_continues_from_a_state() -> Result<()> {
        let [q, k, v, g, beta] = inputs(2, 90, 8, 8, 7)?;
        let (o_all, s_all) = delta_rule_recurrent(&q, &k, &v, &g, &beta, None)?;
        let part = |x: &Tensor, a: usize, l: usize| x.narrow(1, a, l).unwrap();
        let (o1, s1) = delta_rule_chunked(
            &part(&q, 0, 50),
            &part(&k, 0, 50),
            &part(&v, 0, 50),
            &part(&g, 0, 50),
            &part(&beta, 0, 50),
            None,
        )?;
        let (o2, s2) = delta_rule_chunked(
            &part(&q, 50, 40),
            &part(&k, 50, 40),
            &part(&v, 50, 40),
            &part(&g, 50, 40),
            &part(&beta, 50, 40),
            Some(&s1),
        )?;
        assert!(max_diff(&Tensor::cat(&[&o1, &o2], 1)?, &o_all) < 1e-5);
        assert!(max_diff(&s2, &s_all) < 1e-5);
        Ok(())
    }

    #[test]
    fn conv_state_continues() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 9.0 * 5.0, &dev)?.reshape((2, 9, 5))?.affine(0.01, -0.3)?;
        let w = Tensor::arange(0f32, 20.0, &dev)?.reshape((5, 4))?.affine(0.05, -0.5)?;
        let (full, _) = causal_conv1d_silu(&x, &w, None)?;
        let (a, st) = causal_conv1d_silu(&x.narrow(1, 0, 6)?, &w, None)?;
        let (b, _) = causal_conv1d_silu(&x.narrow(1, 6, 3)?, &w, Some(&st))?;
        assert!(max_diff(&Tensor::cat(&[&a, &b], 1)?, &full) < 1e-6);
        Ok(())
    }
}
