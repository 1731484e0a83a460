//! `x @ Wᵀ` for a frozen weight, as a custom op whose backward returns only dX.
//!
//! candle's matmul backward always computes and keeps the weight's gradient, even when the weight is a
//! plain (untracked) tensor: for a frozen base that is a full f32 copy of every linear weight per backward
//! pass. This op computes the same product and never touches a gradient for W.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use super::fused::f32_slice;
use super::mixed::{self, SMALL_M, STREAM_ROWS};
use super::{amx, dpbf16};

struct FrozenMatmul {
    /// (out, in), not tracked.
    w: Tensor,
    /// Per-row f32 scales when `w` holds int8 values (offset-binary u8).
    scales: Option<Tensor>,
    /// Products in bf16 (activations rounded), for a bf16 `w`: [`super::Param::bf16_products`].
    bf16: bool,
}

/// A frozen weight's elements as the CPU kernels take them.
enum CpuWeight<'a> {
    Packed(mixed::Packed<'a>),
    F32(&'a [f32]),
}

impl FrozenMatmul {
    /// `f` applied to W (n, k) as the CPU kernels take it: compact (16-bit, or int8 with its scales) or f32. None
    /// when W is not a contiguous CPU tensor of those kinds.
    fn with_cpu_weight<R>(&self, f: impl FnOnce(CpuWeight) -> R) -> Result<Option<R>> {
        let (n, k) = self.w.dims2()?;
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*ws else { return Ok(None) };
        if !wl.is_contiguous() {
            return Ok(None);
        }
        let scales = self.scales.as_ref().map(|s| s.storage_and_layout());
        let scales = cpu_scales(scales.as_ref().map(|(g, l)| (&**g, *l)), n)?;
        if let Some(half) = packed_weights(w, wl, n, k, scales) {
            return Ok(Some(f(CpuWeight::Packed(half))));
        }
        let CpuStorage::F32(wsl) = w else { return Ok(None) };
        Ok(Some(f(CpuWeight::F32(&wsl[wl.start_offset()..wl.start_offset() + n * k]))))
    }

    /// `x (m, k) @ Wᵀ` on the CPU for contiguous f32 x: 16-bit or int8 weights kept compact (widened on the fly or
    /// multiplied in bf16, f32 accumulation), an f32 W through gemm. None as [`Self::with_cpu_weight`].
    fn cpu_xwt(&self, x: &[f32], m: usize, k: usize) -> Result<Option<Vec<f32>>> {
        let (n, k2) = self.w.dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: input has {k} features, weight expects {k2}");
        }
        self.with_cpu_weight(|w| match w {
            CpuWeight::Packed(mixed::Packed::Bf16(wb)) if self.bf16 => bf16_xwt(x, m, k, wb, n),
            CpuWeight::Packed(half) => mixed::matmul_xwt(x, m, k, half, n),
            // Decoding multiplies a row per sequence: a general GEMM would repack all of W for every token, so
            // stream W's rows instead (memory-bound, no copies, the same sums for any number of rows).
            CpuWeight::F32(wv) if m <= STREAM_ROWS => mixed::stream_rows(x, m, k, mixed::Packed::F32(wv), n),
            CpuWeight::F32(wv) => {
                let mut y = vec![0f32; m * n];
                // SAFETY: y (m, n), x (m, k) and W (n, k) read as its transpose are row-major buffers of those sizes.
                unsafe { gemm_f32(m, n, k, y.as_mut_ptr(), n, false, (x.as_ptr(), 1, k), (wv.as_ptr(), k, 1), 1.0) };
                y
            }
        })
    }

    /// `g (m, n) @ W` on the CPU for contiguous f32 g: the input gradient, for any weight [`Self::cpu_xwt`] takes.
    fn cpu_gw(&self, g: &[f32], m: usize, n: usize) -> Result<Option<Vec<f32>>> {
        let (n2, k) = self.w.dims2()?;
        if n != n2 {
            candle_core::bail!("frozen matmul backward: gradient has {n} columns, weight has {n2} rows");
        }
        self.with_cpu_weight(|w| match w {
            CpuWeight::Packed(mixed::Packed::Bf16(wb)) if self.bf16 => bf16_gw(g, m, n, wb, k),
            CpuWeight::Packed(half) => mixed::matmul_gw(g, m, n, half, k),
            CpuWeight::F32(wv) => {
                let mut y = vec![0f32; m * k];
                // SAFETY: y (m, k), g (m, n) and W (n, k) are row-major buffers of those sizes.
                unsafe { gemm_f32(m, k, n, y.as_mut_ptr(), k, false, (g.as_ptr(), 1, n), (wv.as_ptr(), 1, k), 1.0) };
                y
            }
        })
    }

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
        if let (CpuStorage::F32(xs), true) = (s, l.is_contiguous()) {
            if let Some(y) = self.cpu_xwt(&xs[l.start_offset()..l.start_offset() + m * k], m, k)? {
                return Ok((CpuStorage::F32(y), Shape::from((m, n))));
            }
        }
        if self.scales.is_some() {
            candle_core::bail!("frozen matmul: int8 weights need f32 activations and a contiguous weight");
        }
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
        if self.scales.is_some() {
            candle_core::bail!("frozen matmul: int8 weights are implemented on the CPU only");
        }
        let out = s.matmul(w, (1, m, n, k), l, &wl.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // An upstream gradient can arrive strided (from a narrow or a transpose); the CUDA matmul accepts fewer
        // layouts than the CPU one, and this is a no-op for a contiguous gradient.
        if arg.dtype() != self.w.dtype() {
            // f32 activations with 16-bit or int8 weights (CPU): dX = G W with W widened on the fly.
            return Ok(Some(input_grad(&grad.contiguous()?, &self.w, self.scales.as_ref(), self.bf16)?));
        }
        Ok(Some(grad.contiguous()?.matmul(&self.w)?))
    }
}

