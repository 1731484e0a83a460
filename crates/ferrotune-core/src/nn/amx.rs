//! bf16 matrix products on Intel AMX tiles (`tdpbf16ps`), f32 accumulation.
//!
//! Both operands are bf16: the weights as stored, the activations rounded to bf16 (round to nearest even), as
//! PyTorch's bf16 computes. One `tdpbf16ps` multiplies a 16×32 block by a 32×16 one, several times the f32
//! FMA throughput of the same core. The tile instructions have no stable intrinsics, so the kernels are
//! `asm!` blocks; the tile registers are used only inside this module, between a `ldtilecfg` and a
//! `tilerelease` on the same thread.
//!
//! Layouts: an A tile is 16 rows of 32 consecutive bf16 (any row stride); a B tile is 16 rows, each the 16
//! columns' *pairs* of consecutive sum-dimension elements (the "VNNI" layout).
//! - `x · Wᵀ` is computed as `(W · xᵀ)ᵀ`: W's rows are A tiles in place (no copy of the weights), and x, a
//!   few hundred rows, is packed once into pairs.
//! - `G · W` takes G (rounded to bf16) as A tiles and W as B tiles, interleaving pairs of W's rows one panel
//!   at a time, so each weight is read once per product.

use std::arch::asm;
use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

/// Columns (the sum dimension) one pass of tiles covers before the accumulators go back to memory: with
/// 32 rows of each operand that is 2 × 64 KiB, resident in L2 while every other block reuses them.
const KC: usize = 1024;

/// Blocks of 32 output columns one task computes.
const JG: usize = 4;

/// Whether this CPU and kernel run AMX-BF16 tiles (asked once: Linux grants the tile state on request).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if std::env::var_os("FERROTUNE_NO_AMX").is_some() {
            return false;
        }
        detect()
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[allow(unused_unsafe)] // cpuid became a safe function in Rust 1.94
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // SAFETY: cpuid is available on every x86-64 CPU.
    let max = unsafe { __cpuid_count(0, 0) }.eax;
    if max < 7 {
        return false;
    }
    let edx = unsafe { __cpuid_count(7, 0) }.edx;
    let (amx_bf16, amx_tile) = (edx & (1 << 22) != 0, edx & (1 << 24) != 0);
    // The packing loops run as AVX-512 code on the tile path (`wide_fn!`); every AMX CPU has it.
    if !(amx_bf16 && amx_tile && std::is_x86_feature_detected!("avx512bw")) {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call asking for the tile-data state component for this process.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// Whether [`matmul_xwt`] takes these shapes: W's rows in blocks of 32, the sum dimension in blocks of 32.
pub fn fits_xwt(n: usize, k: usize) -> bool {
    n.is_multiple_of(32) && k.is_multiple_of(32) && k > 0
}

/// Whether [`matmul_gw`] takes these shapes: G's columns (W's rows) in pairs of 32, the output in blocks of 32.
pub fn fits_gw(n: usize, k: usize) -> bool {
    n.is_multiple_of(32) && k.is_multiple_of(32) && n > 0
}

/// `v` rounded to the nearest bf16 (ties to even), as its 16 bits; NaN stays NaN.
#[inline(always)]
pub(crate) fn round_bits(v: f32) -> u16 {
    let b = v.to_bits();
    // Branch-free (a select), so that the loops calling it vectorise.
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let quiet_nan = (b >> 16) | 0x40;
    (if v.is_nan() { quiet_nan } else { rounded }) as u16
}

/// `x` rounded to bf16 and back: the activations' values the products see.
pub fn round_to_bf16(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14)).for_each(|(o, c)| round_into(o, c));
    out
}

/// Defines a function whose body is compiled for AVX-512 (and AVX2 + FMA) as well and runs so where the CPU has
/// it: the default x86-64 target allows SSE2 only, and these loops move every element of a product or a state.
/// Every AMX CPU has AVX-512 F and BW, which [`detect`] checks.
macro_rules! wide_fn {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($a: $t),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn wide($($a: $t),*) {
                    body($($a),*)
                }
                if std::is_x86_feature_detected!("avx512bw") {
                    // SAFETY: the CPU has the features `wide` is compiled for.
                    return unsafe { wide($($a),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn wide2($($a: $t),*) {
                    body($($a),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { wide2($($a),*) };
                }
            }
            body($($a),*)
        }
    };
}
pub(crate) use wide_fn;

wide_fn! {
    /// `o[i]` = `x[i]` rounded to bf16 and back.
    fn round_into(o: &mut [f32], x: &[f32]) {
        for (o, &v) in o.iter_mut().zip(x) {
            *o = f32::from_bits((round_bits(v) as u32) << 16);
        }
    }
}

#[repr(C, align(64))]
struct TileConfig([u8; 64]);

/// Palette 1, tiles 0–7 all 16 rows of 64 bytes: tmm0–3 accumulators, tmm4–5 A, tmm6–7 B.
static CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    TileConfig(c)
};

