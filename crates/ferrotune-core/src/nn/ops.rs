//! Differentiable functional ops, with the precision rules of the reference (transformers): norms, softmax,
//! rotary embeddings and the delta rule run in f32 whatever the activation dtype, and cast back.

use candle_core::{DType, Result, Tensor, D};

/// `x * rsqrt(mean(x², -1) + eps)` in f32.
fn rms_normalize_f32(x: &Tensor, eps: f64) -> Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    xf.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)
}

/// Qwen3.5's zero-centred RMSNorm: `norm(x) * (1 + w)` in f32, cast back to x's dtype.
/// `one_plus_w` is the stored weight plus one, precomputed in f32 at load time.
pub fn rms_norm_1p(x: &Tensor, one_plus_w: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(y) = super::fused::rms_norm(x, one_plus_w, eps)? {
        return Ok(y);
    }
    rms_normalize_f32(x, eps)?.broadcast_mul(one_plus_w)?.to_dtype(x.dtype())
}

/// The gated RMSNorm of Gated-DeltaNet: `w * norm(x)` (plain weight) times `silu(gate)`, computed as the
/// reference does (normalise in f32, cast, scale, gate in f32, cast).
pub fn rms_norm_gated(x: &Tensor, w: &Tensor, gate: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let normed = rms_normalize_f32(x, eps)?.to_dtype(dtype)?.broadcast_mul(w)?;
    let g = gate.to_dtype(DType::F32)?.silu()?;
    normed.to_dtype(DType::F32)?.mul(&g)?.to_dtype(dtype)
}

/// LayerNorm over the last dim with weight and bias (biased variance, as torch).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    // torch applies weight and bias in f32 and rounds once.
    y.broadcast_mul(&w.to_dtype(DType::F32)?)?.broadcast_add(&b.to_dtype(DType::F32)?)?.to_dtype(dtype)
}

/// Softmax over the last dim, computed in f32 and cast back.
pub fn softmax_f32(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let max = xf.max_keepdim(D::Minus1)?.detach();
    let e = xf.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(dtype)
}

pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::sigmoid(x)
}

/// `log(1 + exp(x))` as torch computes it (linear above 20), in a form that cannot overflow.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    // max(x, 0) + log1p(exp(-|x|)) equals softplus everywhere; torch switches to x above 20, where the two agree
    // to f32 precision.
    let pos = x.relu()?;
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    pos + tail
}

/// `x * rsqrt(sum(x², -1) + eps)`, the l2 normalisation of the delta-rule keys and queries. The sum is
/// accumulated in f32 (as torch does for bf16 inputs), the result is in x's dtype.
pub fn l2norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?;
    let inv = (xf.sqr()?.sum_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv.to_dtype(x.dtype())?)
}

/// `cat(-x[.., d/2..], x[.., ..d/2])`.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Rotary embedding on the first `cos.dim(-1)` channels of `x` (the rest pass through), computed in x's dtype
/// with cos/sin cast to it, as the text model of the reference does. `x`: (.., S, D); `cos`, `sin`:
/// broadcastable to (.., S, rot).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let rot = cos.dim(D::Minus1)?;
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    let (x_rot, x_pass) = if rot == d {
        (x.clone(), None)
    } else {
        (x.narrow(D::Minus1, 0, rot)?, Some(x.narrow(D::Minus1, rot, d - rot)?))
    };
    let y = (x_rot.broadcast_mul(&cos)? + rotate_half(&x_rot)?.broadcast_mul(&sin)?)?;
    match x_pass {
        Some(p) => Tensor::cat(&[&y, &p], D::Minus1),
        None => Ok(y),
    }
}

/// [`apply_rope`] computed in f32 and cast back (the vision tower's variant).
pub fn apply_rope_f32(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    apply_rope(&f(x)?, &f(cos)?, &f(sin)?)?.to_dtype(x.dtype())
}

/// `GELU` with the tanh approximation (`gelu_pytorch_tanh`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// Exact (erf) GELU, torch's `nn.GELU()`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// Activation by its config name.
pub fn activation(x: &Tensor, name: &str) -> Result<Tensor> {
    match name {
        "silu" | "swish" => x.silu(),
        "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => x.gelu(),
        "gelu" => x.gelu_erf(),
        "quick_gelu" => x.broadcast_mul(&sigmoid(&(x * 1.702)?)?),
        other => Err(candle_core::Error::Msg(format!(
            "unsupported activation {other:?} (supported: silu, gelu, gelu_pytorch_tanh, quick_gelu)"
        ))),
    }
}

/// Scaled dot-product attention with an optional additive mask, computed in f32 (torch's CPU SDPA kernels
/// accumulate low-precision inputs in f32 too) and returned in q's dtype.
/// q: (B, H, S, D), k/v: (B, H, T, D), mask: broadcastable to (B, H, S, T).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let f = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let scores = (f(q)?.matmul(&f(&k.t()?)?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(DType::F32)?)?,
        None => scores,
    };
    softmax_f32(&scores)?.matmul(&f(v)?)?.to_dtype(q.dtype())
}

/// Additive causal mask (0 on and below the diagonal shifted by `offset`, -inf above): (S, offset + S).
/// Built on the device from two index ranges: on a GPU a host-built mask would be an S×T upload per layer.
pub fn causal_mask(s: usize, offset: usize, device: &candle_core::Device) -> Result<Tensor> {
    let t = offset + s;
    let rows = Tensor::arange(offset as u32, t as u32, device)?.reshape((s, 1))?;
    let cols = Tensor::arange(0u32, t as u32, device)?.reshape((1, t))?;
    let future = cols.broadcast_gt(&rows)?;
    let zero = Tensor::zeros((s, t), DType::F32, device)?;
    let ninf = Tensor::full(f32::NEG_INFINITY, (s, t), device)?;
    future.where_cond(&ninf, &zero)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_is_zero_on_and_below_the_shifted_diagonal() -> Result<()> {
        let m: Vec<Vec<f32>> = causal_mask(2, 1, &candle_core::Device::Cpu)?.to_vec2()?;
        let ninf = f32::NEG_INFINITY;
        assert_eq!(m, vec![vec![0.0, 0.0, ninf], vec![0.0, 0.0, 0.0]]);
        Ok(())
    }
}