/// `dst (m, n) = [dst +] beta · lhs (m, k) · rhs (k, n)` in f32 with gemm on the thread pool, each operand given
/// as (pointer, column stride, row stride) in elements; dst is row-major with row stride `dst_rs`.
///
/// # Safety
/// Every element the strides address for those dimensions is inside its buffer.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    beta: f32,
) {
    gemm_f32_with(m, n, k, dst, dst_rs, accumulate, lhs, rhs, beta, mixed::parallelism())
}

/// [`gemm_f32`] with the given parallelism (none inside a task that already runs on the pool).
///
/// # Safety
/// As [`gemm_f32`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32_with(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.0,
        lhs.1 as isize,
        lhs.2 as isize,
        rhs.0,
        rhs.1 as isize,
        rhs.2 as isize,
        1.0,
        beta,
        false,
        false,
        false,
        parallelism,
    )
}

/// `x Wᵀ + scale · (x Aᵀ) Bᵀ` for a frozen W with a LoRA adapter: one op whose forward adds the adapter's
/// product into the base product's output and whose backward forms dX, dA and dB with a few gemm calls, where the
/// same expression in tensor ops makes and keeps several (m, out) intermediates (the adapter's output, its
/// scaled copy, the sum) and passes over each again in the backward.
struct FrozenLora {
    base: FrozenMatmul,
    scale: f32,
}

