//! The image processor against transformers' Qwen2VLImageProcessor (torchvision backend), through the fixtures
//! written by tools/golden/gen_images.py.

use std::path::{Path, PathBuf};

use ferrotune_core::image::{
    decode_image, load_image, resize_bicubic, resize_bicubic_pil, smart_resize, ImageProcessorConfig,
};
use image::RgbImage;
use safetensors::SafeTensors;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn golden(name: &str) -> PathBuf {
    fixtures().join("golden/images").join(name)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn usize_of(v: &Value) -> usize {
    v.as_u64().unwrap() as usize
}

/// A uint8 tensor from a safetensors file, with its shape.
fn u8_tensor(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<u8>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::U8, "{name}");
    (t.shape().to_vec(), t.data().to_vec())
}

struct Fixture {
    file: String,
    entry: Value,
}

fn processor_fixtures() -> (Value, Vec<Fixture>) {
    let meta = read_json(&golden("processor.json"));
    let images = meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Fixture { file: e["file"].as_str().unwrap().to_string(), entry: e.clone() })
        .collect();
    (meta, images)
}

/// JPEG decoders differ (libjpeg-turbo in PIL, zune-jpeg here): the golden keeps PIL's pixels for it.
fn pil_decoded(st: &SafeTensors, fx: &Fixture) -> Option<RgbImage> {
    let stem = fx.file.rsplit_once('.').unwrap().0;
    let name = format!("{stem}.decoded");
    st.names().iter().any(|n| **n == name).then(|| {
        let (shape, data) = u8_tensor(st, &name);
        RgbImage::from_raw(shape[1] as u32, shape[0] as u32, data).unwrap()
    })
}

#[test]
fn smart_resize_matches_transformers() {
    let settings = read_json(&golden("smart_resize.json"));
    let mut n = 0;
    for s in settings.as_array().unwrap() {
        let (factor, lo, hi) = (usize_of(&s["factor"]), usize_of(&s["min_pixels"]), usize_of(&s["max_pixels"]));
        for case in s["cases"].as_array().unwrap() {
            let (h, w) = (usize_of(&case[0]), usize_of(&case[1]));
            let got = smart_resize(h, w, factor, lo, hi);
            match case[2].as_u64() {
                Some(oh) => {
                    let want = (oh as usize, usize_of(&case[3]));
                    assert_eq!(got.unwrap(), want, "{} {h}x{w}", s["setting"]);
                }
                None => assert!(got.is_err(), "{} {h}x{w}: transformers raises, got {got:?}", s["setting"]),
            }
            n += 1;
        }
    }
    assert!(n > 600, "{n} cases");
}

#[test]
fn config_of_the_tiny_checkpoint() {
    let config = ImageProcessorConfig::from_dir(&fixtures().join("tiny-qwen3_5")).unwrap();
    let want = ImageProcessorConfig { min_pixels: 4096, max_pixels: 65536, ..ImageProcessorConfig::default() };
    assert_eq!(config, want);
    assert_eq!(config.feature_dim(), 1536);

    let err = ImageProcessorConfig::from_dir(&fixtures().join("images")).unwrap_err();
    assert!(format!("{err:#}").contains("preprocessor_config.json"), "{err:#}");
}

