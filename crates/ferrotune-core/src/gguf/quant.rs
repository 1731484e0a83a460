//! ggml's block formats, quantized as llama.cpp's reference code does (`quantize_row_*_ref` in ggml-quants.c,
//! no importance matrix), so that a file written here holds what `llama-quantize` would write: Q8_0 and Q5_0
//! (blocks of 32), Q4_K and Q6_K (super-blocks of 256), and the 16-bit types. Each has its dequantization (the tests
//! measure the formats' errors with it).

use half::{bf16, f16};
use rayon::prelude::*;

use super::format::GgmlType;

/// `values` (rows of `row` values, row-major) in type `ty`. The row length must split into the type's blocks.
pub fn quantize(ty: GgmlType, values: &[f32], row: usize) -> Vec<u8> {
    let (blk, size) = ty.block();
    assert!(row.is_multiple_of(blk) && values.len().is_multiple_of(row), "{} rows of {row}", ty.name());
    let row_bytes = row / blk * size;
    let mut out = vec![0u8; values.len() / row * row_bytes];
    out.par_chunks_mut(row_bytes).zip(values.par_chunks(row)).for_each(|(o, x)| match ty {
        GgmlType::F32 => x.iter().zip(o.chunks_exact_mut(4)).for_each(|(v, b)| b.copy_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => {
            x.iter().zip(o.chunks_exact_mut(2)).for_each(|(v, b)| b.copy_from_slice(&f16::from_f32(*v).to_le_bytes()))
        }
        GgmlType::BF16 => {
            x.iter().zip(o.chunks_exact_mut(2)).for_each(|(v, b)| b.copy_from_slice(&bf16::from_f32(*v).to_le_bytes()))
        }
        GgmlType::Q8_0 => x.chunks_exact(32).zip(o.chunks_exact_mut(34)).for_each(|(x, b)| q8_0(x, b)),
        GgmlType::Q5_0 => x.chunks_exact(32).zip(o.chunks_exact_mut(22)).for_each(|(x, b)| q5_0(x, b)),
        GgmlType::Q4K => x.chunks_exact(256).zip(o.chunks_exact_mut(144)).for_each(|(x, b)| q4_k(x, b)),
        GgmlType::Q6K => x.chunks_exact(256).zip(o.chunks_exact_mut(210)).for_each(|(x, b)| q6_k(x, b)),
    });
    out
}

/// The values `data` holds in type `ty`.
pub fn dequantize(ty: GgmlType, data: &[u8]) -> Vec<f32> {
    let (blk, size) = ty.block();
    let mut out = vec![0f32; data.len() / size * blk];
    out.par_chunks_mut(blk).zip(data.par_chunks_exact(size)).for_each(|(y, b)| match ty {
        GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::BF16 => y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q8_0 => {
            let d = half(b, 0);
            y.iter_mut().zip(&b[2..]).for_each(|(y, &q)| *y = d * (q as i8) as f32);
        }
        GgmlType::Q5_0 => {
            let d = half(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..16 {
                let lo = (b[6 + j] & 0xF) as i32 | (((qh >> j) & 1) << 4) as i32;
                let hi = (b[6 + j] >> 4) as i32 | (((qh >> (j + 16)) & 1) << 4) as i32;
                y[j] = d * (lo - 16) as f32;
                y[j + 16] = d * (hi - 16) as f32;
            }
        }
        GgmlType::Q4K => {
            let (d, dmin) = (half(b, 0), half(b, 2));
            let (scales, qs) = (&b[4..16], &b[16..]);
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, scales);
                let (c, hi) = (j / 2, j % 2 == 1);
                for l in 0..32 {
                    let q = qs[32 * c + l];
                    let q = if hi { q >> 4 } else { q & 0xF };
                    y[32 * j + l] = d * sc as f32 * q as f32 - dmin * m as f32;
                }
            }
        }
        GgmlType::Q6K => {
            let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
            let d = half(b, 208);
            for h in 0..2 {
                for l in 0..32 {
                    let (lo, hb) = (&ql[64 * h..], qh[32 * h + l]);
                    let q = [
                        (lo[l] & 0xF) | ((hb & 3) << 4),
                        (lo[l + 32] & 0xF) | (((hb >> 2) & 3) << 4),
                        (lo[l] >> 4) | (((hb >> 4) & 3) << 4),
                        (lo[l + 32] >> 4) | (((hb >> 6) & 3) << 4),
                    ];
                    for (k, q) in q.into_iter().enumerate() {
                        let i = 128 * h + l + 32 * k;
                        y[i] = d * (sc[i / 16] as i8) as f32 * (q as i32 - 32) as f32;
                    }
                }
            }
        }
    });
    out
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn put_half(b: &mut [u8], at: usize, v: f32) -> f32 {
    let h = f16::from_f32(v);
    b[at..at + 2].copy_from_slice(&h.to_le_bytes());
    h.to_f32()
}

/// ggml's `nearest_int`: round half to even.
fn nearest_int(f: f32) -> i32 {
    f.round_ties_even() as i32
}

fn q8_0(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_half(b, 0, d);
    for (q, v) in b[2..].iter_mut().zip(x) {
        *q = (v * id).round() as i8 as u8;
    }
}

fn q5_0(x: &[f32], b: &mut [u8]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_half(b, 0, d);
    let mut qh = 0u32;
    for j in 0..16 {
        let x0 = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let x1 = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
        b[6 + j] = (x0 & 0xF) | ((x1 & 0xF) << 4);
        qh |= ((x0 as u32 & 0x10) >> 4) << j;
        qh |= ((x1 as u32 & 0x10) >> 4) << (j + 16);
    }
    b[2..6].copy_from_slice(&qh.to_le_bytes());
}

/// (scale, min) of sub-block j from Q4_K's 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// ggml's `make_qkx2_quants` for one sub-block: levels in 0..=nmax with a scale and a min, the weighted error
/// searched over `nstep + 1` scales. Returns (scale, −min).
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(x: &[f32], w: &[f32], nmax: i32, l: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = li as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = li as u8;
            let lf = li as f32;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += w[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

fn q4_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0u8; 256];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    let mut w = [0f32; 32];
    for j in 0..8 {
        let xs = &x[32 * j..32 * (j + 1)];
        let sum_x2: f32 = xs.iter().map(|v| v * v).sum();
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in w.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(xs, &w, 15, &mut l[32 * j..32 * (j + 1)], -1.0, 0.1, 20);
        scales[j] = s;
        mins[j] = m;
        max_scale = max_scale.max(s);
        max_min = max_min.max(m);
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let packed = &mut b[4..16];
    packed.fill(0);
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = put_half(b, 0, max_scale / 63.0);
    let dmin = put_half(b, 2, max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &b[4..16]);
        let dd = d * sc as f32;
        if dd == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 0..32 {
            l[32 * j + i] = nearest_int((x[32 * j + i] + dm) / dd).clamp(0, 15) as u8;
        }
    }
    let qs = &mut b[16..];
    for c in 0..4 {
        for i in 0..32 {
            qs[32 * c + i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
        }
    }
}

/// ggml's `make_qx_quants` with `rmse_type` 1 and no weights: symmetric levels in −nmax..nmax−1 (stored + nmax).
fn make_qx_quants(x: &[f32], nmax: i32, l: &mut [u8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l.fill(0);
        return 0.0;
    }
    let fit = |iscale: f32, l: &mut [u8]| -> (f32, f32) {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for (i, &v) in x.iter().enumerate() {
            let li = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
            l[i] = (li + nmax) as u8;
            let w = v * v;
            sumlx += w * v * li as f32;
            suml2 += w * li as f32 * li as f32;
        }
        (sumlx, suml2)
    };
    let (sumlx, suml2) = fit(-(nmax as f32) / max, l);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    let mut laux = [0u8; 16];
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = fit(iscale, &mut laux[..x.len()]);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            l.copy_from_slice(&laux[..x.len()]);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

fn q6_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0u8; 256];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let s = make_qx_quants(&x[16 * ib..16 * (ib + 1)], 32, &mut l[16 * ib..16 * (ib + 1)]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < 1e-15 {
        b.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = put_half(b, 208, 1.0 / iscale);
    for ib in 0..16 {
        b[192 + ib] = (nearest_int(iscale * scales[ib]).min(127) as i8) as u8;
    }
    for j in 0..16 {
        let dd = d * (b[192 + j] as i8) as f32;
        if dd == 0.0 {
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest_int(x[16 * j + i] / dd).clamp(-32, 31) + 32) as u8;
        }
    }
    let (ql, qh) = b[..192].split_at_mut(128);
    for h in 0..2 {
        for i in 0..32 {
            let base = 128 * h + i;
            let (a, bb, c, e) = (l[base], l[base + 32], l[base + 64], l[base + 96]);
            ql[64 * h + i] = (a & 0xF) | ((c & 0xF) << 4);
            ql[64 * h + i + 32] = (bb & 0xF) | ((e & 0xF) << 4);
            qh[32 * h + i] = (a >> 4) | ((bb >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every format reproduces its input within the error its bits allow (relative to the block's largest value).
    #[test]
    fn each_format_dequantizes_to_its_input_within_its_precision() {
        let mut s = 0x9e37_79b9u32;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * 2.0
        };
        let x: Vec<f32> = (0..4 * 512).map(|i| rnd() * if i % 97 == 0 { 8.0 } else { 1.0 }).collect();
        for (ty, bound) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 1e-3),
            (GgmlType::BF16, 8e-3),
            (GgmlType::Q8_0, 0.01),
            (GgmlType::Q6K, 0.04),
            (GgmlType::Q5_0, 0.07),
            (GgmlType::Q4K, 0.15),
        ] {
            let y = dequantize(ty, &quantize(ty, &x, 512));
            assert_eq!(y.len(), x.len());
            let blk = ty.block().0.max(32);
            for (xb, yb) in x.chunks(blk).zip(y.chunks(blk)) {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = xb.iter().zip(yb).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err <= bound * amax, "{}: error {err} for a block of max {amax}", ty.name());
            }
        }
    }
}
