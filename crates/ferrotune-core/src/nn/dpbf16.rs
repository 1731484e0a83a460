//! bf16 matrix products with AVX512-BF16 dot products (`vdpbf16ps`), f32 accumulation: the kernels for CPUs
//! that have bf16 dot products but no AMX tiles (AMD Zen 4 and Zen 5, Intel Cooper Lake).
//!
//! One `vdpbf16ps` multiplies 16 pairs of bf16 by 16 pairs and adds each pair's two products into one of 16 f32
//! lanes: twice the multiply-adds of an f32 FMA of the same width. Both operands are bf16: the weights as
//! stored, the activations rounded to nearest even (as on AMX tiles and in PyTorch's bf16).
//! - `x · Wᵀ`: the lanes are 16 rows of x, packed once as pairs of consecutive columns (the AMX kernel's
//!   layout), and each pair of consecutive elements of a row of W, one 32-bit word, is broadcast from W in
//!   place: the weights are neither copied nor widened.
//! - `G · W`: the lanes are 16 columns of W, whose row pairs are interleaved into a panel one slice at a time
//!   (one pass over W per product), and each pair of consecutive elements of a row of G (rounded) is broadcast.
//!
//! Each kernel has a reference in the tests (f64 products of the rounded operands) that it must match.

use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

/// Whether this CPU runs the AVX512-BF16 kernels (`FERROTUNE_NO_AVX512BF16=1` turns them off).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if std::env::var_os("FERROTUNE_NO_AVX512BF16").is_some() {
            return false;
        }
        detect()
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

/// Whether [`matmul_xwt`] takes a sum dimension of `k`: whole pairs.
pub fn fits_xwt(k: usize) -> bool {
    k.is_multiple_of(2) && k > 0
}

/// Whether [`matmul_gw`] takes `n` rows of W (the sum dimension): whole pairs.
pub fn fits_gw(n: usize) -> bool {
    n.is_multiple_of(2) && n > 0
}

/// Rows of W one micro-kernel of `x · Wᵀ` broadcasts: 2 × 12 accumulators, so that each vector of x (streamed
/// from L2) meets twelve weights while the twelve rows' slice of W stays in L1.
const NR: usize = 12;
/// 16-row blocks of x one micro-kernel of `x · Wᵀ` holds in its lanes.
const XB: usize = 2;
/// Pairs of the sum dimension one slice covers: the slice of packed x (m × 2 KiB) stays in L2 and the slice
/// of a row group of W (24 KiB) in L1 while every block of x passes over it.
const KC: usize = 512;
/// Rows of W (output columns) one task of `x · Wᵀ` computes: whole 16-column tiles of the output.
const TASK_ROWS: usize = 4 * NR;

/// Rows of G one micro-kernel of `G · W` broadcasts (2 × 12 accumulators, as for `x · Wᵀ`).
const GR: usize = 12;
/// 16-column vectors of W one micro-kernel of `G · W` holds: 32 output columns.
const GV: usize = 2;
/// Columns of W one task of `G · W` computes.
const TC: usize = 4 * GV * 16;
/// Row pairs of W in one panel: TC columns × QC pairs × 4 bytes = 128 KiB, resident in L2 while every row
/// group of G passes over it.
const QC: usize = 256;