/// Holds the tile configuration for the current thread while alive.
struct Tiles;

impl Tiles {
    fn configure() -> Tiles {
        // SAFETY: `available()` was checked by the caller; CONFIG is a valid palette-1 configuration.
        unsafe { asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly)) };
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: releases the tile state this thread configured.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Four accumulator tiles (row stride `cs` bytes): loaded from `c` or zeroed.
///
/// # Safety
/// Tiles configured on this thread; each of the four pointers addresses 16 rows of 64 bytes at stride `cs`.
#[inline(always)]
unsafe fn load_c(c: [*mut f32; 4], cs: usize, zero: bool) {
    if zero {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    } else {
        asm!(
            "tileloadd tmm0, [{c0} + {s}*1]",
            "tileloadd tmm1, [{c1} + {s}*1]",
            "tileloadd tmm2, [{c2} + {s}*1]",
            "tileloadd tmm3, [{c3} + {s}*1]",
            c0 = in(reg) c[0], c1 = in(reg) c[1], c2 = in(reg) c[2], c3 = in(reg) c[3], s = in(reg) cs,
            options(nostack, readonly),
        );
    }
}

/// # Safety
/// As [`load_c`].
#[inline(always)]
unsafe fn store_c(c: [*mut f32; 4], cs: usize) {
    asm!(
        "tilestored [{c0} + {s}*1], tmm0",
        "tilestored [{c1} + {s}*1], tmm1",
        "tilestored [{c2} + {s}*1], tmm2",
        "tilestored [{c3} + {s}*1], tmm3",
        c0 = in(reg) c[0], c1 = in(reg) c[1], c2 = in(reg) c[2], c3 = in(reg) c[3], s = in(reg) cs,
        options(nostack),
    );
}

/// `steps` times: A tiles at `a0`, `a1` (row stride `sa`, advancing 64 bytes), B tiles at `b0`, `b1` (row
/// stride 64, advancing `bs` bytes); tmm0 += A0·B0, tmm1 += A0·B1, tmm2 += A1·B0, tmm3 += A1·B1.
///
/// # Safety
/// Tiles configured; every tile read stays inside its buffer; `steps` > 0.
#[inline(always)]
unsafe fn dot_2x2(
    (a0, a1, sa): (*const u16, *const u16, usize),
    (b0, b1, bs): (*const u32, *const u32, usize),
    steps: usize,
) {
    asm!(
        "2:",
        "tileloadd tmm4, [{a0} + {sa}*1]",
        "tileloadd tmm6, [{b0} + {sb}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tileloadd tmm7, [{b1} + {sb}*1]",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm5, [{a1} + {sa}*1]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a0}, 64",
        "add {a1}, 64",
        "add {b0}, {bs}",
        "add {b1}, {bs}",
        "dec {n}",
        "jnz 2b",
        a0 = inout(reg) a0 => _, a1 = inout(reg) a1 => _, sa = in(reg) sa,
        b0 = inout(reg) b0 => _, b1 = inout(reg) b1 => _, sb = in(reg) 64usize, bs = in(reg) bs,
        n = inout(reg) steps => _,
        options(nostack, readonly),
    );
}

/// Rows of `x` (m, k) f32 in blocks of 16, each block's k/2 pairs of 16 columns: `out[(blk·k/2 + p)·16 + c]`
/// holds x[16·blk + c][2p .. 2p+2] in bf16 (zero past the last row). `blocks` is m rounded up to an even
/// number of 16-row blocks.
fn pack_pairs(x: &[f32], m: usize, k: usize, blocks: usize) -> Vec<u32> {
    let half = k / 2;
    let mut out = vec![0u32; blocks * half * 16];
    out.par_chunks_mut(half * 16).enumerate().for_each(|(blk, o)| pack_block(o, x, m, k, blk));
    out
}