impl CustomOp3 for FrozenLora {
    fn name(&self) -> &'static str {
        "frozen-lora-matmul"
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
        let ((m, k), (r, _), (n, _)) = (l1.shape().dims2()?, l2.shape().dims2()?, l3.shape().dims2()?);
        let (x, a, b) = (
            f32_slice(s1, l1, "frozen LoRA matmul: x")?,
            f32_slice(s2, l2, "frozen LoRA matmul: A")?,
            f32_slice(s3, l3, "frozen LoRA matmul: B")?,
        );
        let Some(mut y) = self.base.cpu_xwt(x, m, k)? else {
            candle_core::bail!("frozen LoRA matmul: the base weight must be a contiguous CPU tensor")
        };
        if m <= STREAM_ROWS {
            // A decoding batch: per-row sums in a fixed order, as the base product's.
            let u = mixed::stream_rows(x, m, k, mixed::Packed::F32(a), r);
            let v = super::stream::lora_up(&u, m, r, &super::stream::transpose(b, n, r), n);
            for (y, v) in y.iter_mut().zip(&v) {
                *y += self.scale * v;
            }
            return Ok((CpuStorage::F32(y), Shape::from((m, n))));
        }
        let mut u = vec![0f32; m * r];
        // SAFETY: x (m, k), A (r, k) read as Aᵀ (k, r), u (m, r), B (n, r) read as Bᵀ (r, n), y (m, n).
        unsafe {
            gemm_f32(m, r, k, u.as_mut_ptr(), r, false, (x.as_ptr(), 1, k), (a.as_ptr(), k, 1), 1.0);
            gemm_f32(m, n, r, y.as_mut_ptr(), n, true, (u.as_ptr(), 1, r), (b.as_ptr(), r, 1), self.scale);
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let ((m, k), (r, _), (n, _)) = (x.dims2()?, a.dims2()?, b.dims2()?);
        let (x, a, b, grad) = (x.contiguous()?, a.contiguous()?, b.contiguous()?, grad.contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (as_, al) = a.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(as_), Storage::Cpu(bs), Storage::Cpu(gs)) = (&*xs, &*as_, &*bs, &*gs)
        else {
            candle_core::bail!("frozen LoRA matmul: operands on different devices")
        };
        let (xv, av, bv) = (
            f32_slice(xs, xl, "frozen LoRA matmul: x")?,
            f32_slice(as_, al, "frozen LoRA matmul: A")?,
            f32_slice(bs, bl, "frozen LoRA matmul: B")?,
        );
        let g = f32_slice(gs, gl, "frozen LoRA matmul: the gradient")?;
        let Some(mut dx) = self.base.cpu_gw(g, m, n)? else {
            candle_core::bail!("frozen LoRA matmul: the base weight must be a contiguous CPU tensor")
        };
        let (mut u, mut du) = (vec![0f32; m * r], vec![0f32; m * r]);
        let (mut da, mut da_t, mut db) = (vec![0f32; r * k], vec![0f32; k * r], vec![0f32; n * r]);
        let s = self.scale;
        // SAFETY: every operand is a row-major buffer of the dimensions named: x (m, k), A (r, k), B (n, r),
        // G (m, n), u = x Aᵀ and du = s·G B (m, r), dX (m, k), dAᵀ (k, r), dB (n, r).
        unsafe {
            gemm_f32(m, r, k, u.as_mut_ptr(), r, false, (xv.as_ptr(), 1, k), (av.as_ptr(), k, 1), 1.0);
            gemm_f32(m, r, n, du.as_mut_ptr(), r, false, (g.as_ptr(), 1, n), (bv.as_ptr(), 1, r), s);
            gemm_f32(m, k, r, dx.as_mut_ptr(), k, true, (du.as_ptr(), 1, r), (av.as_ptr(), 1, k), 1.0);
            gemm_f32(n, r, m, db.as_mut_ptr(), r, false, (g.as_ptr(), n, 1), (u.as_ptr(), 1, r), s);
            // dAᵀ = xᵀ du (k, r): a long, narrow product, which gemm runs far better than r-row dA = duᵀ x.
            gemm_f32(k, r, m, da_t.as_mut_ptr(), r, false, (xv.as_ptr(), k, 1), (du.as_ptr(), 1, r), 1.0);
        }
        for (j, row) in da.chunks_exact_mut(k).enumerate() {
            for (t, v) in row.iter_mut().enumerate() {
                *v = da_t[t * r + j];
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (m, k), dev)?),
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (n, r), dev)?),
        ))
    }
}

/// `x (M, K) Wᵀ + scale · (x Aᵀ) Bᵀ` for a frozen parameter W and f32 adapter matrices A (r, K), B (N, r), as
/// one op on the CPU (gradients to x, A and B). None where the op does not apply (another device, non-f32
/// activations): the caller then composes tensor ops.
pub fn frozen_lora_matmul(x: &Tensor, w: &super::Param, a: &Tensor, b: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || w.is_variable() {
        return Ok(None);
    }
    let (ws, wl) = w.tensor.storage_and_layout();
    if !matches!(&*ws, Storage::Cpu(_)) || !wl.is_contiguous() {
        return Ok(None);
    }
    drop(ws);
    let base = FrozenMatmul { w: w.tensor.clone(), scales: w.scales.clone(), bf16: w.bf16_products };
    let op = FrozenLora { base, scale: scale as f32 };
    Ok(Some(x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)?))
}

/// `G (M, N) @ W` for a 16-bit or int8 frozen W (N, K) and f32 G: the input gradient of [`FrozenMatmul`].
struct InputGrad {
    w: Tensor,
    scales: Option<Tensor>,
    bf16: bool,
}