/// `x (m, k) @ wᵀ` for bf16 `w` (n, k), with x rounded to bf16: (m, n) f32. Needs [`available`] and
/// [`fits_xwt`].
pub fn matmul_xwt(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize) -> Vec<f32> {
    assert!(available() && fits_xwt(k), "the AVX512-BF16 x·Wᵀ kernel needs the CPU feature and an even k");
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    let blocks = m.div_ceil(16);
    let half = k / 2;
    let xp = pack_x(x, m, k, blocks);
    // Every element is written below, so the buffer is not zeroed first.
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let yp = SendPtr::new(y.as_mut_ptr());
    (0..n.div_ceil(TASK_ROWS)).into_par_iter().for_each(|t| {
        let (j0, j1) = (t * TASK_ROWS, ((t + 1) * TASK_ROWS).min(n));
        let groups = (j1 - j0).div_ceil(NR);
        // Accumulators between slices: `acc[((g·blocks + b)·NR + c)·16 + lane]` is row 16b + lane, column
        // j0 + g·NR + c.
        let mut acc = vec![0f32; TASK_ROWS.div_ceil(16) * 16 * blocks * 16];
        for p0 in (0..half).step_by(KC) {
            let pc = KC.min(half - p0);
            for g in 0..groups {
                // Rows past n repeat the last row: computed, never stored.
                let rows: [*const i32; NR] = std::array::from_fn(|c| {
                    let j = (j0 + g * NR + c).min(n - 1);
                    // SAFETY: row j < n of w starts at j·k; pair p0 < k/2 is inside it.
                    unsafe { (w.as_ptr() as *const u16).add(j * k + 2 * p0) as *const i32 }
                });
                for b0 in (0..blocks).step_by(XB) {
                    let nb = XB.min(blocks - b0);
                    // SAFETY: the group of blocks from b0 holds `half` pairs of nb·16 words from b0·half·16
                    // (pack_x); the W rows have pc pairs from p0; acc holds (g·blocks + b0 + nb)·NR·16 floats.
                    unsafe {
                        let xs = xp.as_ptr().add(b0 * half * 16 + p0 * nb * 16);
                        let a = acc.as_mut_ptr().add((g * blocks + b0) * NR * 16);
                        if nb == 2 {
                            xwt_kernel::<2>(xs, rows, pc, a, p0 > 0);
                        } else {
                            xwt_kernel::<1>(xs, rows, pc, a, p0 > 0);
                        }
                    }
                }
            }
        }
        // Sixteen columns of sixteen rows at a time, transposed in registers into rows of y.
        for b in (0..blocks).take_while(|b| 16 * b < m) {
            let lanes = 16.min(m - 16 * b);
            for c0 in (0..j1 - j0).step_by(16) {
                let cols = 16.min(j1 - j0 - c0);
                let src: [*const f32; 16] = std::array::from_fn(|t| {
                    let j = (c0 + t).min(j1 - j0 - 1);
                    acc[((j / NR * blocks + b) * NR + j % NR) * 16..].as_ptr()
                });
                // SAFETY: each source is 16 floats of acc; rows 16b + l < m of y have n columns, of which
                // j0 + c0 .. j0 + c0 + cols belong to this task alone.
                unsafe { store_transposed(src, yp.at((16 * b) * n + j0 + c0), n, lanes, cols) };
            }
        }
    });
    // SAFETY: the tasks wrote all m rows of every one of the n columns.
    unsafe { y.set_len(m * n) };
    y
}

/// Rows of `x` (m, k) rounded to bf16 as pairs of consecutive columns, in groups of [`XB`] 16-row blocks: the
/// group from block b0 (nb blocks) holds, for each pair p, nb blocks of 16 words at `b0·k/2·16 + (p·nb + r)·16`
/// (zero past the last row), so that a micro-kernel reads one contiguous stream.
fn pack_x(x: &[f32], m: usize, k: usize, blocks: usize) -> Vec<u32> {
    let half = k / 2;
    let mut out = vec![0u32; blocks * half * 16];
    out.par_chunks_mut(XB * half * 16).enumerate().for_each(|(gi, o)| {
        let nb = o.len() / (half * 16);
        for r in 0..nb {
            pack_rows(o, x, m, k, XB * gi * 16 + 16 * r, r, nb);
        }
    });
    out
}

super::amx::wide_fn! {
    /// The 16 rows from `i0` of x (m, k) into lane r of a group of nb blocks ([`pack_x`]'s layout).
    fn pack_rows(o: &mut [u32], x: &[f32], m: usize, k: usize, i0: usize, r: usize, nb: usize) {
        for c in 0..16 {
            let i = i0 + c;
            if i >= m {
                break;
            }
            let row = &x[i * k..(i + 1) * k];
            for (p, pair) in row.chunks_exact(2).enumerate() {
                o[(p * nb + r) * 16 + c] =
                    super::amx::round_bits(pair[0]) as u32 | (super::amx::round_bits(pair[1]) as u32) << 16;
            }
        }
    }
}