/// `o[c] = lo[c] | hi[c] << 16` for 16 columns: one row of a B tile from two rows of W.
#[inline(always)]
fn interleave16(o: &mut [u32], lo: &[u16], hi: &[u16]) {
    let (o, lo, hi): (&mut [u32; 16], &[u16; 16], &[u16; 16]) =
        (o.try_into().expect("16"), lo.try_into().expect("16"), hi.try_into().expect("16"));
    for c in 0..16 {
        o[c] = lo[c] as u32 | (hi[c] as u32) << 16;
    }
}

wide_fn! {
    /// Block `blk` of [`pack_pairs`]: rows 16·blk.. of x (m, k) into `o`.
    fn pack_block(o: &mut [u32], x: &[f32], m: usize, k: usize, blk: usize) {
        for c in 0..16 {
            let i = blk * 16 + c;
            if i >= m {
                break;
            }
            let row = &x[i * k..(i + 1) * k];
            for p in 0..k / 2 {
                o[p * 16 + c] = round_bits(row[2 * p]) as u32 | (round_bits(row[2 * p + 1]) as u32) << 16;
            }
        }
    }
}

wide_fn! {
    /// The first m rows of columns n0..n0+nc of g (·, n), rounded to bf16, as rows of nc in `o`.
    fn round_slice(o: &mut [u16], g: &[f32], m: usize, n: usize, n0: usize, nc: usize) {
        for (i, orow) in o.chunks_mut(nc).take(m).enumerate() {
            for (o, &v) in orow.iter_mut().zip(&g[i * n + n0..i * n + n0 + nc]) {
                *o = round_bits(v);
            }
        }
    }
}

wide_fn! {
    /// One KC panel of B tiles from W (·, k) as bits: for the nb blocks of 32 columns from c0, rows n0+2p and
    /// n0+2p+1 (p < nc/2) interleaved, 16 columns per tile row ([`matmul_gw`]'s layout).
    fn pack_w_panel(panel: &mut [u32], wu: &[u16], k: usize, n0: usize, nc: usize, c0: usize, nb: usize) {
        let panel_len = KC / 2 * 32;
        for p in 0..nc / 2 {
            let r0 = &wu[(n0 + 2 * p) * k + c0..][..32 * nb];
            let r1 = &wu[(n0 + 2 * p + 1) * k + c0..][..32 * nb];
            for t in 0..2 * nb {
                let (bb, half) = (t / 2, t % 2);
                let at = bb * panel_len + ((p / 16) * 2 + half) * 256 + (p % 16) * 16;
                interleave16(&mut panel[at..at + 16], &r0[16 * t..16 * t + 16], &r1[16 * t..16 * t + 16]);
            }
        }
    }
}

