//! Products of f32 activations with compact frozen weights, accumulated in f32: 16-bit (bf16 / f16) weights
//! kept as stored, and per-row int8 weights quantized at load.
//!
//! A bf16 or f16 value widens to f32 exactly, so these kernels give the f32 path's numbers while the weights take
//! half its memory; int8 weights widen to their dequantized f32 values (a quarter of the memory). Matrix products widen one panel of weight rows (or columns) at a time into f32 and hand
//! it to gemm's f32 kernels (AVX-512 / AVX2+FMA, chosen by gemm at run time): the widening reads each weight
//! once per product, a small cost next to the product's M·N·K multiply-adds when M is more than a few rows.
//! Panels split only the output columns, so every output element sums over K in gemm's own order, as the
//! f32 product does. Products of a few rows (decoding one sequence or a batch of them, M ≤ [`STREAM_ROWS`])
//! stream each weight row once and widen it in registers ([`super::stream`]).

use half::{bf16, f16};
use rayon::prelude::*;

/// Rows of x up to which the AMX / AVX512-BF16 kernels are not worth their packing (gradients; forward products
/// of up to [`STREAM_ROWS`] rows stream instead).
pub const SMALL_M: usize = 4;

pub use super::stream::{stream_rows, STREAM_ROWS};

/// Elements of one widened f32 panel: 16 MiB, large enough that gemm's repacking of the activations per panel
/// stays a few per cent of the work.
const PANEL_ELEMS: usize = 4 << 20;

/// A row-major (rows, cols) weight matrix in its compact storage format.
#[derive(Clone, Copy)]
pub enum Packed<'a> {
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    /// Plain f32 (only the streaming kernel takes it; larger products of f32 weights call gemm directly).
    F32(&'a [f32]),
    /// Per-row symmetric int8: element (r, c) is `(q[r·cols + c] − 128) · scales[r]` (offset binary, since the
    /// tensor type holding it is unsigned).
    Int8 {
        q: &'a [u8],
        scales: &'a [f32],
        cols: usize,
    },
}