#[test]
fn every_format_decodes_like_pil() {
    let (_, fixtures_list) = processor_fixtures();
    let st_bytes = std::fs::read(golden("processor.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    let mut formats = std::collections::BTreeSet::new();
    for fx in &fixtures_list {
        let img = load_image(&fixtures().join("images").join(&fx.file)).unwrap();
        let (w, h) = (usize_of(&fx.entry["width"]), usize_of(&fx.entry["height"]));
        assert_eq!((img.width() as usize, img.height() as usize), (w, h), "{}", fx.file);
        formats.insert(fx.file.rsplit_once('.').unwrap().1.to_string());
        match pil_decoded(&st, fx) {
            None => assert_eq!(fnv1a64_hex(img.as_raw()), fx.entry["rgb_fnv1a64"].as_str().unwrap(), "{}", fx.file),
            Some(pil) => {
                // Measured: zune-jpeg and libjpeg-turbo differ by at most 3 on this 4:2:0 file (IDCT, chroma
                // upsampling and colour conversion are each implemented differently).
                let max = img.as_raw().iter().zip(pil.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
                assert!(max <= 4, "{}: JPEG decode differs from PIL by {max}", fx.file);
            }
        }
    }
    let want: std::collections::BTreeSet<String> =
        ["bmp", "gif", "jpg", "png", "webp"].iter().map(|s| s.to_string()).collect();
    assert_eq!(formats, want);
}

#[test]
fn preprocess_matches_transformers() {
    let config = ImageProcessorConfig::from_dir(&fixtures().join("tiny-qwen3_5")).unwrap();
    let (meta, fixtures_list) = processor_fixtures();
    assert_eq!(usize_of(&meta["min_pixels"]), config.min_pixels);
    let st_bytes = std::fs::read(golden("processor.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    let images: Vec<RgbImage> = fixtures_list
        .iter()
        .map(|fx| {
            pil_decoded(&st, fx).unwrap_or_else(|| load_image(&fixtures().join("images").join(&fx.file)).unwrap())
        })
        .collect();
    // One batch, as transformers was called.
    let out = config.preprocess(&images).unwrap();
    let (p2, tp, d) = (config.patch_size * config.patch_size, config.temporal_patch_size, out.feature_dim);
    assert_eq!(d, 1536);
    let mut row0 = 0;
    let mut max_diff = 0f32;
    for (i, fx) in fixtures_list.iter().enumerate() {
        let grid: Vec<usize> = fx.entry["grid_thw"].as_array().unwrap().iter().map(usize_of).collect();
        assert_eq!(out.image_grid_thw[i].to_vec(), grid, "{}", fx.file);
        assert_eq!(out.num_tokens[i], usize_of(&fx.entry["num_tokens"]), "{}", fx.file);
        let (h, w) = (usize_of(&fx.entry["height"]), usize_of(&fx.entry["width"]));
        assert_eq!(config.num_image_tokens(h, w).unwrap(), out.num_tokens[i], "{}", fx.file);

        let (shape, k) = u8_tensor(&st, fx.file.rsplit_once('.').unwrap().0);
        let rows = grid.iter().product::<usize>();
        assert_eq!(shape, vec![rows, 3, p2], "{}", fx.file);
        for r in 0..rows {
            let got = &out.pixel_values[(row0 + r) * d..(row0 + r + 1) * d];
            for c in 0..3 {
                for t in 0..tp {
                    for q in 0..p2 {
                        // transformers' value for sample k: (k - 127.5) / 127.5 in f32.
                        let want = (k[(r * 3 + c) * p2 + q] as f32 - 127.5) / 127.5;
                        max_diff = max_diff.max((got[(c * tp + t) * p2 + q] - want).abs());
                    }
                }
            }
        }
        row0 += rows;
    }
    assert_eq!(out.num_patches(), row0);
    // Measured: 0, bit-identical (1e-6 is the documented tolerance).
    assert!(max_diff <= 1e-6, "max |pixel_values - transformers| = {max_diff}");
}

#[test]
fn jpeg_end_to_end_stays_within_the_decoder_difference() {
    // The whole path from the file, with this crate's JPEG decoder: the only difference from transformers is the
    // decoder's (above), which the bicubic filter can grow slightly (its weights' absolute sum is about 1.1).
    let config = ImageProcessorConfig::from_dir(&fixtures().join("tiny-qwen3_5")).unwrap();
    let st_bytes = std::fs::read(golden("processor.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    let img = load_image(&fixtures().join("images/photo_123x77.jpg")).unwrap();
    let out = config.preprocess(&[img]).unwrap();
    let (_, k) = u8_tensor(&st, "photo_123x77");
    let p2 = config.patch_size * config.patch_size;
    let mut max_diff = 0f32;
    for (r, row) in out.pixel_values.chunks_exact(out.feature_dim).enumerate() {
        for c in 0..3 {
            for q in 0..p2 {
                let want = (k[(r * 3 + c) * p2 + q] as f32 - 127.5) / 127.5;
                max_diff = max_diff.max((row[c * config.temporal_patch_size * p2 + q] - want).abs());
            }
        }
    }
    assert!(max_diff <= 5.0 / 127.5 + 1e-6, "JPEG end to end: max difference {max_diff}");
}

/// The pattern gen_images.py's `formula_image` draws.
fn formula_image(h: usize, w: usize) -> RgbImage {
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let (x, y) = (x as usize, y as usize);
        let base = x * x * 3 + y * 7 + x * y * 13;
        image::Rgb([0, 1, 2].map(|c| ((base + c * 101) % 256) as u8))
    })
}

#[test]
fn resize_matches_torchvision_and_pil_bit_for_bit() {
    let bytes = std::fs::read(golden("resize.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut n = 0;
    for name in st.names() {
        let mut parts = name.split('.');
        let (kind, src, dst) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
        let size = |s: &str| {
            let (h, w) = s.split_once('x').unwrap();
            (h.parse::<usize>().unwrap(), w.parse::<usize>().unwrap())
        };
        let ((sh, sw), (oh, ow)) = (size(src), size(dst));
        let src = formula_image(sh, sw);
        let got = match kind {
            "torch" => resize_bicubic(&src, oh, ow),
            "pil" => resize_bicubic_pil(&src, oh, ow),
            other => panic!("unknown resampler {other}"),
        };
        let (shape, want) = u8_tensor(&st, name);
        assert_eq!(shape, vec![oh, ow, 3], "{name}");
        let diff = got.as_raw().iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{name}: {diff} samples differ");
        n += 1;
    }
    assert_eq!(n, 66);
}

#[test]
fn corrupt_or_missing_image_errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("ferrotune-image-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let png = std::fs::read(fixtures().join("images/large_400x300.png")).unwrap();
    let cases: [(&str, &[u8]); 3] =
        [("truncated.png", &png[..png.len() / 2]), ("garbage.jpg", b"not an image at all"), ("empty.webp", b"")];
    for (name, bytes) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = format!("{:#}", load_image(&path).unwrap_err());
        assert!(err.contains(name), "{err}");
    }
    let err = format!("{:#}", load_image(&dir.join("missing.png")).unwrap_err());
    assert!(err.contains("missing.png"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();

    let err = format!("{:#}", decode_image(&png[..100], "row 7 of mllm_robot.json").unwrap_err());
    assert!(err.contains("row 7 of mllm_robot.json"), "{err}");
}

/// FNV-1a 64 as 16 hex digits, as the fixtures' generator writes it.
fn fnv1a64_hex(bytes: &[u8]) -> String {
    use std::hash::Hasher as _;
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    format!("{:016x}", h.finish())
}
