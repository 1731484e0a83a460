//! `x Wᵀ` for a few rows of x (decoding one sequence, or a batch of them) against a frozen weight in any of its
//! formats: each weight row is read once, widened in registers and dotted with every row of x.
//!
//! Every output element is summed in one fixed order, whatever the number of rows and whichever of the two
//! implementations runs: products added into 16 lanes chunk by chunk (a multiply, then an add: no fused
//! multiply-add, so that the portable code gives the same bits), the lanes reduced as a fixed tree, the tail added
//! in order, then an int8 row's scale applied. A sequence therefore decodes to the same numbers alone as in a batch.
//! The vector code works on tiles of 4 weight rows × 4 rows of x (16 accumulators), so each chunk of x it loads
//! serves four weight rows and each widened chunk of weight four rows of x.

use rayon::prelude::*;

use super::mixed::Packed;

/// Rows of x up to which forward products stream the weight (a decoding batch); larger products call a GEMM.
pub const STREAM_ROWS: usize = 32;

/// Accumulator lanes of one output element (one AVX-512 register).
const LANES: usize = 16;

/// `x (m, k) @ wᵀ` for `w` (n, k): (m, n), row-major.
pub fn stream_rows(x: &[f32], m: usize, k: usize, w: Packed, n: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    by_blocks(m, n, k, |out, j0| block_of(out, x, m, k, w, j0))
}

/// The (m, n) output of `block(out, j0)`, which writes output columns j0.. of every row transposed (width, m) into
/// `out`: blocks of 64 columns, each its own slice so threads share nothing, on the pool when large enough.
fn by_blocks(m: usize, n: usize, k: usize, block: impl Fn(&mut [f32], usize) + Sync) -> Vec<f32> {
    const BLOCK: usize = 64;
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    let mut t = vec![0f32; m * n];
    let run = |(b, out): (usize, &mut [f32])| block(out, b * BLOCK);
    let blocks = t.chunks_mut(BLOCK * m).enumerate();
    if n * k * m.min(4) < 1 << 18 {
        blocks.for_each(run);
    } else {
        blocks.collect::<Vec<_>>().into_par_iter().for_each(run);
    }
    for (j, col) in t.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            y[i * n + j] = v;
        }
    }
    y
}

/// `u (m, r) @ B^T` for a LoRA up-projection B (n, r), given as its transpose `bt` (r, n): each output summed over
/// t = 0..r in order, a multiply then an add (so that a row's numbers do not depend on the other rows), as
/// vectors over the outputs (r is small: summing it in lanes would leave them mostly empty).
pub fn lora_up(u: &[f32], m: usize, r: usize, bt: &[f32], n: usize) -> Vec<f32> {
    debug_assert_eq!(u.len(), m * r);
    debug_assert_eq!(bt.len(), r * n);
    let mut v = vec![0f32; m * n];
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the slices have the sizes checked above.
            unsafe { lora_up_avx512(&mut v, u, r, bt, n) };
            return v;
        }
    }
    lora_up_into(&mut v, u, r, bt, n);
    v
}

/// Compiled for AVX-512: the same operations in the same order (Rust never fuses a multiply and an add), in
/// 16-lane vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lora_up_avx512(v: &mut [f32], u: &[f32], r: usize, bt: &[f32], n: usize) {
    lora_up_into(v, u, r, bt, n)
}

#[inline(always)]
fn lora_up_into(v: &mut [f32], u: &[f32], r: usize, bt: &[f32], n: usize) {
    for (vi, ui) in v.chunks_exact_mut(n).zip(u.chunks_exact(r)) {
        for (&c, row) in ui.iter().zip(bt.chunks_exact(n)) {
            for (o, &w) in vi.iter_mut().zip(row) {
                *o += c * w;
            }
        }
    }
}

/// The transpose of a row-major (rows, cols) matrix.
pub fn transpose(b: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    for (i, row) in b.chunks_exact(cols).enumerate() {
        for (j, &x) in row.iter().enumerate() {
            t[j * rows + i] = x;
        }
    }
    t
}