/// `x (m, k) @ wᵀ` for bf16 `w` (n, k), with x rounded to bf16: (m, n) f32. Needs [`available`] and
/// [`fits_xwt`].
pub fn matmul_xwt(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize) -> Vec<f32> {
    debug_assert!(available() && fits_xwt(n, k));
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    let ib = m.div_ceil(32) * 2;
    let xp = pack_pairs(x, m, k, ib);
    let half = k / 2;
    let jb = n / 32;
    let mut y = vec![0f32; m * n];
    // Each task owns 32 output columns (32 rows of W): its accumulators are (ib/2) × 4 tiles, written back to y
    // transposed at the end.
    // Each task owns JG blocks of 32 output columns (32 rows of W each) and keeps their accumulators; within
    // one KC slice the slice of packed x (a few hundred KiB) is reused from L2 by every block of the group.
    let per = (ib / 2) * 1024;
    let tasks: Vec<(usize, Vec<f32>)> = (0..jb.div_ceil(JG))
        .into_par_iter()
        .map(|g| {
            let blocks = g * JG..((g + 1) * JG).min(jb);
            let mut acc = vec![0f32; blocks.len() * per];
            let _tiles = Tiles::configure();
            let wp = w.as_ptr() as *const u16;
            for k0 in (0..k).step_by(KC) {
                let steps = KC.min(k - k0) / 32;
                for (jj, j) in blocks.clone().enumerate() {
                    for i in 0..ib / 2 {
                        let c = acc[jj * per + i * 1024..].as_mut_ptr();
                        let cs = [c, c.wrapping_add(256), c.wrapping_add(512), c.wrapping_add(768)];
                        // SAFETY: A tiles are 16 rows of W from row 32j (+16), columns k0.., stride 2k bytes,
                        // inside w since n % 32 == 0 and k0 + 32·steps ≤ k; B tiles are pairs p = k0/2.. of
                        // x blocks 2i and 2i+1, inside xp; the accumulators are 4 KiB of acc.
                        unsafe {
                            load_c(cs, 64, k0 == 0);
                            dot_2x2(
                                (wp.add(32 * j * k + k0), wp.add((32 * j + 16) * k + k0), 2 * k),
                                (
                                    xp.as_ptr().add((2 * i * half + k0 / 2) * 16),
                                    xp.as_ptr().add(((2 * i + 1) * half + k0 / 2) * 16),
                                    1024,
                                ),
                                steps,
                            );
                            store_c(cs, 64);
                        }
                    }
                }
            }
            (g, acc)
        })
        .collect();
    // Tile (a, b) of block pair i holds yᵀ[32j + 16a + r][32i + 16b + c] at [r][c].
    let cols: Vec<_> =
        tasks.iter().flat_map(|(g, acc)| acc.chunks(per).enumerate().map(move |(jj, a)| (g * JG + jj, a))).collect();
    y.par_chunks_mut(n).enumerate().for_each(|(row, yr)| {
        let (i, b, c) = (row / 32, (row % 32) / 16, row % 16);
        for &(j, acc) in &cols {
            for a in 0..2 {
                let tile = &acc[i * 1024 + (2 * a + b) * 256..][..256];
                for r in 0..16 {
                    yr[32 * j + 16 * a + r] = tile[r * 16 + c];
                }
            }
        }
    });
    y
}

/// `g (m, n) @ w` for bf16 `w` (n, k), with g rounded to bf16: (m, k) f32. Needs [`available`] and
/// [`fits_gw`].
pub fn matmul_gw(g: &[f32], m: usize, n: usize, w: &[bf16], k: usize) -> Vec<f32> {
    debug_assert!(available() && fits_gw(n, k));
    debug_assert_eq!(g.len(), m * n);
    debug_assert_eq!(w.len(), n * k);
    let mp = m.div_ceil(32) * 32;
    // G in bf16, rows padded to a multiple of 32 with zeros: the A tiles. Stored one KC-column slice after
    // another (slice at n0: mp rows of nc columns from offset n0·mp), so a tile's 16 rows are 2 KiB apart, not a
    // whole row of G: a few pages per pass instead of one per row.
    let mut gb = vec![0u16; mp * n];
    gb.par_chunks_mut(KC.min(n) * mp).enumerate().for_each(|(sl, o)| {
        let n0 = sl * KC;
        let nc = KC.min(n - n0);
        round_slice(o, g, m, n, n0, nc);
    });
    let kb = k / 32;
    // SAFETY: bf16 is a transparent 16-bit value; the bits are only copied.
    let wu: &[u16] = unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u16, w.len()) };
    // Each task owns up to JG blocks of 32 output columns: (mp, 32) blocks of dX, in 16-column tiles. Packing
    // reads 32·JG consecutive columns of each weight row at a time.
    let per = mp * 32;
    let panel_len = KC / 2 * 32;
    let groups: Vec<(usize, Vec<f32>)> = (0..kb.div_ceil(JG))
        .into_par_iter()
        .map(|g| {
            let blocks = g * JG..((g + 1) * JG).min(kb);
            let nb = blocks.len();
            let mut panel = vec![0u32; nb * panel_len];
            let mut out = vec![0f32; nb * per];
            let _tiles = Tiles::configure();
            for n0 in (0..n).step_by(KC) {
                let nc = KC.min(n - n0);
                // Pairs of W's rows n0+2p, n0+2p+1 over the group's columns: per block, two B tiles per 16
                // pairs (columns 0–15, then 16–31).
                pack_w_panel(&mut panel, wu, k, n0, nc, 32 * blocks.start, nb);
                let steps = nc / 32;
                for bb in 0..nb {
                    for i in 0..mp / 32 {
                        let c = out[bb * per + i * 32 * 32..].as_mut_ptr();
                        // Tile (a, t): rows 32i + 16a, columns 16t, row stride 128 bytes.
                        let cs = [c, c.wrapping_add(16), c.wrapping_add(16 * 32), c.wrapping_add(16 * 32 + 16)];
                        // SAFETY: A tiles are rows 32i (+16) of gb's slice at n0, stride 2·nc bytes, inside gb
                        // (mp rows); B tiles are the block's `steps` pair blocks of the panel; the accumulators
                        // are inside out.
                        unsafe {
                            load_c(cs, 128, n0 == 0);
                            // A block's B tiles for columns 0–15 and 16–31 of one 16-pair step are adjacent.
                            let b0 = panel[bb * panel_len..].as_ptr();
                            dot_2x2(
                                (
                                    gb.as_ptr().add(n0 * mp + 32 * i * nc),
                                    gb.as_ptr().add(n0 * mp + (32 * i + 16) * nc),
                                    2 * nc,
                                ),
                                (b0, b0.add(256), 2048),
                                steps,
                            );
                            store_c(cs, 128);
                        }
                    }
                }
            }
            (g, out)
        })
        .collect();
    let blocks: Vec<(usize, &[f32])> =
        groups.iter().flat_map(|(g, out)| out.chunks(per).enumerate().map(move |(bb, o)| (g * JG + bb, o))).collect();
    let mut y = vec![0f32; m * k];
    y.par_chunks_mut(k).enumerate().for_each(|(i, yr)| {
        for (b, out) in &blocks {
            yr[32 * b..32 * b + 32].copy_from_slice(&out[i * 32..i * 32 + 32]);
        }
    });
    y
}