/// Writes the transpose of 16 vectors of 16 floats (`src[t][l]`) as `lanes` rows of `cols` floats: row l at
/// `dst + l·stride` holds `src[0..cols][l]`.
///
/// # Safety
/// [`available`]; each source addresses 16 floats; every row written is inside its buffer.
unsafe fn store_transposed(src: [*const f32; 16], dst: *mut f32, stride: usize, lanes: usize, cols: usize) {
    #[cfg(target_arch = "x86_64")]
    store_transposed_avx512(src, dst, stride, lanes, cols);
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX512-BF16 kernels on a non-x86 CPU ({src:?} {dst:p} {stride} {lanes} {cols})")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_transposed_avx512(src: [*const f32; 16], dst: *mut f32, stride: usize, lanes: usize, cols: usize) {
    use std::arch::x86_64::*;
    let r: [__m512; 16] = std::array::from_fn(|t| _mm512_loadu_ps(src[t]));
    // 32-bit interleave of row pairs, then 64-bit: u[4i + c] holds, in 128-bit lane L, rows 4i..4i+3 of
    // column 4L + c.
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let (a, b) = (_mm512_castps_pd(t[4 * g + c / 2]), _mm512_castps_pd(t[4 * g + c / 2 + 2]));
        _mm512_castpd_ps(if c % 2 == 0 { _mm512_unpacklo_pd(a, b) } else { _mm512_unpackhi_pd(a, b) })
    });
    let mask: __mmask16 = if cols >= 16 { 0xffff } else { (1u16 << cols) - 1 };
    for c in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x44>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_f32x4::<0xee>(u[c], u[4 + c]);
        let v2 = _mm512_shuffle_f32x4::<0x44>(u[8 + c], u[12 + c]);
        let v3 = _mm512_shuffle_f32x4::<0xee>(u[8 + c], u[12 + c]);
        // Column 4L + c of the sources is row 4L + c of the output.
        let out = [
            _mm512_shuffle_f32x4::<0x88>(v0, v2),
            _mm512_shuffle_f32x4::<0xdd>(v0, v2),
            _mm512_shuffle_f32x4::<0x88>(v1, v3),
            _mm512_shuffle_f32x4::<0xdd>(v1, v3),
        ];
        for (l4, v) in out.iter().enumerate() {
            let l = 4 * l4 + c;
            if l < lanes {
                _mm512_mask_storeu_ps(dst.add(l * stride), mask, *v);
            }
        }
    }
}

/// `g (m, n) @ w` for bf16 `w` (n, k), with g rounded to bf16: (m, k) f32 — the input gradient of
/// `x · Wᵀ`. Needs [`available`] and [`fits_gw`].
pub fn matmul_gw(g: &[f32], m: usize, n: usize, w: &[bf16], k: usize) -> Vec<f32> {
    assert!(available() && fits_gw(n), "the AVX512-BF16 G·W kernel needs the CPU feature and an even n");
    assert_eq!(g.len(), m * n);
    assert_eq!(w.len(), n * k);
    let mut gb = vec![0u16; m * n];
    gb.par_chunks_mut(n).zip(g.par_chunks(n)).for_each(|(o, r)| round_row(o, r));
    // SAFETY: bf16 is a transparent 16-bit value; the bits are only copied.
    let wu: &[u16] = unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u16, w.len()) };
    let half = n / 2;
    // Every element is written below, so the buffer is not zeroed first.
    let mut y: Vec<f32> = Vec::with_capacity(m * k);
    let yp = SendPtr::new(y.as_mut_ptr());
    (0..k.div_ceil(TC)).into_par_iter().for_each(|t| {
        let (c0, c1) = (t * TC, ((t + 1) * TC).min(k));
        let vecs = (c1 - c0).div_ceil(16);
        let groups = vecs.div_ceil(GV);
        // Panel: per group of GV vectors, qc pairs of GV·16 words (columns past c1 are zeros).
        let mut panel = vec![0u32; groups * QC * GV * 16];
        let mut out = vec![0f32; m * groups * GV * 16];
        let ow = groups * GV * 16;
        for q0 in (0..half).step_by(QC) {
            let qc = QC.min(half - q0);
            pack_panel(&mut panel, wu, k, q0, qc, c0, c1, groups);
            for i0 in (0..m).step_by(GR) {
                let nr = GR.min(m - i0);
                let rows: [*const i32; GR] = std::array::from_fn(|r| {
                    let i = (i0 + r).min(m - 1);
                    // SAFETY: row i < m of gb starts at i·n; pair q0 < n/2 is inside it.
                    unsafe { gb.as_ptr().add(i * n + 2 * q0) as *const i32 }
                });
                for gi in 0..groups {
                    // SAFETY: the panel holds group gi's qc pairs of GV·16 words from gi·QC·GV·16; `out` has rows
                    // i0..i0+nr of ow floats, group gi's GV·16 from gi·GV·16.
                    unsafe {
                        let pp = panel.as_ptr().add(gi * QC * GV * 16);
                        let o = out.as_mut_ptr().add(i0 * ow + gi * GV * 16);
                        match nr {
                            12 => gw_kernel::<12>(rows, pp, qc, o, ow, q0 > 0),
                            11 => gw_kernel::<11>(rows, pp, qc, o, ow, q0 > 0),
                            10 => gw_kernel::<10>(rows, pp, qc, o, ow, q0 > 0),
                            9 => gw_kernel::<9>(rows, pp, qc, o, ow, q0 > 0),
                            8 => gw_kernel::<8>(rows, pp, qc, o, ow, q0 > 0),
                            7 => gw_kernel::<7>(rows, pp, qc, o, ow, q0 > 0),
                            6 => gw_kernel::<6>(rows, pp, qc, o, ow, q0 > 0),
                            5 => gw_kernel::<5>(rows, pp, qc, o, ow, q0 > 0),
                            4 => gw_kernel::<4>(rows, pp, qc, o, ow, q0 > 0),
                            3 => gw_kernel::<3>(rows, pp, qc, o, ow, q0 > 0),
                            2 => gw_kernel::<2>(rows, pp, qc, o, ow, q0 > 0),
                            _ => gw_kernel::<1>(rows, pp, qc, o, ow, q0 > 0),
                        }
                    }
                }
            }
        }
        for i in 0..m {
            // SAFETY: row i of y has k columns; c0..c1 belong to this task alone.
            unsafe { std::ptr::copy_nonoverlapping(out[i * ow..].as_ptr(), yp.at(i * k + c0), c1 - c0) };
        }
    });
    // SAFETY: the tasks wrote columns c0..c1 of every row, for column ranges covering 0..k.
    unsafe { y.set_len(m * k) };
    y
}