impl Packed<'_> {
    pub fn len(&self) -> usize {
        match self {
            Packed::Bf16(s) => s.len(),
            Packed::F16(s) => s.len(),
            Packed::F32(s) => s.len(),
            Packed::Int8 { q, .. } => q.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Widens elements `start..start + out.len()` into `out` (for int8, a range inside one row).
    pub(crate) fn widen(&self, start: usize, out: &mut [f32]) {
        match self {
            Packed::Bf16(s) => widen_bf16(&s[start..start + out.len()], out),
            Packed::F16(s) => {
                let len = out.len();
                for (o, v) in out.iter_mut().zip(&s[start..start + len]) {
                    *o = v.to_f32();
                }
            }
            Packed::F32(s) => out.copy_from_slice(&s[start..start + out.len()]),
            Packed::Int8 { q, scales, cols } => {
                let row = start / cols;
                debug_assert!(start % cols + out.len() <= *cols, "an int8 range crosses a row");
                widen_i8(&q[start..start + out.len()], scales[row], out)
            }
        }
    }
}

/// Per-row symmetric int8 of an (n, k) matrix whose rows `row(r, out)` writes in f32: the scale of a row is its
/// largest magnitude over 127, and each element rounds to the nearest step. Returns the offset-binary values
/// (`q + 128`) and the n scales.
pub fn quantize_rows(n: usize, k: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> (Vec<u8>, Vec<f32>) {
    let mut q = vec![0u8; n * k];
    let mut scales = vec![0f32; n];
    q.par_chunks_mut(k.max(1)).zip(scales.par_iter_mut()).enumerate().for_each_init(
        || vec![0f32; k],
        |buf, (r, (qr, s))| {
            row(r, buf);
            quantize_row(qr, s, buf);
        },
    );
    (q, scales)
}

super::amx::wide_fn! {
    /// One row of [`quantize_rows`] (as AVX-512 code where the CPU has it: the rounding then vectorises instead of
    /// calling `roundf` per element, with the same results).
    fn quantize_row(qr: &mut [u8], s: &mut f32, buf: &[f32]) {
        let max = buf.iter().fold(0f32, |m, v| m.max(v.abs()));
        *s = if max > 0.0 { max / 127.0 } else { 1.0 };
        let inv = 1.0 / *s;
        for (o, v) in qr.iter_mut().zip(buf.iter()) {
            let r = (v * inv).round().clamp(-127.0, 127.0);
            // NaN becomes 0, as `as i32` would make it; the unchecked conversion then vectorises.
            let r = if r.is_nan() { 0.0 } else { r };
            // SAFETY: r is finite and within ±127.
            *o = (unsafe { r.to_int_unchecked::<i32>() } + 128) as u8;
        }
    }
}

/// `x (m, k) @ wᵀ` for `w` (n, k): (m, n), row-major.
pub fn matmul_xwt(x: &[f32], m: usize, k: usize, w: Packed, n: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    if m <= STREAM_ROWS {
        return stream_rows(x, m, k, w, n);
    }
    let mut y = vec![0f32; m * n];
    let rows = panel_width(k, n);
    let mut panel = vec![0f32; rows * k];
    for j0 in (0..n).step_by(rows) {
        let nb = rows.min(n - j0);
        let p = &mut panel[..nb * k];
        p.par_chunks_mut(k).enumerate().for_each(|(r, out)| w.widen((j0 + r) * k, out));
        // SAFETY: y is (m, n) row-major and the block written is columns j0..j0+nb; x is (m, k); the panel is
        // (nb, k) row-major, read as its transpose (k, nb). All pointers stay inside their buffers.
        unsafe {
            gemm::gemm(
                m,
                nb,
                k,
                y.as_mut_ptr().add(j0),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                p.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism(),
            );
        }
    }
    y
}

/// `g (m, n) @ w` for `w` (n, k): (m, k), row-major — the input gradient of `x @ wᵀ`.
///
/// Panels are blocks of W's rows (the sum's dimension), each widened once and added into the whole output: a
/// panel of columns would be only 64 wide for the 248,320-row head, too narrow for gemm to use every core.
pub fn matmul_gw(g: &[f32], m: usize, n: usize, w: Packed, k: usize) -> Vec<f32> {
    debug_assert_eq!(g.len(), m * n);
    debug_assert_eq!(w.len(), n * k);
    let mut y = vec![0f32; m * k];
    let rows = panel_width(k, n);
    let mut panel = vec![0f32; rows * k];
    for r0 in (0..n).step_by(rows) {
        let nb = rows.min(n - r0);
        let p = &mut panel[..nb * k];
        p.par_chunks_mut(k).enumerate().for_each(|(r, out)| w.widen((r0 + r) * k, out));
        // SAFETY: y is (m, k) row-major; the block of g read is its columns r0..r0+nb (row stride n); the panel
        // is (nb, k) row-major. All pointers stay inside their buffers.
        unsafe {
            gemm::gemm(
                m,
                k,
                nb,
                y.as_mut_ptr(),
                1,
                k as isize,
                r0 > 0,
                g.as_ptr().add(r0),
                1,
                n as isize,
                p.as_ptr(),
                1,
                k as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism(),
            );
        }
    }
    y
}

/// Output columns per panel: the panel holds `width × inner` f32s, at most [`PANEL_ELEMS`], in multiples of 64.
fn panel_width(inner: usize, total: usize) -> usize {
    let w = (PANEL_ELEMS / inner.max(1)).max(64) / 64 * 64;
    w.min(total).max(1)
}

pub(crate) fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    }
}

/// bf16 → f32 is a 16-bit shift of the bits: exact, and vectorised once compiled for wide SIMD.
#[inline(always)]
fn widen_plain(src: &[bf16], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(src) {
        *o = f32::from_bits((v.to_bits() as u32) << 16);
    }
}

