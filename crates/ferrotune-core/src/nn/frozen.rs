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
        // Decoding multiplies one row at a time: a general GEMM would repack all of W for every token, so
        // stream W's rows instead (memory-bound, no copies).
        if let (CpuStorage::F32(xs), CpuStorage::F32(wsl)) = (s, w) {
            if m <= SMALL_M && l.is_contiguous() && wl.is_contiguous() {
                let x = &xs[l.start_offset()..l.start_offset() + m * k];
                let wv = &wsl[wl.start_offset()..wl.start_offset() + n * k];
                return Ok((CpuStorage::F32(small_m_matmul(x, wv, m, n, k)), Shape::from((m, n))));
            }
        }
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
        // An upstream gradient can arrive strided (from a narrow or a transpose); the CUDA matmul accepts fewer
        // layouts than the CPU one, and this is a no-op for a contiguous gradient.
        Ok(Some(grad.contiguous()?.matmul(&self.w)?))
    }
}

/// Rows of x up to which the streaming kernel beats GEMM (measured on AVX-512: GEMM wins from ~8 rows on).
const SMALL_M: usize = 4;

/// y[i][j] = x[i] · w[j] for a few rows of x: each weight row is read once and dotted with every x row.
fn small_m_matmul(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut y = vec![0f32; m * n];
    // Output columns in blocks so threads share nothing; within a block, rows of W stream sequentially.
    let block = 64;
    let cols: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            let (j0, j1) = (b * block, ((b + 1) * block).min(n));
            let mut out = vec![0f32; m * (j1 - j0)];
            for j in j0..j1 {
                let wr = &w[j * k..(j + 1) * k];
                for i in 0..m {
                    out[i * (j1 - j0) + (j - j0)] = dot(&x[i * k..(i + 1) * k], wr);
                }
            }
            (j0, out)
        })
        .collect();
    for (j0, out) in cols {
        let width = out.len() / m;
        for i in 0..m {
            y[i * n + j0..i * n + j0 + width].copy_from_slice(&out[i * width..(i + 1) * width]);
        }
    }
    y
}

/// Dot product with 16 independent accumulators (wide SIMD lanes once vectorised); compiled for AVX-512 / AVX2
/// when the CPU has them, since the default target only allows SSE2.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dot_avx512(a, b) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_plain(a, b)
}

#[inline(always)]
fn dot_plain(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for t in 0..16 {
            acc[t] += x[t] * y[t];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_plain(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_plain(a, b)
}

/// x: (M, K) @ Wᵀ with W: (N, K) frozen -> (M, N). Gradients flow to x only.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x = if x.dtype() != w.dtype() { x.to_dtype(w.dtype())? } else { x.clone() };
    x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_matmul_and_gives_only_the_input_gradient() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 70), &dev).unwrap();
        for m in [1, 3, 9] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, 70), &dev).unwrap()).unwrap();
            let y = frozen_matmul(x.as_tensor(), &w).unwrap();
            let want = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
            let d = (&y - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "m={m}: {d}");
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let dx = g.get(x.as_tensor()).unwrap();
            let want_dx = (want * 2.0).unwrap().matmul(&w).unwrap();
            let d = (dx - want_dx).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-3, "m={m}: dx differs by {d}");
            assert!(g.get(&w).is_none(), "no gradient may be computed for the frozen weight");
        }
    }
}