/// A pointer that tasks writing disjoint parts of one buffer share.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(*mut f32);
// SAFETY: every task writes only elements no other task touches, and the buffer outlives the parallel loop.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(crate) fn new(p: *mut f32) -> Self {
        Self(p)
    }

    /// The element `i` places on (a method, so that closures capture the whole wrapper).
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

super::amx::wide_fn! {
    /// `o[i]` = `x[i]` rounded to bf16 (ties to even), as bits.
    fn round_row(o: &mut [u16], x: &[f32]) {
        for (o, &v) in o.iter_mut().zip(x) {
            *o = super::amx::round_bits(v);
        }
    }
}

/// One panel of `G · W`: for the `groups` groups of GV·16 columns from c0 (up to c1), the qc row pairs from
/// q0: `panel[(g·QC + q)·GV·16 + c]` holds W[2(q0+q)][col] | W[2(q0+q)+1][col] << 16 for col = c0 + g·GV·16 + c.
#[allow(clippy::too_many_arguments)]
fn pack_panel(panel: &mut [u32], wu: &[u16], k: usize, q0: usize, qc: usize, c0: usize, c1: usize, groups: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: callers check `available()`, which includes the features the function is compiled for.
    unsafe {
        pack_panel_avx512(panel, wu, k, q0, qc, c0, c1, groups)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX512-BF16 kernels on a non-x86 CPU ({panel:p} {wu:p} {k} {q0} {qc} {c0} {c1} {groups})")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_panel_avx512(
    panel: &mut [u32],
    wu: &[u16],
    k: usize,
    q0: usize,
    qc: usize,
    c0: usize,
    c1: usize,
    groups: usize,
) {
    use std::arch::x86_64::*;
    // Interleave 16-bit lanes: the first 16 words of a with those of b, then the last 16 (index 32+ is b).
    let lo: [u16; 32] = std::array::from_fn(|i| (i / 2 + if i % 2 == 1 { 32 } else { 0 }) as u16);
    let hi: [u16; 32] = std::array::from_fn(|i| (16 + i / 2 + if i % 2 == 1 { 32 } else { 0 }) as u16);
    let (lo, hi) = (_mm512_loadu_si512(lo.as_ptr() as *const _), _mm512_loadu_si512(hi.as_ptr() as *const _));
    let width = GV * 16;
    for q in 0..qc {
        let r0 = wu.as_ptr().add(2 * (q0 + q) * k);
        let r1 = r0.add(k);
        for g in 0..groups {
            let dst = panel.as_mut_ptr().add((g * QC + q) * width);
            for h in 0..width / 32 {
                let col = c0 + g * width + 32 * h;
                let (a, b) = if col + 32 <= c1 {
                    (_mm512_loadu_si512(r0.add(col) as *const _), _mm512_loadu_si512(r1.add(col) as *const _))
                } else if col < c1 {
                    let mask: __mmask32 = (1u32 << (c1 - col)) - 1;
                    (
                        _mm512_maskz_loadu_epi16(mask, r0.add(col) as *const _),
                        _mm512_maskz_loadu_epi16(mask, r1.add(col) as *const _),
                    )
                } else {
                    (_mm512_setzero_si512(), _mm512_setzero_si512())
                };
                _mm512_storeu_si512(dst.add(32 * h) as *mut _, _mm512_permutex2var_epi16(a, lo, b));
                _mm512_storeu_si512(dst.add(32 * h + 16) as *mut _, _mm512_permutex2var_epi16(a, hi, b));
            }
        }
    }
}

/// The `x · Wᵀ` micro-kernel: `pc` pairs of `B` blocks of 16 packed x rows (`B·16` words a pair, one stream
/// from `xs`) against NR rows of W (one 32-bit pair each per step, broadcast). Accumulators start from
/// `acc` (`load`) or zero and end there, laid out `[(r·NR + c)·16 + lane]`.
///
/// # Safety
/// [`available`]; every pointer addresses what the layout above reads or writes.
unsafe fn xwt_kernel<const B: usize>(xs: *const u32, rows: [*const i32; NR], pc: usize, acc: *mut f32, load: bool) {
    #[cfg(target_arch = "x86_64")]
    xwt_kernel_avx512::<B>(xs, rows, pc, acc, load);
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX512-BF16 kernels on a non-x86 CPU ({xs:p} {rows:?} {pc} {acc:p} {load})")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn xwt_kernel_avx512<const B: usize>(
    xs: *const u32,
    rows: [*const i32; NR],
    pc: usize,
    acc: *mut f32,
    load: bool,
) {
    use std::arch::x86_64::*;
    let mut c = [[_mm512_setzero_ps(); NR]; B];
    if load {
        for (r, cr) in c.iter_mut().enumerate() {
            for (j, v) in cr.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(acc.add((r * NR + j) * 16));
            }
        }
    }
    for p in 0..pc {
        let xv: [__m512bh; B] =
            std::array::from_fn(|r| std::mem::transmute(_mm512_loadu_si512(xs.add((p * B + r) * 16) as *const _)));
        for j in 0..NR {
            let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(rows[j].add(p).read_unaligned()));
            for (r, cr) in c.iter_mut().enumerate() {
                cr[j] = _mm512_dpbf16_ps(cr[j], xv[r], b);
            }
        }
    }
    for (r, cr) in c.iter().enumerate() {
        for (j, v) in cr.iter().enumerate() {
            _mm512_storeu_ps(acc.add((r * NR + j) * 16), *v);
        }
    }
}