/// `x (m, k) @ wᵀ` for a bf16 `w` (n, k) with x rounded to bf16: the products of the bf16-products mode
/// ([`super::Param::bf16_products`]). With AVX512-BF16 the pairs of products are summed by `vdpbf16ps` into 16
/// lanes chunk by chunk (32 elements a chunk, a zero-padded last chunk), the lanes then reduced as the f32 kernel
/// reduces them: one order for any m, as in [`stream_rows`], at twice its multiply rate and without widening.
/// Elsewhere the rounded x goes through [`stream_rows`].
pub fn stream_rows_bf16_products(x: &[f32], m: usize, k: usize, w: &[half::bf16], n: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        if super::dpbf16::available() {
            let xb: Vec<u16> = x.iter().map(|&v| super::amx::round_bits(v)).collect();
            let w16: &[u16] = bytemuck_u16(w);
            // SAFETY: the CPU has AVX512-BF16 (and F, BW); each block is (width, m), x (m, k), w (n, k).
            return by_blocks(m, n, k, |out, j0| unsafe { wide::block_dp(out, &xb, m, k, w16, j0) });
        }
    }
    stream_rows(&super::amx::round_to_bf16(x), m, k, Packed::Bf16(w), n)
}

/// The bits of bf16 values.
fn bytemuck_u16(w: &[half::bf16]) -> &[u16] {
    // SAFETY: bf16 is a transparent 16-bit value: same size and alignment as u16, every bit pattern valid.
    unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u16, w.len()) }
}

/// Output columns j0.. of every row of x into `out` (width, m).
fn block_of(out: &mut [f32], x: &[f32], m: usize, k: usize, w: Packed, j0: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; `out` holds (width, m), x (m, k) and w's rows j0..j0+width exist.
            unsafe { wide::block(out, x, m, k, w, j0) };
            return;
        }
    }
    for (c, o) in out.chunks_exact_mut(m).enumerate() {
        let j = j0 + c;
        for (i, o) in o.iter_mut().enumerate() {
            *o = plain_dot(&x[i * k..(i + 1) * k], w, j, k);
        }
    }
}

/// Element `j·k + t` of w in f32 (exact for every format).
#[inline(always)]
fn elem(w: Packed, j: usize, k: usize, t: usize) -> f32 {
    match w {
        Packed::Bf16(s) => s[j * k + t].to_f32(),
        Packed::F16(s) => s[j * k + t].to_f32(),
        Packed::F32(s) => s[j * k + t],
        Packed::Int8 { q, .. } => (q[j * k + t] as i32 - 128) as f32,
    }
}

#[inline(always)]
fn row_scale(w: Packed, j: usize) -> f32 {
    match w {
        Packed::Int8 { scales, .. } => scales[j],
        _ => 1.0,
    }
}

/// The sum of the lanes as a fixed tree (the vector code stores its accumulators and calls this too).
#[inline(always)]
fn reduce(acc: &[f32; LANES]) -> f32 {
    let mut v = *acc;
    for w in [8, 4, 2, 1] {
        for t in 0..w {
            v[t] += v[t + w];
        }
    }
    v[0]
}

/// The portable kernel: `x · w[j]` in the order described at the top of this file.
fn plain_dot(x: &[f32], w: Packed, j: usize, k: usize) -> f32 {
    let full = k / LANES * LANES;
    let mut acc = [0f32; LANES];
    for c in (0..full).step_by(LANES) {
        for t in 0..LANES {
            acc[t] += x[c + t] * elem(w, j, k, c + t);
        }
    }
    let mut s = reduce(&acc);
    for (t, &xv) in x.iter().enumerate().take(k).skip(full) {
        s += xv * elem(w, j, k, t);
    }
    s * row_scale(w, j)
}

