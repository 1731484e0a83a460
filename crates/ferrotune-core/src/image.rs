//! Qwen2-VL-family image processor: decode, LLaMA-Factory's pre-resize, `smart_resize`, bicubic resize,
//! normalise, patchify. Training, evaluation, the data check and serving all take their pictures through here.
//!
//! The reference is transformers' `Qwen2VLImageProcessor` with its default torchvision backend, which is what
//! `AutoProcessor` gives for `qwen3_5` checkpoints. Its output is reproduced exactly on the CPU path:
//! - the resize is torchvision's `resize(uint8, BICUBIC, antialias=True)`, which runs PyTorch's integer kernel
//!   (Pillow's separable algorithm with int16 weights and a per-axis precision), see [`resize_bicubic`];
//! - normalisation is fused into `(k - mean*255) / (std*255)` in f32, as transformers fuses rescale and normalize;
//! - patches are flattened in the order the vision tower's merger expects.
//!
//! (transformers run with `device="cuda"` resizes in float instead, which is not reproduced here.)
//!
//! Decoding follows PIL's `Image.open(..).convert("RGB")`: alpha is dropped (not composited), greyscale is
//! replicated, 16-bit samples keep their high byte, except 16-bit greyscale, which PIL clamps to 255. PNG, BMP,
//! GIF and WebP decode to exactly PIL's pixels (lossy WebP included, on the test files); JPEG decoders differ
//! (libjpeg-turbo in PIL), by a few levels per sample (3 at most on the 4:2:0 test file).

use std::path::{Path, PathBuf};

use ::image::{DynamicImage, RgbImage};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Deserialize;

/// Preprocessing settings, read from a checkpoint's `preprocessor_config.json`.
///
/// Keys that are absent take the Qwen3.5 values (patch 16, temporal patch 2, merge 2, 65536..16777216 pixels,
/// mean and std 0.5, rescale 1/255, bicubic). transformers' class defaults are Qwen2-VL's instead (patch 14,
/// CLIP mean and std), but Qwen checkpoints write every key, so the difference only shows on hand-made files.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    /// `size.shortest_edge` (or legacy top-level `min_pixels`): the least number of pixels after resizing.
    pub min_pixels: usize,
    /// `size.longest_edge` (or legacy top-level `max_pixels`): the most pixels after resizing.
    pub max_pixels: usize,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    pub rescale_factor: f64,
    /// Always effectively true here: images are decoded to RGB, the only input the vision tower takes.
    pub do_convert_rgb: bool,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
    /// PIL resampling code; only 3 (bicubic), the value every Qwen VL checkpoint uses, is supported.
    pub resample: u32,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        Self {
            patch_size: 16,
            temporal_patch_size: 2,
            merge_size: 2,
            min_pixels: 65536,
            max_pixels: 16777216,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            rescale_factor: 1.0 / 255.0,
            do_convert_rgb: true,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
            resample: 3,
        }
    }
}

/// `image_mean` / `image_std` may be one number for all channels or one per channel.
#[derive(Deserialize)]
#[serde(untagged)]
enum PerChannel {
    One(f64),
    Three([f64; 3]),
}

