//! `x @ Wᵀ` for a frozen weight, as a custom op whose backward returns only dX.
//!
//! candle's matmul backward always computes and keeps the weight's gradient, even when the weight is a
//! plain (untracked) tensor: for a frozen base that is a full f32 copy of every linear weight per backward
//! pass. This op computes the same product and never touches a gradient for W.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

struct FrozenMatmul {
    /// (out, in), not tracked.
    w: Tensor,
}

impl FrozenMatmul {
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize)> {
        let (m, k) = l.shape().dims2()?;
        let (n, k2) = self.w.dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: input has {k} features, weight expects {k2}");
        }
        Ok((m, n, k))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, n, k) = self.dims(l)?;
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*ws else { candle_core::bail!("frozen matmul: weight and input on different devices") };
        let out = s.matmul(w, (1, m, n, k), l, &wl.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k) = self.dims(l)?;
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cuda(w) = &*ws else { candle_core::bail!("frozen matmul: weight and input on different devices") };
        let out = s.matmul(w, (1, m, n, k), l, &wl.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// x: (M, K) @ Wᵀ with W: (N, K) frozen -> (M, N). Gradients flow to x only.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x = if x.dtype() != w.dtype() { x.to_dtype(w.dtype())? } else { x.clone() };
    x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })
}
