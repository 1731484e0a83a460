//! A small rasteriser for the synthetic datasets: filled rectangles, rounded rectangles, ellipses, polygons and
//! thick lines, drawn on a supersampled canvas and box-filtered down, so edges are anti-aliased without any
//! per-primitive coverage maths. Coordinates are in output pixels (floats); the pixel (x, y) covers
//! [x, x+1) × [y, y+1).

use image::{Rgb, RgbImage};

/// RGB colour.
pub type Rgb8 = [u8; 3];

/// A canvas `size`×`size` output pixels, stored `ss` times larger in each direction.
pub struct Canvas {
    width: u32,
    height: u32,
    ss: u32,
    buf: Vec<Rgb8>,
}

impl Canvas {
    /// A canvas of `width`×`height` output pixels filled with `bg`, supersampled `ss`×`ss` (1 = no anti-aliasing).
    pub fn new(width: u32, height: u32, ss: u32, bg: Rgb8) -> Canvas {
        let ss = ss.max(1);
        Canvas { width, height, ss, buf: vec![bg; (width * ss * height * ss) as usize] }
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// Paints every sample whose centre satisfies `inside`, scanning only the bounding box given in output pixels.
    fn paint(&mut self, bbox: (f32, f32, f32, f32), colour: Rgb8, inside: impl Fn(f32, f32) -> bool) {
        let s = self.ss as f32;
        let (w, h) = ((self.width * self.ss) as i64, (self.height * self.ss) as i64);
        let x0 = ((bbox.0 * s).floor() as i64).clamp(0, w);
        let x1 = ((bbox.2 * s).ceil() as i64).clamp(0, w);
        let y0 = ((bbox.1 * s).floor() as i64).clamp(0, h);
        let y1 = ((bbox.3 * s).ceil() as i64).clamp(0, h);
        for sy in y0..y1 {
            let y = (sy as f32 + 0.5) / s;
            let row = (sy * w) as usize;
            for sx in x0..x1 {
                let x = (sx as f32 + 0.5) / s;
                if inside(x, y) {
                    self.buf[row + sx as usize] = colour;
                }
            }
        }
    }

    /// Axis-aligned rectangle [x0, x1) × [y0, y1).
    pub fn rect(&mut self, x0: f32, y0: f32, x1: f32, y1: f32, colour: Rgb8) {
        self.paint((x0, y0, x1, y1), colour, |x, y| x >= x0 && x < x1 && y >= y0 && y < y1);
    }

    /// Rectangle with corners rounded by radius `r`.
    pub fn rounded_rect(&mut self, x0: f32, y0: f32, x1: f32, y1: f32, r: f32, colour: Rgb8) {
        let r = r.min((x1 - x0) / 2.0).min((y1 - y0) / 2.0).max(0.0);
        self.paint((x0, y0, x1, y1), colour, |x, y| {
            if x < x0 || x >= x1 || y < y0 || y >= y1 {
                return false;
            }
            let cx = x.clamp(x0 + r, x1 - r);
            let cy = y.clamp(y0 + r, y1 - r);
            (x - cx).powi(2) + (y - cy).powi(2) <= r * r
        });
    }

    /// Ellipse centred at (cx, cy) with radii rx, ry.
    pub fn ellipse(&mut self, cx: f32, cy: f32, rx: f32, ry: f32, colour: Rgb8) {
        if rx <= 0.0 || ry <= 0.0 {
            return;
        }
        self.paint((cx - rx, cy - ry, cx + rx, cy + ry), colour, |x, y| {
            ((x - cx) / rx).powi(2) + ((y - cy) / ry).powi(2) <= 1.0
        });
    }

    pub fn circle(&mut self, cx: f32, cy: f32, r: f32, colour: Rgb8) {
        self.ellipse(cx, cy, r, r, colour);
    }

    /// The upper half of an ellipse (a dome) whose flat side lies on y = `base`.
    pub fn half_ellipse(&mut self, cx: f32, base: f32, rx: f32, ry: f32, colour: Rgb8) {
        if rx <= 0.0 || ry <= 0.0 {
            return;
        }
        self.paint((cx - rx, base - ry, cx + rx, base), colour, |x, y| {
            y <= base && ((x - cx) / rx).powi(2) + ((y - base) / ry).powi(2) <= 1.0
        });
    }

    /// Any simple polygon (convex or not), filled by the even-odd rule.
    pub fn polygon(&mut self, pts: &[(f32, f32)], colour: Rgb8) {
        if pts.len() < 3 {
            return;
        }
        let bbox = pts.iter().fold((f32::MAX, f32::MAX, f32::MIN, f32::MIN), |b, &(x, y)| {
            (b.0.min(x), b.1.min(y), b.2.max(x), b.3.max(y))
        });
        self.paint(bbox, colour, |x, y| point_in_polygon(pts, x, y));
    }

    /// A line of width `w` with round caps (a capsule).
    pub fn line(&mut self, x0: f32, y0: f32, x1: f32, y1: f32, w: f32, colour: Rgb8) {
        let r = w / 2.0;
        let bbox = (x0.min(x1) - r, y0.min(y1) - r, x0.max(x1) + r, y0.max(y1) + r);
        let (dx, dy) = (x1 - x0, y1 - y0);
        let len2 = dx * dx + dy * dy;
        self.paint(bbox, colour, |x, y| {
            let t = if len2 > 0.0 { (((x - x0) * dx + (y - y0) * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
            let (px, py) = (x0 + t * dx - x, y0 + t * dy - y);
            px * px + py * py <= r * r
        });
    }

    /// The closed outline of a polygon, drawn as capsules of width `w`.
    pub fn polyline_closed(&mut self, pts: &[(f32, f32)], w: f32, colour: Rgb8) {
        for i in 0..pts.len() {
            let (a, b) = (pts[i], pts[(i + 1) % pts.len()]);
            self.line(a.0, a.1, b.0, b.1, w, colour);
        }
    }

    /// Fills rows [y0, y1) with a vertical gradient from `top` to `bottom`.
    pub fn vertical_gradient(&mut self, y0: f32, y1: f32, top: Rgb8, bottom: Rgb8) {
        let s = self.ss as f32;
        let w = (self.width * self.ss) as usize;
        let h = (self.height * self.ss) as i64;
        let sy0 = ((y0 * s).floor() as i64).clamp(0, h);
        let sy1 = ((y1 * s).ceil() as i64).clamp(0, h);
        // Quantised per output row so that the downsampled image stays flat within a row (small PNGs).
        for sy in sy0..sy1 {
            let y = (sy as f32 / s).floor() + 0.5;
            let t = ((y - y0) / (y1 - y0).max(1e-6)).clamp(0.0, 1.0);
            let c = mix(top, bottom, t);
            let row = sy as usize * w;
            self.buf[row..row + w].fill(c);
        }
    }

    /// The output image: each output pixel is the mean of its ss×ss samples (rounded).
    pub fn finish(&self) -> RgbImage {
        let (w, h, ss) = (self.width, self.height, self.ss);
        let sw = (w * ss) as usize;
        let n = ss * ss;
        RgbImage::from_fn(w, h, |x, y| {
            let mut acc = [0u32; 3];
            for sy in 0..ss {
                let row = ((y * ss + sy) as usize) * sw;
                for sx in 0..ss {
                    let p = self.buf[row + (x * ss + sx) as usize];
                    for c in 0..3 {
                        acc[c] += p[c] as u32;
                    }
                }
            }
            Rgb([0, 1, 2].map(|c| ((acc[c] + n / 2) / n) as u8))
        })
    }
}

fn point_in_polygon(pts: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut inside = false;
    let mut j = pts.len() - 1;
    for i in 0..pts.len() {
        let (xi, yi) = pts[i];
        let (xj, yj) = pts[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Linear interpolation between two colours, `t` in [0, 1].
pub fn mix(a: Rgb8, b: Rgb8, t: f32) -> Rgb8 {
    [0, 1, 2].map(|c| (a[c] as f32 + (b[c] as f32 - a[c] as f32) * t).round().clamp(0.0, 255.0) as u8)
}

/// `c` scaled towards black (`f` < 1) or white (`f` > 1), for shading.
pub fn shade(c: Rgb8, f: f32) -> Rgb8 {
    if f <= 1.0 {
        mix([0, 0, 0], c, f.max(0.0))
    } else {
        mix(c, [255, 255, 255], (f - 1.0).min(1.0))
    }
}

/// The vertices of a regular polygon with `n` corners, the first one straight up.
pub fn regular_polygon(cx: f32, cy: f32, r: f32, n: usize, rotation: f32) -> Vec<(f32, f32)> {
    (0..n)
        .map(|i| {
            let a = rotation - std::f32::consts::FRAC_PI_2 + i as f32 * std::f32::consts::TAU / n as f32;
            (cx + r * a.cos(), cy + r * a.sin())
        })
        .collect()
}

/// A five-pointed star: outer radius `r`, inner radius `r·inner`.
pub fn star(cx: f32, cy: f32, r: f32, inner: f32) -> Vec<(f32, f32)> {
    (0..10)
        .map(|i| {
            let a = -std::f32::consts::FRAC_PI_2 + i as f32 * std::f32::consts::PI / 5.0;
            let rr = if i % 2 == 0 { r } else { r * inner };
            (cx + rr * a.cos(), cy + rr * a.sin())
        })
        .collect()
}

/// PNG bytes of `img`, compressed hard (the datasets are written once and read many times).
pub fn png_bytes(img: &RgbImage) -> anyhow::Result<Vec<u8>> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder;
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Best, FilterType::Adaptive).write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}