impl PerChannel {
    fn get(self) -> [f64; 3] {
        match self {
            PerChannel::One(v) => [v; 3],
            PerChannel::Three(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct RawSize {
    shortest_edge: Option<usize>,
    longest_edge: Option<usize>,
}

/// The JSON as written; unknown keys (`image_processor_type`, `processor_class`, ...) are ignored.
#[derive(Deserialize)]
struct RawConfig {
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    merge_size: Option<usize>,
    size: Option<RawSize>,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
    image_mean: Option<PerChannel>,
    image_std: Option<PerChannel>,
    rescale_factor: Option<f64>,
    do_convert_rgb: Option<bool>,
    do_resize: Option<bool>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
    resample: Option<u32>,
}

impl ImageProcessorConfig {
    /// Reads `<dir>/preprocessor_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("preprocessor_config.json");
        if !file.exists() {
            bail!(
                "{}: not found; copy preprocessor_config.json from the base model's checkpoint into {}",
                file.display(),
                dir.display()
            );
        }
        Self::from_file(&file)
    }

    /// Reads a `preprocessor_config.json` file.
    pub fn from_file(file: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
        Self::from_json(&text).with_context(|| format!("{}: invalid image processor config", file.display()))
    }

    /// Parses the text of a `preprocessor_config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text)?;
        let d = Self::default();
        // As in transformers: top-level min_pixels / max_pixels override `size`.
        let (mut min_pixels, mut max_pixels) = (d.min_pixels, d.max_pixels);
        if let Some(size) = raw.size {
            match (size.shortest_edge, size.longest_edge) {
                (Some(lo), Some(hi)) => (min_pixels, max_pixels) = (lo, hi),
                _ if raw.min_pixels.is_some() && raw.max_pixels.is_some() => {}
                _ => bail!("`size` must contain both `shortest_edge` (min pixels) and `longest_edge` (max pixels)"),
            }
        }
        let config = Self {
            patch_size: raw.patch_size.unwrap_or(d.patch_size),
            temporal_patch_size: raw.temporal_patch_size.unwrap_or(d.temporal_patch_size),
            merge_size: raw.merge_size.unwrap_or(d.merge_size),
            min_pixels: raw.min_pixels.unwrap_or(min_pixels),
            max_pixels: raw.max_pixels.unwrap_or(max_pixels),
            image_mean: raw.image_mean.map_or(d.image_mean, PerChannel::get),
            image_std: raw.image_std.map_or(d.image_std, PerChannel::get),
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            do_convert_rgb: raw.do_convert_rgb.unwrap_or(d.do_convert_rgb),
            do_resize: raw.do_resize.unwrap_or(d.do_resize),
            do_rescale: raw.do_rescale.unwrap_or(d.do_rescale),
            do_normalize: raw.do_normalize.unwrap_or(d.do_normalize),
            resample: raw.resample.unwrap_or(d.resample),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        // Sizes are divided by and multiplied together: each must be at least 1, and a token's side (patch x
        // merge) at most 2^16 pixels, which no image processor comes near, so that no product overflows.
        for (key, v, usual) in [
            ("patch_size", self.patch_size, 16),
            ("temporal_patch_size", self.temporal_patch_size, 2),
            ("merge_size", self.merge_size, 2),
        ] {
            if v == 0 || v > 1 << 16 {
                bail!(
                    "`{key}` is {v}; it must be between 1 and 65536 (Qwen3.5 checkpoints have {usual})\n  hint: the \
                     file is damaged or hand-edited; copy preprocessor_config.json from the base model's checkpoint"
                );
            }
        }
        if self.factor() > 1 << 16 {
            bail!(
                "patch_size {} x merge_size {} = {} pixels per token side; Qwen3.5 checkpoints have 16 x 2 = 32\n  \
                 hint: the file is damaged or hand-edited; copy preprocessor_config.json from the base model's \
                 checkpoint",
                self.patch_size,
                self.merge_size,
                self.factor()
            );
        }
        if self.min_pixels > self.max_pixels {
            bail!(
                "min pixels ({}) exceed max pixels ({}): `size.shortest_edge` must not be above `size.longest_edge`",
                self.min_pixels,
                self.max_pixels
            );
        }
        if self.resample != 3 {
            bail!("`resample` is {}; only 3 (bicubic, as in every Qwen VL checkpoint) is supported", self.resample);
        }
        if self.do_normalize && self.image_std.contains(&0.0) {
            bail!("`image_std` contains 0; normalising would divide by zero");
        }
        if self.do_rescale && self.do_normalize && self.rescale_factor == 0.0 {
            bail!("`rescale_factor` is 0; use 0.00392156862745098 (1/255)");
        }
        Ok(())
    }

    /// Side of the square that each LLM token covers, in pixels (`patch_size * merge_size`).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Length of one row of `pixel_values`: `3 * temporal_patch_size * patch_size²`.
    pub fn feature_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// The `(height, width)` an image of the given size is resized to before patchifying.
    pub fn resized_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        if self.do_resize {
            return smart_resize(height, width, self.factor(), self.min_pixels, self.max_pixels);
        }
        let f = self.factor();
        if height == 0 || width == 0 || !height.is_multiple_of(f) || !width.is_multiple_of(f) {
            bail!(
                "image is {height}x{width} (HxW) but `do_resize` is false, so both sides must be non-zero multiples \
                 of patch_size * merge_size = {f}; set `do_resize: true` in preprocessor_config.json"
            );
        }
        Ok((height, width))
    }

    /// `image_grid_thw` of one still image of the given original size.
    pub fn grid_thw(&self, height: usize, width: usize) -> Result<[usize; 3]> {
        let (h, w) = self.resized_size(height, width)?;
        Ok([1, h / self.patch_size, w / self.patch_size])
    }

    /// Number of `<|image_pad|>` tokens an image of the given original size becomes (`t*h*w / merge²`), without
    /// decoding it.
    pub fn num_image_tokens(&self, height: usize, width: usize) -> Result<usize> {
        let [t, h, w] = self.grid_thw(height, width)?;
        Ok(t * h * w / (self.merge_size * self.merge_size))
    }

    /// Value of each uint8 sample `k` of channel `c` after rescale and normalisation, computed the way
    /// transformers computes it in f32: with both steps on, the mean and std are pre-multiplied by
    /// `1/rescale_factor` (f32) and the sample is normalised once, `(k - mean') / std'`.
    fn value_table(&self) -> [[f32; 256]; 3] {
        let mut table = [[0f32; 256]; 3];
        let inv_rescale = (1.0 / self.rescale_factor) as f32;
        for (c, row) in table.iter_mut().enumerate() {
            let (mean, std) = (self.image_mean[c] as f32, self.image_std[c] as f32);
            for (k, v) in row.iter_mut().enumerate() {
                let x = k as f32;
                *v = match (self.do_rescale, self.do_normalize) {
                    (true, true) => (x - mean * inv_rescale) / (std * inv_rescale),
                    (false, true) => (x - mean) / std,
                    (true, false) => x * self.rescale_factor as f32,
                    (false, false) => x,
                };
            }
        }
        table
    }

    /// Resizes, normalises and patchifies still images, as transformers' processor does for a list of images.
    pub fn preprocess(&self, images: &[RgbImage]) -> Result<ProcessedImages> {
        let table = self.value_table();
        let feature_dim = self.feature_dim();
        let mut out = ProcessedImages {
            pixel_values: Vec::new(),
            feature_dim,
            image_grid_thw: Vec::new(),
            num_tokens: Vec::new(),
        };
        for (i, img) in images.iter().enumerate() {
            let (height, width) = (img.height() as usize, img.width() as usize);
            let (h, w) = self.resized_size(height, width).with_context(|| format!("image {i} of the batch"))?;
            let resized;
            let img = if (h, w) == (height, width) {
                img
            } else {
                resized = resize_bicubic(img, h, w);
                &resized
            };
            let grid = [1, h / self.patch_size, w / self.patch_size];
            let rows = grid[1] * grid[2];
            let start = out.pixel_values.len();
            out.pixel_values.resize(start + rows * feature_dim, 0.0);
            self.patchify(img, &table, &mut out.pixel_values[start..]);
            out.image_grid_thw.push(grid);
            out.num_tokens.push(rows / (self.merge_size * self.merge_size));
        }
        Ok(out)
    }

    /// The pixel path of training and evaluation: decodes each file, brings it to the size LLaMA-Factory's
    /// pre-resize gave it (`sizes[i]`, which the data stage computed from the file's header; the decoded size when
    /// absent) and preprocesses them all. `what` names the images' row in errors.
    pub fn preprocess_files(
        &self,
        paths: &[PathBuf],
        sizes: &[(u32, u32)],
        what: &dyn std::fmt::Display,
    ) -> Result<ProcessedImages> {
        let mut decoded = Vec::with_capacity(paths.len());
        for (i, path) in paths.iter().enumerate() {
            let img = load_image(path).with_context(|| format!("{} (image {i} of {what})", path.display()))?;
            let size = sizes.get(i).copied().unwrap_or((img.width(), img.height()));
            decoded.push(resize_to(img, size));
        }
        self.preprocess(&decoded)
    }

    /// Writes the rows of one resized image. Row order is block row, block column, row in block, column in block
    /// (blocks are `merge_size` patches square); features are `c*T*P*P + t*P*P + py*P + px`, and a still image is
    /// repeated over the `T = temporal_patch_size` frames.
    fn patchify(&self, img: &RgbImage, table: &[[f32; 256]; 3], out: &mut [f32]) {
        let (p, m, tp) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let width = img.width() as usize;
        let grid_w = width / p;
        let pixels = img.as_raw();
        let feature_dim = self.feature_dim();
        out.par_chunks_mut(feature_dim).enumerate().for_each(|(row, dst)| {
            let (block, in_block) = (row / (m * m), row % (m * m));
            let (bh, bw) = (block / (grid_w / m), block % (grid_w / m));
            let y0 = (bh * m + in_block / m) * p;
            let x0 = (bw * m + in_block % m) * p;
            for (c, table) in table.iter().enumerate() {
                let plane = &mut dst[c * tp * p * p..(c + 1) * tp * p * p];
                let (frame0, rest) = plane.split_at_mut(p * p);
                for py in 0..p {
                    let src = &pixels[((y0 + py) * width + x0) * 3..((y0 + py) * width + x0 + p) * 3];
                    for (v, px) in frame0[py * p..(py + 1) * p].iter_mut().zip(src.chunks_exact(3)) {
                        *v = table[px[c] as usize];
                    }
                }
                for frame in rest.chunks_exact_mut(p * p) {
                    frame.copy_from_slice(frame0);
                }
            }
        });
    }
}

/// Output of [`ImageProcessorConfig::preprocess`].
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImages {
    /// Row-major `[sum of t*h*w over the images, feature_dim]`.
    pub pixel_values: Vec<f32>,
    /// `3 * temporal_patch_size * patch_size²` (1536 for Qwen3.5).
    pub feature_dim: usize,
    /// `[t, h, w]` per image, in patches.
    pub image_grid_thw: Vec<[usize; 3]>,
    /// LLM tokens per image: `t*h*w / merge_size²`.
    pub num_tokens: Vec<usize>,
}

impl ProcessedImages {
    /// Number of rows of `pixel_values` (patches over all images).
    pub fn num_patches(&self) -> usize {
        self.pixel_values.len() / self.feature_dim.max(1)
    }
}

/// transformers' `smart_resize`: the size closest to `(height, width)` whose sides are multiples of `factor`
/// and whose area lies in `[min_pixels, max_pixels]`. Python's `round` rounds half to even, so `2.5 -> 2`.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 || factor == 0 {
        bail!("cannot resize an image of {height}x{width} (HxW) to multiples of {factor}");
    }
    let (hf, wf, ff) = (height as f64, width as f64, factor as f64);
    let ratio = hf.max(wf) / hf.min(wf);
    if ratio > 200.0 {
        bail!(
            "image is {height}x{width} (HxW): aspect ratio {ratio} is above the 200 the Qwen image processor \
             accepts; crop or pad the image"
        );
    }
    let mut h = (hf / ff).round_ties_even() as usize * factor;
    let mut w = (wf / ff).round_ties_even() as usize * factor;
    if h.saturating_mul(w) > max_pixels {
        let beta = (hf * wf / max_pixels as f64).sqrt();
        h = factor.max((hf / beta / ff).floor() as usize * factor);
        w = factor.max((wf / beta / ff).floor() as usize * factor);
    } else if h.saturating_mul(w) < min_pixels {
        let beta = (min_pixels as f64 / (hf * wf)).sqrt();
        h = (hf * beta / ff).ceil() as usize * factor;
        w = (wf * beta / ff).ceil() as usize * factor;
    }
    if h == 0 || w == 0 {
        bail!("image of {height}x{width} (HxW) resizes to {h}x{w}; raise min pixels (`size.shortest_edge`)");
    }
    Ok((h, w))
}