/// Floating-point operations of one [`peak_loop`] step: four 16×16×32 tile products.
pub const PEAK_FLOPS_PER_STEP: f64 = 4.0 * 16.0 * 16.0 * 32.0 * 2.0;

/// The tile units' peak: `steps` rounds of four independent `tdpbf16ps` on zeroed tiles, no memory traffic.
/// Needs [`available`].
pub fn peak_loop(steps: usize) {
    let _tiles = Tiles::configure();
    // SAFETY: tiles configured on this thread; the loop touches registers only.
    unsafe {
        asm!(
            "tilezero tmm4",
            "tilezero tmm6",
            "2:",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm4, tmm6",
            "tdpbf16ps tmm3, tmm4, tmm6",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) steps.max(1) => _,
            options(nostack, nomem),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 9) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn reference_xwt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |s, v| s.max(v.abs()));
        a.iter().zip(b).fold(0f32, |e, (x, y)| e.max((x - y).abs())) / scale
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // The last two are ties between bf16 neighbours (1 + 2⁻⁸ rounds down to even, 1 + 3·2⁻⁸ up).
        let ties = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)];
        for v in [1.0f32, -3.7, 1e-30, 65504.0, 0.1, f32::MAX, -0.0, ties[0], ties[1]] {
            assert_eq!(round_bits(v), bf16::from_f32(v).to_bits(), "{v}");
        }
        assert!(f32::from_bits((round_bits(f32::NAN) as u32) << 16).is_nan());
    }

    #[test]
    fn tile_products_equal_the_rounded_f32_products() {
        if !available() {
            eprintln!("SKIPPED: this CPU or kernel has no AMX-BF16 tiles; the AMX kernels are not tested here");
            return;
        }
        // Ragged m (padding), k and n past one KC slice, several 32-row blocks.
        for &(m, k, n) in &[(1, 32, 32), (37, 1088, 96), (70, 64, 160), (20, 96, 1056)] {
            let x = data(m * k, 1);
            let wf: Vec<f32> = data(n * k, 2);
            let w: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            let wr: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let xr = round_to_bf16(&x);
            let want = reference_xwt(&xr, m, k, &wr, n);
            let got = matmul_xwt(&x, m, k, &w, n);
            let e = max_rel(&got, &want);
            assert!(e < 1e-5, "x·Wᵀ ({m},{k},{n}): rel err {e}");

            // G (m, n) · W (n, k) against the same reference through Wᵀ.
            let g = data(m * n, 3);
            let gr = round_to_bf16(&g);
            let mut wt = vec![0f32; k * n];
            for j in 0..n {
                for t in 0..k {
                    wt[t * n + j] = wr[j * k + t];
                }
            }
            let want = reference_xwt(&gr, m, n, &wt, k);
            let got = matmul_gw(&g, m, n, &w, k);
            let e = max_rel(&got, &want);
            assert!(e < 1e-5, "G·W ({m},{n},{k}): rel err {e}");
        }
    }
}