fn widen_bf16(src: &[bf16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { widen_avx512(src, out) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { widen_avx2(src, out) };
        }
    }
    widen_plain(src, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_avx512(src: &[bf16], out: &mut [f32]) {
    widen_plain(src, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_avx2(src: &[bf16], out: &mut [f32]) {
    widen_plain(src, out)
}

#[inline(always)]
fn widen_i8_plain(src: &[u8], scale: f32, out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(src) {
        *o = (*v as i32 - 128) as f32 * scale;
    }
}

fn widen_i8(src: &[u8], scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { widen_i8_avx512(src, scale, out) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { widen_i8_avx2(src, scale, out) };
        }
    }
    widen_i8_plain(src, scale, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_i8_avx512(src: &[u8], scale: f32, out: &mut [f32]) {
    widen_i8_plain(src, scale, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_i8_avx2(src: &[u8], scale: f32, out: &mut [f32]) {
    widen_i8_plain(src, scale, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain reference: widen everything, then a triple loop in f64.
    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
            }
        }
        y
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        // A small LCG: values in [-1, 1) without a random-number dependency in the test.
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn products_with_16_bit_weights_match_the_plain_reference() {
        // Shapes straddling the streaming threshold, panel edges (odd n, n above one panel's rows) and k not a
        // multiple of the SIMD width.
        for (m, k, n) in [(1, 37, 5), (3, 70, 130), (4, 16, 64), (9, 70, 37), (33, 257, 200), (7, 4096, 1100)] {
            let x = data(m * k, 1);
            let wf = data(n * k, 2);
            let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
            let widened_b: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let widened_h: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
            let (q, scales) = quantize_rows(n, k, |r, out| out.copy_from_slice(&wf[r * k..(r + 1) * k]));
            let widened_q: Vec<f32> =
                q.iter().enumerate().map(|(i, &v)| (v as i32 - 128) as f32 * scales[i / k]).collect();
            let wq = Packed::Int8 { q: &q, scales: &scales, cols: k };
            for (w, wide) in [(Packed::Bf16(&wb), &widened_b), (Packed::F16(&wh), &widened_h), (wq, &widened_q)] {
                let want = reference(&x, m, k, wide, n);
                let got = matmul_xwt(&x, m, k, w, n);
                let bound = 1e-5 * (k as f64).sqrt();
                for (g, r) in got.iter().zip(&want) {
                    assert!((*g as f64 - r).abs() <= bound * (1.0 + r.abs()), "x wᵀ m={m} k={k} n={n}: {g} vs {r}");
                }
                // dX = g @ w with g (m, n).
                let g = data(m * n, 3);
                let mut wt = vec![0f32; k * n];
                for j in 0..n {
                    for t in 0..k {
                        wt[t * n + j] = wide[j * k + t];
                    }
                }
                let want = reference(&g, m, n, &wt, k);
                let got = matmul_gw(&g, m, n, w, k);
                let bound = 1e-5 * (n as f64).sqrt();
                for (a, r) in got.iter().zip(&want) {
                    assert!((*a as f64 - r).abs() <= bound * (1.0 + r.abs()), "g w m={m} k={k} n={n}: {a} vs {r}");
                }
            }
        }
    }

    #[test]
    fn int8_rows_round_to_the_nearest_step_of_their_own_scale() {
        let (n, k) = (5, 300);
        let mut w = data(n * k, 6);
        w[k..2 * k].iter_mut().for_each(|v| *v *= 100.0); // rows of very different ranges
        w[2 * k..3 * k].iter_mut().for_each(|v| *v = 0.0); // an all-zero row
        let (q, scales) = quantize_rows(n, k, |r, out| out.copy_from_slice(&w[r * k..(r + 1) * k]));
        for r in 0..n {
            let row = &w[r * k..(r + 1) * k];
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(q[r * k..(r + 1) * k].iter().all(|&v| v >= 1), "row {r}: -128 is never used (symmetric)");
            for (c, &v) in row.iter().enumerate() {
                let back = (q[r * k + c] as i32 - 128) as f32 * scales[r];
                assert!((back - v).abs() <= 0.5 * max / 127.0 * (1.0 + 1e-5), "row {r} col {c}: {v} → {back}");
            }
        }
    }

    #[test]
    fn int8_ties_round_away_from_zero_and_nan_becomes_zero() {
        // Scale 1 (max 127): halves are exact ties; 300 is past the vector width, so the wide loop and its tail run.
        let mut row = vec![0f32; 300];
        row[..8].copy_from_slice(&[127.0, 2.5, -2.5, 0.5, -0.5, f32::NAN, -127.0, 126.49999]);
        row[299] = -3.5;
        let (q, scales) = quantize_rows(1, 300, |_, out| out.copy_from_slice(&row));
        assert_eq!(scales, [1.0]);
        let got: Vec<i32> = q.iter().map(|&v| v as i32 - 128).collect();
        assert_eq!(&got[..8], &[127, 3, -3, 1, -1, 0, -127, 126]);
        assert_eq!(got[299], -4);
        assert!(got[8..299].iter().all(|&v| v == 0));
    }

    #[test]
    fn products_with_bf16_weights_equal_the_f32_product_of_the_widened_weights() {
        // Widening is exact, and the panels leave each output's summation to gemm: the same bits as the f32 path.
        let (m, k, n) = (40, 300, 150);
        let x = data(m * k, 4);
        let wb: Vec<bf16> = data(n * k, 5).iter().map(|&v| bf16::from_f32(v)).collect();
        let wide: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let dev = candle_core::Device::Cpu;
        let xt = candle_core::Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
        let wt = candle_core::Tensor::from_vec(wide, (n, k), &dev).unwrap();
        let want: Vec<f32> = xt.matmul(&wt.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(matmul_xwt(&x, m, k, Packed::Bf16(&wb), n), want);
    }
}