/// The `G · W` micro-kernel: `R` rows of G (one 32-bit pair each per step, broadcast, from `rows`) against GV
/// vectors of a panel (`qc` pairs of GV·16 words). Accumulates into (`load`) or overwrites `R` rows of GV·16
/// floats at `out`, row stride `os`.
///
/// # Safety
/// [`available`]; every pointer addresses what the layout above reads or writes.
unsafe fn gw_kernel<const R: usize>(
    rows: [*const i32; GR],
    panel: *const u32,
    qc: usize,
    out: *mut f32,
    os: usize,
    load: bool,
) {
    #[cfg(target_arch = "x86_64")]
    gw_kernel_avx512::<R>(rows, panel, qc, out, os, load);
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX512-BF16 kernels on a non-x86 CPU ({rows:?} {panel:p} {qc} {out:p} {os} {load})")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn gw_kernel_avx512<const R: usize>(
    rows: [*const i32; GR],
    panel: *const u32,
    qc: usize,
    out: *mut f32,
    os: usize,
    load: bool,
) {
    use std::arch::x86_64::*;
    let mut c = [[_mm512_setzero_ps(); GV]; R];
    if load {
        for (r, cr) in c.iter_mut().enumerate() {
            for (v, cv) in cr.iter_mut().enumerate() {
                *cv = _mm512_loadu_ps(out.add(r * os + v * 16));
            }
        }
    }
    for q in 0..qc {
        let mut wv = [_mm512_setzero_si512(); GV];
        for (v, x) in wv.iter_mut().enumerate() {
            *x = _mm512_loadu_si512(panel.add((q * GV + v) * 16) as *const _);
        }
        for (r, cr) in c.iter_mut().enumerate() {
            let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(rows[r].add(q).read_unaligned()));
            for (v, cv) in cr.iter_mut().enumerate() {
                *cv = _mm512_dpbf16_ps(*cv, a, std::mem::transmute::<__m512i, __m512bh>(wv[v]));
            }
        }
    }
    for (r, cr) in c.iter().enumerate() {
        for (v, cv) in cr.iter().enumerate() {
            _mm512_storeu_ps(out.add(r * os + v * 16), *cv);
        }
    }
}