/// LLaMA-Factory's pre-resize of an image before the HF processor (`MMPluginMixin._preprocess_image` plus the
/// Qwen2-VL plugin's clamps): down to `max_pixels` and up to `min_pixels` keeping the aspect ratio (sides
/// truncated to integers), then at least 28 pixels a side and an aspect ratio of at most 200 (clamped to 180).
/// Returns the (width, height) the processor sees; the pixel path must resize to exactly this size first.
pub fn preresize(width: u32, height: u32, max_pixels: u64, min_pixels: u64) -> (u32, u32) {
    let (mut w, mut h) = (width, height);
    let area = |w: u32, h: u32| u64::from(w) * u64::from(h);
    if area(w, h) > max_pixels {
        let f = (max_pixels as f64 / area(w, h) as f64).sqrt();
        (w, h) = ((f64::from(w) * f) as u32, (f64::from(h) * f) as u32);
    }
    if area(w, h) < min_pixels {
        let f = (min_pixels as f64 / area(w, h).max(1) as f64).sqrt();
        (w, h) = ((f64::from(w) * f) as u32, (f64::from(h) * f) as u32);
    }
    (w, h) = (w.max(1), h.max(1));
    if w.min(h) < 28 {
        (w, h) = (w.max(28), h.max(28));
    }
    if f64::from(w) / f64::from(h) > 200.0 {
        w = h * 180;
    }
    if f64::from(h) / f64::from(w) > 200.0 {
        h = w * 180;
    }
    (w, h)
}

