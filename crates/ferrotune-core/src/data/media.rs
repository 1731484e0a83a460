//! Images in the data stage: where a path points, how LLaMA-Factory pre-resizes an image before the HF image
//! processor, and how many `<|image_pad|>` tokens the model's processor turns it into.
//!
//! The token count sits behind [`VisionTokens`] so the model's image processor can provide it; [`SmartResize`]
//! implements it from `preprocessor_config.json` with the rule of transformers' Qwen2-VL `smart_resize`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// How many image tokens the model spends on an image of a given size (after LLaMA-Factory's pre-resize).
pub trait VisionTokens: Sync {
    fn image_tokens(&self, width: u32, height: u32) -> Result<usize>;
}

/// Qwen2-VL-family resize rule (transformers `image_processing_qwen2_vl.smart_resize`, 5.5.4): both sides become
/// multiples of `patch_size * merge_size`, the area is kept within [min_pixels, max_pixels], and the image costs
/// (h / patch) * (w / patch) / merge² tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmartResize {
    pub patch_size: u32,
    pub merge_size: u32,
    pub min_pixels: u64,
    pub max_pixels: u64,
}

impl SmartResize {
    /// Reads `preprocessor_config.json` of a checkpoint folder (`size.shortest_edge` / `size.longest_edge` hold the
    /// pixel bounds; older files use `min_pixels` / `max_pixels`).
    pub fn from_checkpoint(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("{}: cannot read the image processor config (needed for images)", path.display())
        })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}:{}:{}: invalid JSON: {e}", path.display(), e.line(), e.column()))?;
        let num = |keys: &[&str]| -> Option<u64> {
            keys.iter().find_map(|k| {
                let mut cur = &v;
                for part in k.split('.') {
                    cur = cur.get(part)?;
                }
                cur.as_u64()
            })
        };
        let field =
            |keys: &[&str]| num(keys).with_context(|| format!("{}: missing `{}`", path.display(), keys.join("` or `")));
        // A side of one token (patch x merge) above 2^16 pixels is no image processor's; keeping both below it
        // keeps every product of sizes here far from overflowing.
        let size = |key: &str, usual: u32| -> Result<u32> {
            let v = field(&[key])?;
            if v == 0 || v > 1 << 16 {
                bail!(
                    "{}: `{key}` is {v}; it must be between 1 and 65536 (Qwen3.5 checkpoints have {usual})\n  hint: the \
                     file is damaged or hand-edited; copy preprocessor_config.json from the base model's checkpoint",
                    path.display()
                );
            }
            Ok(v as u32)
        };
        let s = SmartResize {
            patch_size: size("patch_size", 16)?,
            merge_size: size("merge_size", 2)?,
            min_pixels: field(&["size.shortest_edge", "min_pixels"])?,
            max_pixels: field(&["size.longest_edge", "max_pixels"])?,
        };
        if s.factor() > 1 << 16 {
            bail!(
                "{}: patch_size {} x merge_size {} = {} pixels per token side; Qwen3.5 checkpoints have 16 x 2 = 32\n  \
                 hint: the file is damaged or hand-edited; copy preprocessor_config.json from the base model's \
                 checkpoint",
                path.display(),
                s.patch_size,
                s.merge_size,
                s.factor()
            );
        }
        Ok(s)
    }

    fn factor(&self) -> u64 {
        u64::from(self.patch_size) * u64::from(self.merge_size)
    }

    /// (height, width) the processor resizes an image to.
    pub fn resize(&self, height: u32, width: u32) -> Result<(u64, u64)> {
        let (h, w) = (f64::from(height), f64::from(width));
        if height == 0 || width == 0 {
            bail!("the image is empty ({width}x{height})");
        }
        if h.max(w) / h.min(w) > 200.0 {
            bail!("aspect ratio {:.0}:1 is above 200:1, which the image processor refuses", h.max(w) / h.min(w));
        }
        let factor = self.factor() as f64;
        // Python's round() rounds halves to even.
        let mut h_bar = (h / factor).round_ties_even() * factor;
        let mut w_bar = (w / factor).round_ties_even() * factor;
        if h_bar * w_bar > self.max_pixels as f64 {
            let beta = (h * w / self.max_pixels as f64).sqrt();
            h_bar = factor.max((h / beta / factor).floor() * factor);
            w_bar = factor.max((w / beta / factor).floor() * factor);
        } else if h_bar * w_bar < self.min_pixels as f64 {
            let beta = (self.min_pixels as f64 / (h * w)).sqrt();
            h_bar = (h * beta / factor).ceil() * factor;
            w_bar = (w * beta / factor).ceil() * factor;
        }
        Ok((h_bar as u64, w_bar as u64))
    }
}

impl VisionTokens for SmartResize {
    fn image_tokens(&self, width: u32, height: u32) -> Result<usize> {
        let (h, w) = self.resize(height, width)?;
        let p = u64::from(self.patch_size);
        let m = u64::from(self.merge_size);
        Ok(((h / p).saturating_mul(w / p) / (m * m)) as usize)
    }
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

/// Where an image path from a row points: `media_dir/path` when that file exists, else the path as written
/// (LLaMA-Factory's `_find_medias`).
pub fn resolve_image(path: &str, media_dir: &Path) -> PathBuf {
    let joined = media_dir.join(path);
    if joined.is_file() {
        joined
    } else {
        PathBuf::from(path)
    }
}

/// Width and height from the image file's header (no decoding).
pub fn image_size(path: &Path) -> Result<(u32, u32), String> {
    if !path.exists() {
        return Err("not found".into());
    }
    image::image_dimensions(path).map_err(|e| format!("unreadable: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen3_5() -> SmartResize {
        // Qwen3.5 / Qwen3-VL processor: patch 16, merge 2, 65536..16777216 pixels.
        SmartResize { patch_size: 16, merge_size: 2, min_pixels: 65536, max_pixels: 16777216 }
    }

    #[test]
    fn worked_example_from_the_reference() {
        // A 1024x768 image with image_max_pixels 262144 is pre-resized to 591x443, then 576x448: 252 tokens.
        let (w, h) = preresize(1024, 768, 262144, 1024);
        assert_eq!((w, h), (591, 443));
        assert_eq!(qwen3_5().resize(h, w).unwrap(), (448, 576));
        assert_eq!(qwen3_5().image_tokens(w, h).unwrap(), 252);
        // Qwen2.5-VL (patch 14): 588x448, 336 tokens.
        let q25 = SmartResize { patch_size: 14, merge_size: 2, min_pixels: 3136, max_pixels: 12845056 };
        assert_eq!(q25.image_tokens(w, h).unwrap(), 336);
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
            let err = format!("{:#}", SmartResize::from_checkpoint(&dir).unwrap_err());
            assert!(err.contains("preprocessor_config.json") && err.contains(&format!("`{key}` is {v}")), "{err}");
            assert!(err.contains("hint:"), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn small_images_grow() {
        assert_eq!(preresize(10, 20, 589824, 1024), (28, 45));
        let s = SmartResize { patch_size: 16, merge_size: 2, min_pixels: 4096, max_pixels: 65536 };
        assert_eq!(s.resize(20, 10).unwrap(), (96, 64));
    }

    #[test]
    fn halves_round_to_even() {
        let s = SmartResize { patch_size: 16, merge_size: 2, min_pixels: 1, max_pixels: u64::MAX };
        // 48 / 32 = 1.5 → 2, 80 / 32 = 2.5 → 2.
        assert_eq!(s.resize(48, 80).unwrap(), (64, 64));
    }
}