/// Floating-point operations of one [`peak_loop`] step: twelve `vdpbf16ps` of 16 lanes × 2 products.
pub const PEAK_FLOPS_PER_STEP: f64 = 12.0 * 16.0 * 2.0 * 2.0;

/// The dot-product units' peak: `steps` rounds of twelve independent `vdpbf16ps`, registers only. Needs
/// [`available`]. Returns a value that depends on every accumulator, so the loop cannot be dropped.
pub fn peak_loop(steps: usize) -> f32 {
    assert!(available(), "the AVX512-BF16 peak needs the CPU feature");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: checked above.
    unsafe {
        peak_avx512(steps)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX512-BF16 on a non-x86 CPU ({steps})")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn peak_avx512(steps: usize) -> f32 {
    use std::arch::x86_64::*;
    // Operands the compiler cannot see through, so the chains stay in registers and are not folded.
    let a: __m512bh = std::mem::transmute(_mm512_set1_epi16(std::hint::black_box(0x3f80)));
    let b: __m512bh = std::mem::transmute(_mm512_set1_epi16(std::hint::black_box(0x3400)));
    let mut c = [_mm512_setzero_ps(); 12];
    for _ in 0..steps {
        for v in c.iter_mut() {
            *v = _mm512_dpbf16_ps(*v, a, b);
        }
    }
    c.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 9) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// The plain reference: f64 sums of the products of the rounded operands.
    fn reference_xwt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum::<f64>();
            }
        }
        y
    }

    fn rounded(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
    }

    /// Largest difference over the largest reference magnitude.
    fn max_rel(a: &[f32], b: &[f64]) -> f64 {
        let scale = b.iter().fold(0f64, |s, v| s.max(v.abs()));
        a.iter().zip(b).fold(0f64, |e, (x, y)| e.max((*x as f64 - y).abs())) / scale
    }

    #[test]
    fn dot_product_kernels_equal_the_rounded_f64_products() {
        if !available() {
            eprintln!("SKIPPED: this CPU has no AVX512-BF16; the vdpbf16ps kernels are not tested here");
            return;
        }
        // Ragged m (partial 16-row blocks and micro-kernels), n not a multiple of the row groups or tasks, k past
        // one slice with a remainder, and column tails of the G·W panel.
        for &(m, k, n) in &[(1, 2, 1), (5, 38, 7), (37, 1090, 96), (70, 64, 161), (20, 96, 1058), (130, 2050, 50)] {
            let x = data(m * k, 1);
            let wf = data(n * k, 2);
            let w: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            let wr: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let want = reference_xwt(&rounded(&x), m, k, &wr, n);
            let got = matmul_xwt(&x, m, k, &w, n);
            let e = max_rel(&got, &want);
            assert!(e < 1e-5, "x·Wᵀ ({m},{k},{n}): rel err {e}");

            if fits_gw(n) {
                let g = data(m * n, 3);
                let mut wt = vec![0f32; k * n];
                for j in 0..n {
                    for t in 0..k {
                        wt[t * n + j] = wr[j * k + t];
                    }
                }
                let want = reference_xwt(&rounded(&g), m, n, &wt, k);
                let got = matmul_gw(&g, m, n, &w, k);
                let e = max_rel(&got, &want);
                assert!(e < 1e-5, "G·W ({m},{n},{k}): rel err {e}");
            }
        }
    }
}