/// `img` at `(width, height)`: resized with Pillow's bicubic, as LLaMA-Factory's pre-resize does, unless it
/// already has that size.
pub fn resize_to(img: RgbImage, (width, height): (u32, u32)) -> RgbImage {
    if (width, height) == (img.width(), img.height()) {
        img
    } else {
        resize_bicubic_pil(&img, height as usize, width as usize)
    }
}

/// LLaMA-Factory's pre-resize applied to a decoded picture: one with more than `max_pixels` (or fewer than
/// `min_pixels`) is resized, keeping its aspect ratio, before the processor sees it. Serving must do what
/// training did, or a large photo becomes thousands of image tokens the adapter never saw.
pub fn fit_pixels(img: RgbImage, min_pixels: u64, max_pixels: u64) -> RgbImage {
    let size = preresize(img.width(), img.height(), max_pixels, min_pixels);
    resize_to(img, size)
}

/// Which bicubic resampler's arithmetic to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resampler {
    /// PyTorch's uint8 antialias kernel (torchvision `resize(..., BICUBIC, antialias=True)` on CPU).
    Torch,
    /// Pillow's `Image.resize(.., BICUBIC)` (libImaging/Resample.c, 8 bits per channel).
    Pil,
}

/// Keys' cubic kernel with a = -0.5, written the way PyTorch writes it (`cubic_convolution1/2`); the
/// evaluation order matters for bit-exact weights.
fn cubic_torch(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// The same kernel as Pillow's `bicubic_filter` writes it.
fn cubic_pil(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point filter taps of one axis: output `i` reads inputs `start[i]..start[i] + len[i]` with
/// `weights[i * ksize..]`, scaled by `2^precision`.
struct Taps {
    precision: u32,
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
}

/// Both libraries compute the antialiased (support scaled by the downscale factor) weights in f64 the same way,
/// normalise them to sum 1, and round them to fixed point. Pillow always uses 22 fractional bits in an int32;
/// PyTorch stores int16 and picks the largest precision (at most 22) at which the largest weight of the axis
/// still fits.
fn taps(in_size: usize, out_size: usize, resampler: Resampler) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let (support, inv_scale) = if scale >= 1.0 { (2.0 * scale, 1.0 / scale) } else { (2.0, 1.0) };
    let ksize = support.ceil() as usize * 2 + 1;
    let filter = match resampler {
        Resampler::Torch => cubic_torch,
        Resampler::Pil => cubic_pil,
    };
    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut real = vec![0f64; out_size * ksize];
    let mut wt_max = 0f64;
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        // `as i64` truncates toward zero, like the C casts in both sources.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xsize = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let xsize = xsize.clamp(0, ksize as i64) as usize;
        let w = &mut real[i * ksize..i * ksize + xsize];
        let mut total = 0f64;
        for (j, wj) in w.iter_mut().enumerate() {
            *wj = filter(((j as i64 + xmin) as f64 - center + 0.5) * inv_scale);
            total += *wj;
        }
        if total != 0.0 {
            for wj in w.iter_mut() {
                *wj /= total;
                wt_max = wt_max.max(*wj);
            }
        }
        start.push(xmin as usize);
        len.push(xsize);
    }
    let precision = match resampler {
        Resampler::Pil => 22,
        Resampler::Torch => {
            let mut p = 0;
            while p < 22 && ((0.5 + wt_max * (1u32 << (p + 1)) as f64) as i32) < (1 << 15) {
                p += 1;
            }
            p
        }
    };
    let weights = real
        .iter()
        .map(|&w| {
            let v = w * (1u32 << precision) as f64;
            let q = if v < 0.0 { (-0.5 + v) as i32 } else { (0.5 + v) as i32 };
            match resampler {
                // Stored as int16 (a plain C conversion, which wraps).
                Resampler::Torch => q as i16 as i32,
                Resampler::Pil => q,
            }
        })
        .collect();
    Taps { precision, ksize, start, len, weights }
}