#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    use super::{elem, row_scale, Packed, LANES};

    /// 16 consecutive elements of a weight row, widened to f32.
    trait Src: Copy {
        /// Bytes of one element.
        const BYTES: usize;
        /// Elements in a 64-byte cache line.
        const LINE: usize = 64 / Self::BYTES;

        /// # Safety
        /// Elements `at..at + 16` exist; AVX-512F is available.
        unsafe fn load(self, at: usize) -> __m512;

        /// The first element's address.
        fn base(self) -> *const i8;

        /// A hint to fetch element `at` (which may lie past the end) into the cache.
        #[inline(always)]
        fn prefetch(self, at: usize) {
            // SAFETY: a prefetch never faults; the address is only computed.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.base().wrapping_add(at * Self::BYTES)) }
        }
    }

    #[derive(Clone, Copy)]
    struct Bf16(*const u16);
    #[derive(Clone, Copy)]
    struct F16(*const u16);
    #[derive(Clone, Copy)]
    struct F32(*const f32);
    #[derive(Clone, Copy)]
    struct Int8(*const u8);

    impl Src for Bf16 {
        const BYTES: usize = 2;

        fn base(self) -> *const i8 {
            self.0 as *const i8
        }

        #[inline(always)]
        unsafe fn load(self, at: usize) -> __m512 {
            let h = _mm256_loadu_si256(self.0.add(at) as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }

    impl Src for F16 {
        const BYTES: usize = 2;

        fn base(self) -> *const i8 {
            self.0 as *const i8
        }

        #[inline(always)]
        unsafe fn load(self, at: usize) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(self.0.add(at) as *const __m256i))
        }
    }

    impl Src for F32 {
        const BYTES: usize = 4;

        fn base(self) -> *const i8 {
            self.0 as *const i8
        }

        #[inline(always)]
        unsafe fn load(self, at: usize) -> __m512 {
            _mm512_loadu_ps(self.0.add(at))
        }
    }

    impl Src for Int8 {
        const BYTES: usize = 1;

        fn base(self) -> *const i8 {
            self.0 as *const i8
        }

        #[inline(always)]
        unsafe fn load(self, at: usize) -> __m512 {
            let b = _mm_loadu_si128(self.0.add(at) as *const __m128i);
            _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(b), _mm512_set1_epi32(128)))
        }
    }

    /// See [`super::block_of`].
    ///
    /// # Safety
    /// AVX-512F is available; `out` is (width, m) with rows j0..j0+width of w existing; x is (m, k).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(out: &mut [f32], x: &[f32], m: usize, k: usize, w: Packed, j0: usize) {
        match w {
            Packed::Bf16(s) => run(out, x, m, k, w, j0, Bf16(s.as_ptr() as *const u16)),
            Packed::F16(s) => run(out, x, m, k, w, j0, F16(s.as_ptr() as *const u16)),
            Packed::F32(s) => run(out, x, m, k, w, j0, F32(s.as_ptr())),
            Packed::Int8 { q, .. } => run(out, x, m, k, w, j0, Int8(q.as_ptr())),
        }
    }

    /// Runs `$body` with `$j` and `$r` bound to every (weight row, x row) pair of a J × R tile.
    macro_rules! each {
        ($J:expr, $R:expr, |$j:ident, $r:ident| $body:expr) => {
            for $j in 0..$J {
                for $r in 0..$R {
                    $body;
                }
            }
        };
    }

    /// A kernel computing a J × R tile of outputs: columns c..c+J of rows i..i+R.
    trait Tiler {
        /// # Safety
        /// As the kernel's: the tile lies inside the block.
        unsafe fn tile<const J: usize, const R: usize>(&mut self, c: usize, i: usize);
    }

    /// Covers a block of `width` output columns × `m` rows with tiles: 4 × 4 where it can, 8 × 1 for fewer than four
    /// rows of x (the eight sums are the independent adds that keep the adder busy while one chain waits), smaller
    /// tiles at the edges.
    #[inline(always)]
    unsafe fn tiles<T: Tiler>(t: &mut T, m: usize, width: usize) {
        let mut c = 0;
        while c < width {
            let jn = (width - c).min(if m < 4 { 8 } else { 4 });
            let mut i = 0;
            while i < m {
                let rn = (m - i).min(4);
                match (jn, rn) {
                    (4, 4) => t.tile::<4, 4>(c, i),
                    (8, _) => (0..rn).for_each(|r| t.tile::<8, 1>(c, i + r)),
                    (4, _) => (0..rn).for_each(|r| t.tile::<4, 1>(c, i + r)),
                    (_, 4) => (0..jn).for_each(|q| t.tile::<1, 4>(c + q, i)),
                    _ => each!(jn, rn, |q, r| t.tile::<1, 1>(c + q, i + r)),
                }
                i += rn;
            }
            c += jn;
        }
    }

    /// The f32-accumulating kernel's arguments.
    struct Wide<'a, S> {
        out: &'a mut [f32],
        x: &'a [f32],
        m: usize,
        k: usize,
        w: Packed<'a>,
        j0: usize,
        s: S,
    }

    impl<S: Src> Tiler for Wide<'_, S> {
        #[inline(always)]
        unsafe fn tile<const J: usize, const R: usize>(&mut self, c: usize, i: usize) {
            tile::<S, J, R>(self.out, self.x, self.m, self.k, self.w, self.j0, c, i, self.s)
        }
    }

    #[inline(always)]
    unsafe fn run<S: Src>(out: &mut [f32], x: &[f32], m: usize, k: usize, w: Packed, j0: usize, s: S) {
        let width = out.len() / m;
        tiles(&mut Wide { out, x, m, k, w, j0, s }, m, width);
    }

    /// Output columns c..c+J of rows i..i+R into `out` (width, m): one 16-lane accumulator each.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<S: Src, const J: usize, const R: usize>(
        out: &mut [f32],
        x: &[f32],
        m: usize,
        k: usize,
        w: Packed,
        j0: usize,
        c: usize,
        i: usize,
        s: S,
    ) {
        let full = k / LANES * LANES;
        let wbase = (j0 + c) * k;
        let xp = x.as_ptr().add(i * k);
        let mut acc = [[_mm512_setzero_ps(); R]; J];
        let mut at = 0;
        while at < full {
            let mut wv = [_mm512_setzero_ps(); J];
            for (q, v) in wv.iter_mut().enumerate() {
                if at % S::LINE == 0 {
                    // The next tile's rows, as in `tile_dp`.
                    s.prefetch(wbase + J * k + (at / S::LINE * J + q) * S::LINE);
                }
                *v = s.load(wbase + q * k + at);
            }
            let mut xv = [_mm512_setzero_ps(); R];
            for (r, v) in xv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(xp.add(r * k + at));
            }
            each!(J, R, |q, r| acc[q][r] = _mm512_add_ps(acc[q][r], _mm512_mul_ps(xv[r], wv[q])));
            at += LANES;
        }
        each!(J, R, |q, r| {
            let row = &x[(i + r) * k..(i + r + 1) * k];
            out[(c + q) * m + i + r] = finish(acc[q][r], row, w, j0 + c + q, k);
        });
    }

    /// [`block`] for bf16 x and w with `vdpbf16ps`: 4 × 4 tiles (8 × 1 for fewer than four rows of x).
    ///
    /// # Safety
    /// AVX512-BF16, F and BW are available; `out` is (width, m) with rows j0..j0+width of w existing; x is (m, k).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn block_dp(out: &mut [f32], x: &[u16], m: usize, k: usize, w: &[u16], j0: usize) {
        let width = out.len() / m;
        tiles(&mut Dp { out, x, m, k, w, j0 }, m, width);
    }

    /// The dot-product kernel's arguments.
    struct Dp<'a> {
        out: &'a mut [f32],
        x: &'a [u16],
        m: usize,
        k: usize,
        w: &'a [u16],
        j0: usize,
    }

    impl Tiler for Dp<'_> {
        #[inline(always)]
        unsafe fn tile<const J: usize, const R: usize>(&mut self, c: usize, i: usize) {
            tile_dp::<J, R>(self.out, self.x, self.m, self.k, self.w, self.j0, c, i)
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_dp<const J: usize, const R: usize>(
        out: &mut [f32],
        x: &[u16],
        m: usize,
        k: usize,
        w: &[u16],
        j0: usize,
        c: usize,
        i: usize,
    ) {
        const CHUNK: usize = 32;
        let wp = w.as_ptr().add((j0 + c) * k);
        let xp = x.as_ptr().add(i * k);
        let mut acc = [[_mm512_setzero_ps(); R]; J];
        let mut at = 0;
        while at < k {
            let rest = k - at;
            // The last chunk is loaded under a mask: its missing elements are zeros.
            let mask: u32 = if rest >= CHUNK { u32::MAX } else { (1u32 << rest) - 1 };
            let mut wv = [_mm512_setzero_si512(); J];
            for (q, v) in wv.iter_mut().enumerate() {
                // The next tile's rows (the J·k elements after this tile's), J lines a chunk: they are fetched
                // while this tile computes, rows too short for the hardware prefetchers to ramp up on.
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(J * k + (at / CHUNK * J + q) * 32) as *const i8);
                *v = _mm512_maskz_loadu_epi16(mask, wp.add(q * k + at) as *const i16);
            }
            let mut xv = [_mm512_setzero_si512(); R];
            for (r, v) in xv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_epi16(mask, xp.add(r * k + at) as *const i16);
            }
            each!(J, R, |q, r| {
                acc[q][r] = _mm512_dpbf16_ps(
                    acc[q][r],
                    std::mem::transmute::<__m512i, __m512bh>(xv[r]),
                    std::mem::transmute::<__m512i, __m512bh>(wv[q]),
                )
            });
            at += CHUNK;
        }
        each!(J, R, |q, r| out[(c + q) * m + i + r] = hsum(acc[q][r]));
    }

    /// The 16 lanes summed as [`super::reduce`]'s tree.
    #[inline(always)]
    unsafe fn hsum(v: __m512) -> f32 {
        let v = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v)); // lanes t < 8: v[t] + v[t + 8]
        let h = _mm512_castps512_ps256(v);
        let q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h)); // t < 4: + v[t + 4]
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q)); // t < 2: + v[t + 2]
        let q = _mm_add_ss(q, _mm_shuffle_ps::<1>(q, q)); // v[0] + v[1]
        _mm_cvtss_f32(q)
    }

    /// The lanes reduced, the tail added and the row's scale applied, as the portable kernel does ([`super::reduce`]'s
    /// tree as vector adds: storing the lanes to reduce them in scalars stalls on store forwarding).
    #[inline(always)]
    unsafe fn finish(v: __m512, x: &[f32], w: Packed, j: usize, k: usize) -> f32 {
        let mut sum = hsum(v);
        for (t, &xv) in x.iter().enumerate().skip(k / LANES * LANES) {
            sum += xv * elem(w, j, k, t);
        }
        sum * row_scale(w, j)
    }
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Each format against an f64 product of its widened elements, and every row of every batch size bit for bit
    /// equal to the same row alone (the property batched decoding relies on), for the vector and portable code.
    #[test]
    fn rows_match_f64_and_are_the_same_alone_as_in_any_batch() {
        for (k, n) in [(37, 5), (64, 70), (200, 9), (2560 + 13, 130)] {
            let wf = data(n * k, 2);
            let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
            let (q, scales) =
                super::super::mixed::quantize_rows(n, k, |r, out| out.copy_from_slice(&wf[r * k..(r + 1) * k]));
            let formats = [
                Packed::Bf16(&wb),
                Packed::F16(&wh),
                Packed::F32(&wf),
                Packed::Int8 { q: &q, scales: &scales, cols: k },
            ];
            let x = data(STREAM_ROWS * k, 3);
            for w in formats {
                let alone: Vec<Vec<f32>> =
                    (0..STREAM_ROWS).map(|i| stream_rows(&x[i * k..(i + 1) * k], 1, k, w, n)).collect();
                for (i, row) in alone.iter().enumerate() {
                    for (j, &got) in row.iter().enumerate() {
                        let want: f64 = (0..k).map(|t| x[i * k + t] as f64 * elem(w, j, k, t) as f64).sum::<f64>()
                            * row_scale(w, j) as f64;
                        let bound = 1e-5 * (k as f64).sqrt() * (1.0 + want.abs());
                        assert!((got as f64 - want).abs() <= bound, "k={k} n={n} ({i}, {j}): {got} vs {want}");
                        assert_eq!(got.to_bits(), plain_dot(&x[i * k..(i + 1) * k], w, j, k).to_bits());
                    }
                }
                for m in [2, 3, 4, 5, 8, 13, STREAM_ROWS] {
                    let y = stream_rows(&x[..m * k], m, k, w, n);
                    for i in 0..m {
                        let got: Vec<u32> = y[i * n..(i + 1) * n].iter().map(|v| v.to_bits()).collect();
                        let want: Vec<u32> = alone[i].iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want, "k={k} n={n}: row {i} of {m} differs from the row alone");
                    }
                }
            }
        }
    }

    /// The bf16-products kernel: x rounded to bf16 against an f64 product of the rounded values, and every row
    /// of every batch size bit for bit equal to the row alone (tails shorter than a 32-element chunk included).
    #[test]
    fn bf16_product_rows_match_f64_and_are_the_same_alone_as_in_any_batch() {
        for (k, n) in [(5, 3), (64, 70), (200, 9), (2560 + 13, 130)] {
            let wb: Vec<bf16> = data(n * k, 5).iter().map(|&v| bf16::from_f32(v)).collect();
            let x = data(STREAM_ROWS * k, 6);
            let xr: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            let alone: Vec<Vec<f32>> =
                (0..STREAM_ROWS).map(|i| stream_rows_bf16_products(&x[i * k..(i + 1) * k], 1, k, &wb, n)).collect();
            for (i, row) in alone.iter().enumerate() {
                for (j, &got) in row.iter().enumerate() {
                    let want: f64 = (0..k).map(|t| xr[i * k + t] as f64 * wb[j * k + t].to_f64()).sum();
                    let bound = 1e-5 * (k as f64).sqrt() * (1.0 + want.abs());
                    assert!((got as f64 - want).abs() <= bound, "k={k} n={n} ({i}, {j}): {got} vs {want}");
                }
            }
            for m in [2, 3, 4, 5, 8, 13, STREAM_ROWS] {
                let y = stream_rows_bf16_products(&x[..m * k], m, k, &wb, n);
                for i in 0..m {
                    let got: Vec<u32> = y[i * n..(i + 1) * n].iter().map(|v| v.to_bits()).collect();
                    let want: Vec<u32> = alone[i].iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "k={k} n={n}: row {i} of {m} differs from the row alone");
                }
            }
        }
    }

    /// The LoRA up-projection: each output the in-order f32 sum of its r products (a plain scalar loop, the
    /// reference), whichever kernel runs, close to the f64 product, and the transpose helper exact.
    #[test]
    fn lora_up_sums_in_order_and_matches_f64() {
        for (m, r, n) in [(1, 8, 2304), (8, 16, 70), (3, 64, 33)] {
            let u = data(m * r, 7);
            let b = data(n * r, 8);
            let bt = transpose(&b, n, r);
            assert_eq!(transpose(&bt, r, n), b);
            let v = lora_up(&u, m, r, &bt, n);
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0f32;
                    for t in 0..r {
                        s += u[i * r + t] * b[j * r + t];
                    }
                    assert_eq!(v[i * n + j].to_bits(), s.to_bits(), "({m}, {r}, {n}) at ({i}, {j})");
                    let want: f64 = (0..r).map(|t| u[i * r + t] as f64 * b[j * r + t] as f64).sum();
                    assert!((s as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()));
                }
            }
        }
    }
}