impl CustomOp1 for InputGrad {
    fn name(&self) -> &'static str {
        "frozen-matmul-input-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, n) = l.shape().dims2()?;
        let (n2, k) = self.w.dims2()?;
        if n != n2 {
            candle_core::bail!("frozen matmul backward: gradient has {n} columns, weight has {n2} rows");
        }
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*ws else {
            candle_core::bail!("frozen matmul: weight and gradient on different devices")
        };
        let scales = self.scales.as_ref().map(|s| s.storage_and_layout());
        let scales = cpu_scales(scales.as_ref().map(|(g, l)| (&**g, *l)), n)?;
        let (CpuStorage::F32(gs), Some(half)) = (s, packed_weights(w, wl, n, k, scales)) else {
            candle_core::bail!(
                "frozen matmul backward: expected an f32 gradient and a contiguous 16-bit or int8 weight"
            )
        };
        if !l.is_contiguous() {
            candle_core::bail!("frozen matmul backward: the gradient must be contiguous");
        }
        let g = &gs[l.start_offset()..l.start_offset() + m * n];
        let y = match half {
            mixed::Packed::Bf16(wb) if self.bf16 => bf16_gw(g, m, n, wb, k),
            _ => mixed::matmul_gw(g, m, n, half, k),
        };
        Ok((CpuStorage::F32(y), Shape::from((m, k))))
    }
}

/// Where products with bf16 weights (activations rounded to bf16) run on this CPU, in words.
pub fn bf16_products_engine() -> &'static str {
    if amx::available() {
        "AMX tiles"
    } else if dpbf16::available() {
        "AVX512-BF16 dot products"
    } else {
        "widened to f32 kernels: this CPU has neither AMX nor AVX512-BF16"
    }
}

/// `x @ wᵀ` with x rounded to bf16: on AMX tiles where the CPU has them and the shapes fit, else with AVX512-BF16
/// dot products, otherwise the rounded activations through the widening kernels (the same products, summed in
/// another order).
fn bf16_xwt(x: &[f32], m: usize, k: usize, w: &[half::bf16], n: usize) -> Vec<f32> {
    if m > STREAM_ROWS && amx::available() && amx::fits_xwt(n, k) {
        amx::matmul_xwt(x, m, k, w, n)
    } else if m > STREAM_ROWS && dpbf16::available() && dpbf16::fits_xwt(k) {
        dpbf16::matmul_xwt(x, m, k, w, n)
    } else if m <= STREAM_ROWS {
        super::stream::stream_rows_bf16_products(x, m, k, w, n)
    } else {
        mixed::matmul_xwt(&amx::round_to_bf16(x), m, k, mixed::Packed::Bf16(w), n)
    }
}

/// `g @ w` with g rounded to bf16, as [`bf16_xwt`] chooses its kernel.
fn bf16_gw(g: &[f32], m: usize, n: usize, w: &[half::bf16], k: usize) -> Vec<f32> {
    if m > SMALL_M && amx::available() && amx::fits_gw(n, k) {
        amx::matmul_gw(g, m, n, w, k)
    } else if m > SMALL_M && dpbf16::available() && dpbf16::fits_gw(n) {
        dpbf16::matmul_gw(g, m, n, w, k)
    } else {
        mixed::matmul_gw(&amx::round_to_bf16(g), m, n, mixed::Packed::Bf16(w), k)
    }
}

/// The elements of a contiguous (n, k) bf16 / f16 weight, or of an int8 one with its scales, as the mixed kernels
/// take them.
fn packed_weights<'a>(
    w: &'a CpuStorage,
    wl: &Layout,
    n: usize,
    k: usize,
    scales: Option<&'a [f32]>,
) -> Option<mixed::Packed<'a>> {
    if !wl.is_contiguous() {
        return None;
    }
    let (o, len) = (wl.start_offset(), n * k);
    match (w, scales) {
        (CpuStorage::BF16(v), None) => Some(mixed::Packed::Bf16(&v[o..o + len])),
        (CpuStorage::F16(v), None) => Some(mixed::Packed::F16(&v[o..o + len])),
        (CpuStorage::U8(v), Some(scales)) => Some(mixed::Packed::Int8 { q: &v[o..o + len], scales, cols: k }),
        _ => None,
    }
}