/// `acc >> p` clamped to 0..=255, where `acc` started at `2^(p-1)` (round half up). Accumulators cannot leave
/// i32 (the weights' absolute values sum to about 1.2 * 2^p with p <= 22, times 255); the wrapping ops in the
/// passes only keep a malformed case from panicking, as the C code would wrap too.
#[inline]
fn finish(acc: i32, precision: u32) -> u8 {
    (acc >> precision).clamp(0, 255) as u8
}

/// Resamples rows (width `in_w` -> `taps.start.len()`), 3 interleaved channels.
fn resample_horizontal(src: &[u8], in_w: usize, taps: &Taps) -> Vec<u8> {
    let out_w = taps.start.len();
    let mut dst = vec![0u8; src.len() / (in_w * 3) * out_w * 3];
    let half = (1i32 << taps.precision) >> 1;
    dst.par_chunks_mut(out_w * 3).zip(src.par_chunks(in_w * 3)).for_each(|(out_row, in_row)| {
        for (x, out_px) in out_row.chunks_exact_mut(3).enumerate() {
            let w = &taps.weights[x * taps.ksize..x * taps.ksize + taps.len[x]];
            let input = &in_row[taps.start[x] * 3..(taps.start[x] + taps.len[x]) * 3];
            let mut acc = [half; 3];
            for (&wj, px) in w.iter().zip(input.chunks_exact(3)) {
                for c in 0..3 {
                    acc[c] = acc[c].wrapping_add(wj.wrapping_mul(px[c] as i32));
                }
            }
            for c in 0..3 {
                out_px[c] = finish(acc[c], taps.precision);
            }
        }
    });
    dst
}

/// Resamples columns (height -> `taps.start.len()`), rows of `row_len` samples.
fn resample_vertical(src: &[u8], row_len: usize, taps: &Taps) -> Vec<u8> {
    let out_h = taps.start.len();
    let mut dst = vec![0u8; out_h * row_len];
    let half = (1i32 << taps.precision) >> 1;
    dst.par_chunks_mut(row_len).enumerate().for_each_init(
        || vec![0i32; row_len],
        |acc, (y, out_row)| {
            acc.fill(half);
            let w = &taps.weights[y * taps.ksize..y * taps.ksize + taps.len[y]];
            for (j, &wj) in w.iter().enumerate() {
                let in_row = &src[(taps.start[y] + j) * row_len..(taps.start[y] + j + 1) * row_len];
                for (a, &x) in acc.iter_mut().zip(in_row) {
                    *a = a.wrapping_add(wj.wrapping_mul(x as i32));
                }
            }
            for (o, &a) in out_row.iter_mut().zip(acc.iter()) {
                *o = finish(a, taps.precision);
            }
        },
    );
    dst
}

fn resize_with(img: &RgbImage, height: usize, width: usize, resampler: Resampler) -> RgbImage {
    let (in_h, in_w) = (img.height() as usize, img.width() as usize);
    if (height, width) == (in_h, in_w) {
        return img.clone();
    }
    if height == 0 || width == 0 || in_h == 0 || in_w == 0 {
        // Nothing to sample from, or nothing to fill.
        return RgbImage::new(width as u32, height as u32);
    }
    // Horizontal pass first, rounded to uint8, then vertical; a pass whose size does not change is skipped.
    let mut data = std::borrow::Cow::Borrowed(img.as_raw().as_slice());
    if width != in_w {
        data = resample_horizontal(&data, in_w, &taps(in_w, width, resampler)).into();
    }
    if height != in_h {
        data = resample_vertical(&data, width * 3, &taps(in_h, height, resampler)).into();
    }
    // The buffer holds exactly height * width * 3 samples, so `from_raw` cannot fail.
    RgbImage::from_raw(width as u32, height as u32, data.into_owned()).expect("buffer size matches")
}