/// The n f32 scales of an int8 weight, from their (CPU) storage.
fn cpu_scales<'a>(s: Option<(&'a Storage, &Layout)>, n: usize) -> Result<Option<&'a [f32]>> {
    let Some((storage, l)) = s else { return Ok(None) };
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) if l.is_contiguous() && l.shape().elem_count() == n => {
            Ok(Some(&v[l.start_offset()..l.start_offset() + n]))
        }
        _ => candle_core::bail!("frozen matmul: int8 scales must be {n} contiguous f32 values on the CPU"),
    }
}

/// x: (M, K) @ Wᵀ with W: (N, K) frozen -> (M, N). Gradients flow to x only.
/// On the CPU an f32 x meets a 16-bit W as it is (f32 out); otherwise x takes W's dtype.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    frozen_matmul_scaled(x, w, None, false)
}

/// [`frozen_matmul`] with a parameter's weight, int8 ones (with their scales) included.
pub fn frozen_matmul_param(x: &Tensor, w: &super::Param) -> Result<Tensor> {
    frozen_matmul_scaled(x, &w.tensor, w.scales.as_ref(), w.bf16_products)
}

/// Whether products with `w` convert the whole matrix on every call (16-bit or int8 weights through the
/// widening kernels, on the CPU): callers then make few calls with many rows rather than many small ones.
pub fn widens_per_call(w: &super::Param) -> bool {
    let tiles = w.bf16_products && w.dtype() == DType::BF16 && (amx::available() || dpbf16::available());
    w.device().is_cpu() && compact(&w.tensor, w.scales.as_ref()) && !tiles
}

/// `g @ W` for a frozen parameter: the input gradient that [`frozen_matmul_param`]'s backward computes, for a
/// caller that forms the gradient itself (the blockwise cross-entropy). Returns f32.
pub fn frozen_input_grad(g: &Tensor, w: &super::Param) -> Result<Tensor> {
    let g = g.contiguous()?;
    if g.device().is_cpu() && g.dtype() == DType::F32 && compact(&w.tensor, w.scales.as_ref()) {
        return input_grad(&g, &w.tensor, w.scales.as_ref(), w.bf16_products);
    }
    if w.scales.is_some() {
        candle_core::bail!("frozen matmul: int8 weights need f32 gradients on the CPU");
    }
    g.to_dtype(w.dtype())?.matmul(&w.tensor)?.to_dtype(DType::F32)
}

/// `x (m, k) · Wᵀ` as a plain vector for a frozen parameter on the CPU, as [`frozen_matmul_param`] computes it,
/// for callers that handle the values themselves. None where W is not a frozen contiguous CPU matrix.
pub fn cpu_xwt(x: &[f32], m: usize, k: usize, w: &super::Param) -> Result<Option<Vec<f32>>> {
    if w.is_variable() || !w.device().is_cpu() {
        return Ok(None);
    }
    FrozenMatmul { w: w.tensor.clone(), scales: w.scales.clone(), bf16: w.bf16_products }.cpu_xwt(x, m, k)
}

/// `g (m, n) · W` as a plain vector, the input gradient of [`cpu_xwt`]. None where that is None.
pub fn cpu_gw(g: &[f32], m: usize, n: usize, w: &super::Param) -> Result<Option<Vec<f32>>> {
    if w.is_variable() || !w.device().is_cpu() {
        return Ok(None);
    }
    FrozenMatmul { w: w.tensor.clone(), scales: w.scales.clone(), bf16: w.bf16_products }.cpu_gw(g, m, n)
}

/// `g @ w` through the mixed kernels: f32 `g` (contiguous), 16-bit or int8 `w`, on the CPU.
fn input_grad(g: &Tensor, w: &Tensor, scales: Option<&Tensor>, bf16: bool) -> Result<Tensor> {
    g.apply_op1_no_bwd(&InputGrad { w: w.clone(), scales: scales.cloned(), bf16 })
}

/// Whether a weight is held compactly (bf16, f16, or int8 with its scales) rather than in the compute dtype.
fn compact(w: &Tensor, scales: Option<&Tensor>) -> bool {
    matches!(w.dtype(), DType::BF16 | DType::F16) || scales.is_some()
}

fn frozen_matmul_scaled(x: &Tensor, w: &Tensor, scales: Option<&Tensor>, bf16: bool) -> Result<Tensor> {
    let mixed = x.device().is_cpu() && x.dtype() == DType::F32 && compact(w, scales);
    let x = if x.dtype() != w.dtype() && !mixed {
        if scales.is_some() {
            candle_core::bail!("frozen matmul: int8 weights need f32 activations on the CPU");
        }
        x.to_dtype(w.dtype())?
    } else {
        x.clone()
    };
    x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone(), scales: scales.cloned(), bf16 })
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

    #[test]
    fn a_bf16_weight_kept_as_stored_gives_the_f32_results_of_its_widened_copy() {
        let dev = Device::Cpu;
        let w16 = Tensor::randn(0f32, 1.0, (37, 70), &dev).unwrap().to_dtype(candle_core::DType::BF16).unwrap();
        let w32 = w16.to_dtype(candle_core::DType::F32).unwrap();
        for m in [1, 3, 9, 40] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, 70), &dev).unwrap()).unwrap();
            let y16 = frozen_matmul(x.as_tensor(), &w16).unwrap();
            assert_eq!(y16.dtype(), candle_core::DType::F32, "f32 activations stay f32");
            let y32 = frozen_matmul(x.as_tensor(), &w32).unwrap();
            let d = (&y16 - &y32).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "m={m}: {d}");
            let g16 = y16.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g32 = y32.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (g16.get(x.as_tensor()).unwrap(), g32.get(x.as_tensor()).unwrap());
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "m={m}: dx differs by {d}");
        }
    }

    #[test]
    fn the_fused_lora_op_equals_the_composed_tensor_ops_and_their_gradients() {
        let dev = Device::Cpu;
        let (k, n, r) = (70, 37, 4);
        let w32 = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let w16 = super::super::Param::new("w", w32.to_dtype(DType::BF16).unwrap());
        let weights = [super::super::Param::new("w", w32.clone()), w16.clone(), w16.quantize_int8().unwrap()];
        let a = Var::from_tensor(&Tensor::randn(0f32, 0.3, (r, k), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, (n, r), &dev).unwrap()).unwrap();
        let rel = |x: &Tensor, y: &Tensor| {
            let d = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            d / y.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
        };
        for w in &weights {
            for m in [1, 3, 9, 40] {
                let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap()).unwrap();
                let got = frozen_lora_matmul(x.as_tensor(), w, a.as_tensor(), b.as_tensor(), 0.7).unwrap().unwrap();
                let lora = x.as_tensor().matmul(&a.as_tensor().t().unwrap()).unwrap();
                let lora = (lora.matmul(&b.as_tensor().t().unwrap()).unwrap() * 0.7).unwrap();
                let want = (frozen_matmul_param(x.as_tensor(), w).unwrap() + lora).unwrap();
                assert!(rel(&got, &want) < 1e-5, "{:?} m={m}: {}", w.dtype(), rel(&got, &want));
                // Weights per output element, so that every gradient is a different function of the inputs.
                let wo = Tensor::randn(0f32, 1.0, (m, n), &dev).unwrap();
                let g_got = (got * &wo).unwrap().sum_all().unwrap().backward().unwrap();
                let g_want = (want * &wo).unwrap().sum_all().unwrap().backward().unwrap();
                for (name, v) in [("x", x.as_tensor()), ("A", a.as_tensor()), ("B", b.as_tensor())] {
                    let (p, q) = (g_got.get(v).unwrap(), g_want.get(v).unwrap());
                    assert!(rel(p, q) < 1e-5, "{:?} m={m} d{name}: {}", w.dtype(), rel(p, q));
                }
                assert!(g_got.get(&w.tensor).is_none(), "no gradient for the frozen weight");
            }
        }
    }

    #[test]
    fn an_int8_weight_gives_the_f32_results_of_its_dequantized_copy() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 70), &dev).unwrap().to_dtype(candle_core::DType::BF16).unwrap();
        let q = super::super::Param::new("w", w).quantize_int8().unwrap();
        assert_eq!(q.tensor.dtype(), candle_core::DType::U8);
        let deq = q.to_f32().unwrap();
        for m in [1, 3, 9, 40] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, 70), &dev).unwrap()).unwrap();
            let yq = frozen_matmul_param(x.as_tensor(), &q).unwrap();
            let y32 = frozen_matmul(x.as_tensor(), &deq).unwrap();
            let d = (&yq - &y32).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "m={m}: {d}");
            let gq = yq.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g32 = y32.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (gq.get(x.as_tensor()).unwrap(), g32.get(x.as_tensor()).unwrap());
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-3, "m={m}: dx differs by {d}");
        }
    }
}