/// Bicubic resize that equals, bit for bit, torchvision's `resize(uint8 tensor, [height, width], BICUBIC,
/// antialias=True)` on the CPU, the resize transformers' Qwen2-VL processor runs.
pub fn resize_bicubic(img: &RgbImage, height: usize, width: usize) -> RgbImage {
    resize_with(img, height, width, Resampler::Torch)
}

/// Bicubic resize that equals, bit for bit, Pillow's `Image.resize((width, height), Resampling.BICUBIC)` on an
/// RGB image (22-bit fixed-point weights). LLaMA-Factory pre-resizes with it (`image.resize((w, h))`) when an
/// image is outside `image_min_pixels..image_max_pixels`; note that it resizes before converting to RGB, so
/// palette images get nearest-neighbour and RGBA images premultiplied resizing there.
pub fn resize_bicubic_pil(img: &RgbImage, height: usize, width: usize) -> RgbImage {
    resize_with(img, height, width, Resampler::Pil)
}

/// Reads and decodes an image file (PNG, JPEG, WebP, GIF first frame, BMP) to RGB.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read image file {}", path.display()))?;
    decode_image(&bytes, &path.display().to_string())
}

/// Decodes image bytes to RGB the way PIL's `Image.open(..).convert("RGB")` does. `what` names the image
/// (a file path, a dataset row) in errors. Like PIL's `Image.open`, and so like transformers and LLaMA-Factory,
/// it ignores the EXIF orientation.
pub fn decode_image(bytes: &[u8], what: &str) -> Result<RgbImage> {
    let format = ::image::guess_format(bytes).map_err(|_| {
        anyhow::anyhow!("{what}: not a PNG, JPEG, WebP, GIF or BMP image (unrecognised header); convert it to PNG")
    })?;
    let img = ::image::load_from_memory_with_format(bytes, format).map_err(|e| {
        anyhow::anyhow!("{what}: cannot decode {format:?} image: {e}; the file is corrupt or truncated, re-export it")
    })?;
    Ok(to_rgb_like_pil(img))
}

/// Width and height from an encoded image's header, without decoding it (None when the header is not one of the
/// supported formats or is unreadable).
pub fn image_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    let format = ::image::guess_format(bytes).ok()?;
    ::image::ImageReader::with_format(std::io::Cursor::new(bytes), format).into_dimensions().ok()
}

/// [`decode_image`] for untrusted input: the decoder refuses images of more than `max_pixels` pixels and
/// allocations beyond what such an image needs, whatever the header claims.
pub fn decode_image_within(bytes: &[u8], what: &str, max_pixels: u64) -> Result<RgbImage> {
    let format = ::image::guess_format(bytes).map_err(|_| {
        anyhow::anyhow!("{what}: not a PNG, JPEG, WebP, GIF or BMP image (unrecognised header); convert it to PNG")
    })?;
    let side = u32::try_from(max_pixels).unwrap_or(u32::MAX);
    let mut limits = ::image::Limits::default();
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    // RGBA with 16-bit samples is the largest decoded form: 8 bytes a pixel.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
    let mut reader = ::image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| {
        anyhow::anyhow!("{what}: cannot decode {format:?} image: {e}; the file is corrupt or truncated, re-export it")
    })?;
    if img.width() as u64 * img.height() as u64 > max_pixels {
        bail!("{what}: a {}×{} image is more than {max_pixels} pixels", img.width(), img.height());
    }
    Ok(to_rgb_like_pil(img))
}

/// PIL's `convert("RGB")` of what PIL would have opened: alpha dropped (not composited over a background),
/// grey replicated, 16-bit samples reduced to their high byte, except 16-bit greyscale, which PIL opens as
/// `I;16` and clamps to 255.
fn to_rgb_like_pil(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let hi = |v: u16| (v >> 8) as u8;
    let samples: Vec<u8> = match img {
        DynamicImage::ImageRgb8(img) => return img,
        DynamicImage::ImageRgba8(img) => img.as_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        DynamicImage::ImageLuma8(img) => img.as_raw().iter().flat_map(|&v| [v; 3]).collect(),
        DynamicImage::ImageLumaA8(img) => img.as_raw().chunks_exact(2).flat_map(|p| [p[0]; 3]).collect(),
        DynamicImage::ImageLuma16(img) => img.as_raw().iter().flat_map(|&v| [v.min(255) as u8; 3]).collect(),
        DynamicImage::ImageLumaA16(img) => img.as_raw().chunks_exact(2).flat_map(|p| [hi(p[0]); 3]).collect(),
        DynamicImage::ImageRgb16(img) => img.as_raw().iter().map(|&v| hi(v)).collect(),
        DynamicImage::ImageRgba16(img) => {
            img.as_raw().chunks_exact(4).flat_map(|p| [hi(p[0]), hi(p[1]), hi(p[2])]).collect()
        }
        other => return other.to_rgb8(),
    };
    // Each arm yields exactly 3 samples per pixel of a w x h image.
    RgbImage::from_raw(w, h, samples).expect("3 samples per pixel")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_examples() {
        // The spec's examples with the Qwen3.5 bounds.
        assert_eq!(smart_resize(768, 1024, 32, 65536, 16777216).unwrap(), (768, 1024));
        assert_eq!(smart_resize(200, 200, 32, 65536, 16777216).unwrap(), (256, 256));
        // 1040/32 = 32.5 and 1072/32 = 33.5: half to even gives 32 and 34.
        assert_eq!(smart_resize(1040, 1072, 32, 65536, 16777216).unwrap(), (1024, 1088));
        assert!(smart_resize(10, 2001, 32, 65536, 16777216).is_err());
        assert!(smart_resize(2000, 10, 32, 65536, 16777216).is_ok());
        assert!(smart_resize(0, 10, 32, 65536, 16777216).is_err());
    }

    #[test]
    fn preresize_then_processor_worked_example_from_the_reference() {
        // A 1024x768 image with image_max_pixels 262144 is pre-resized to 591x443, then 576x448: 252 tokens.
        let (w, h) = preresize(1024, 768, 262144, 1024);
        assert_eq!((w, h), (591, 443));
        assert_eq!(smart_resize(h as usize, w as usize, 32, 65536, 16777216).unwrap(), (448, 576));
        assert_eq!(ImageProcessorConfig::default().num_image_tokens(h as usize, w as usize).unwrap(), 252);
        // Qwen2.5-VL (patch 14): 588x448, 336 tokens.
        let q25 = ImageProcessorConfig { patch_size: 14, min_pixels: 3136, max_pixels: 12845056, ..Default::default() };
        assert_eq!(q25.num_image_tokens(h as usize, w as usize).unwrap(), 336);
    }

    #[test]
    fn small_images_grow_and_halves_round_to_even() {
        assert_eq!(preresize(10, 20, 589824, 1024), (28, 45));
        assert_eq!(smart_resize(20, 10, 32, 4096, 65536).unwrap(), (96, 64));
        // 48 / 32 = 1.5 → 2, 80 / 32 = 2.5 → 2.
        assert_eq!(smart_resize(48, 80, 32, 1, usize::MAX).unwrap(), (64, 64));
    }

    #[test]
    fn large_images_are_pre_resized_as_in_training() {
        let img = RgbImage::new(1024, 768);
        let out = fit_pixels(img.clone(), 1024, 262144);
        // LLaMA-Factory's example: 1024x768 with image_max_pixels 262144 becomes 591x443.
        assert_eq!((out.width(), out.height()), (591, 443));
        assert_eq!(fit_pixels(img, 1024, 1024 * 768).dimensions(), (1024, 768), "within the bounds: untouched");
        assert_eq!(fit_pixels(RgbImage::new(16, 16), 1024, 262144).dimensions(), (32, 32), "small: scaled up");
    }

    #[test]
    fn zero_or_huge_sizes_in_preprocessor_config_name_the_file_and_key() {
        let dir = std::env::temp_dir().join(format!("ferrotune-media-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (key, v) in [("patch_size", 0u64), ("merge_size", 0), ("patch_size", 1 << 32), ("merge_size", 1 << 40)] {
            let mut json = serde_json::json!({"patch_size": 16, "merge_size": 2,
                "size": {"shortest_edge": 65536, "longest_edge": 16777216}});
            json[key] = v.into();
            std::fs::write(dir.join("preprocessor_config.json"), json.to_string()).unwrap();
            let err = format!("{:#}", ImageProcessorConfig::from_dir(&dir).unwrap_err());
            assert!(err.contains("preprocessor_config.json") && err.contains(&format!("`{key}` is {v}")), "{err}");
            assert!(err.contains("hint:"), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn config_keys_defaults_and_errors() {
        assert_eq!(ImageProcessorConfig::from_json("{}").unwrap(), ImageProcessorConfig::default());
        // Legacy top-level min/max pixels win over `size`, as in transformers.
        let c = ImageProcessorConfig::from_json(
            r#"{"size": {"shortest_edge": 1, "longest_edge": 2}, "min_pixels": 3136, "max_pixels": 12845056,
                "patch_size": 14, "image_mean": 0.25, "image_std": [0.1, 0.2, 0.3], "unknown_key": true}"#,
        )
        .unwrap();
        assert_eq!((c.min_pixels, c.max_pixels, c.patch_size, c.factor()), (3136, 12845056, 14, 28));
        assert_eq!((c.image_mean, c.image_std), ([0.25; 3], [0.1, 0.2, 0.3]));
        let err = |json: &str| format!("{:#}", ImageProcessorConfig::from_json(json).unwrap_err());
        assert!(err(r#"{"size": {"shortest_edge": 4096}}"#).contains("longest_edge"));
        assert!(err(r#"{"resample": 2}"#).contains("resample"));
        assert!(err(r#"{"merge_size": 0}"#).contains("merge_size"));
        for key in ["patch_size", "temporal_patch_size", "merge_size"] {
            let e = err(&format!(r#"{{"{key}": 0}}"#));
            assert!(e.contains(&format!("`{key}` is 0")) && e.contains("hint:"), "{e}");
        }
        assert!(err(r#"{"patch_size": 4096, "merge_size": 4096}"#).contains("pixels per token side"));
        // Read from a file, the error names it.
        let dir = std::env::temp_dir().join(format!("ferrotune-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("preprocessor_config.json"), r#"{"temporal_patch_size": 0}"#).unwrap();
        let e = format!("{:#}", ImageProcessorConfig::from_dir(&dir).unwrap_err());
        assert!(e.contains("preprocessor_config.json") && e.contains("`temporal_patch_size` is 0"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err(r#"{"size": {"shortest_edge": 9, "longest_edge": 8}}"#).contains("shortest_edge"));
    }

    #[test]
    fn without_resize_sides_must_be_multiples_of_the_factor() {
        let c = ImageProcessorConfig { do_resize: false, ..Default::default() };
        assert_eq!(c.grid_thw(64, 96).unwrap(), [1, 4, 6]);
        assert_eq!(c.num_image_tokens(64, 96).unwrap(), 6);
        assert!(format!("{:#}", c.grid_thw(64, 100).unwrap_err()).contains("do_resize"));
    }

    #[test]
    fn values_are_transformers_fused_f32() {
        let t = ImageProcessorConfig::default().value_table();
        for (k, &v) in t[1].iter().enumerate() {
            assert_eq!(v, (k as f32 - 127.5) / 127.5);
        }
        assert_eq!((t[0][0], t[0][255]), (-1.0, 1.0));
        // CLIP constants: mean and std are scaled by 255 in f32 before one division (checked against torch).
        let clip = ImageProcessorConfig {
            image_mean: [0.48145466, 0.4578275, 0.40821073],
            image_std: [0.26862954, 0.26130258, 0.27577711],
            ..Default::default()
        };
        let t = clip.value_table();
        assert_eq!((0.48145466f32 * 255.0).to_bits(), 1123388089);
        assert_eq!(t[0][200], (200.0 - 0.48145466f32 * 255.0) / (0.26862954f32 * 255.0));
        let plain = ImageProcessorConfig { do_normalize: false, do_rescale: false, ..Default::default() };
        assert_eq!(plain.value_table()[2][77], 77.0);
    }

    /// Literal transformers: frames [T, C, H, W] viewed as (T, C, H/(P*M), M, P, W/(P*M), M, P) and permuted
    /// to (bh, bw, mh, mw, c, t, py, px).
    #[test]
    fn patch_order_is_the_view_and_permute_of_transformers() {
        let c = ImageProcessorConfig { patch_size: 2, merge_size: 2, temporal_patch_size: 3, ..Default::default() };
        let (h, w) = (8, 12);
        let img = RgbImage::from_fn(w as u32, h as u32, |x, y| ::image::Rgb([x as u8, y as u8, (x * 16 + y) as u8]));
        let mut table = [[0f32; 256]; 3];
        for (ch, row) in table.iter_mut().enumerate() {
            for (k, v) in row.iter_mut().enumerate() {
                *v = (ch * 1000 + k) as f32;
            }
        }
        let (p, m, tp) = (2, 2, 3);
        let mut got = vec![0f32; (h / p) * (w / p) * c.feature_dim()];
        c.patchify(&img, &table, &mut got);
        let mut want = Vec::new();
        for bh in 0..h / (p * m) {
            for bw in 0..w / (p * m) {
                for mh in 0..m {
                    for mw in 0..m {
                        for (ch, table) in table.iter().enumerate() {
                            for _t in 0..tp {
                                for py in 0..p {
                                    for px in 0..p {
                                        let (y, x) = ((bh * m + mh) * p + py, (bw * m + mw) * p + px);
                                        let k = img.get_pixel(x as u32, y as u32).0[ch];
                                        want.push(table[k as usize]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(got, want);
    }

    #[test]
    fn resize_keeps_constant_images_and_identity() {
        let img = RgbImage::from_pixel(37, 23, ::image::Rgb([255, 0, 128]));
        for (h, w) in [(23, 37), (64, 64), (5, 90), (3, 2)] {
            for out in [resize_bicubic(&img, h, w), resize_bicubic_pil(&img, h, w)] {
                assert_eq!((out.height(), out.width()), (h as u32, w as u32));
                assert!(out.pixels().all(|p| p.0 == [255, 0, 128]), "{h}x{w}");
            }
        }
    }

    #[test]
    fn pytorch_precision_search() {
        // Upscaling: the largest weight is near 1, so 14 bits (2 * 2^14 would reach 2^15).
        assert_eq!(taps(10, 40, Resampler::Torch).precision, 14);
        // Heavy downscaling: many small weights, the search stops at its cap of 22 bits.
        assert_eq!(taps(3000, 5, Resampler::Torch).precision, 22);
        assert_eq!(taps(10, 40, Resampler::Pil).precision, 22);
    }

    #[test]
    fn undecodable_bytes_name_the_source() {
        let err = format!("{:#}", decode_image(b"\x89PNG\r\n\x1a\n broken", "images/robot_3.png").unwrap_err());
        assert!(err.contains("images/robot_3.png"), "{err}");
    }
}
