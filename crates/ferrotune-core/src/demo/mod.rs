//! Synthetic datasets for the demo, written in the exact files LLaMA-Factory reads: robot pictures with
//! descriptions (the fine-tuning task, [`robots`]) and captioned scenes of simple shapes (generic captions for
//! pretraining a small base model, [`scenes`]). Both share one colour vocabulary, so what the base learns about
//! colour words carries over to the robots. Everything is deterministic from a seed: the same seed writes
//! byte-identical files.

pub mod base;
pub mod draw;
pub mod pipeline;
pub mod robots;
pub mod scenes;
pub mod vision;

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

/// Language of the generated text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    Zh,
    En,
}

impl std::str::FromStr for Lang {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Lang> {
        match s.trim().to_ascii_lowercase().as_str() {
            "zh" | "cn" | "chinese" => Ok(Lang::Zh),
            "en" | "english" => Ok(Lang::En),
            other => bail!("unknown language {other:?}: use zh or en"),
        }
    }
}

impl std::fmt::Display for Lang {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lang::Zh => "zh",
            Lang::En => "en",
        })
    }
}

/// A colour of the shared vocabulary: its label, its Chinese and English words, and the RGB it is drawn with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Colour {
    pub name: &'static str,
    pub zh: &'static str,
    pub en: &'static str,
    pub rgb: draw::Rgb8,
}

/// The colour vocabulary of both datasets. The values are far apart in RGB so that a model that sees an 8×8
/// grid of patches can tell them apart; none of them is a background colour.
pub const COLOURS: [Colour; 8] = [
    Colour { name: "white", zh: "白色", en: "white", rgb: [242, 242, 238] },
    Colour { name: "black", zh: "黑色", en: "black", rgb: [38, 38, 42] },
    Colour { name: "red", zh: "红色", en: "red", rgb: [214, 36, 36] },
    Colour { name: "orange", zh: "橙色", en: "orange", rgb: [244, 132, 18] },
    Colour { name: "yellow", zh: "黄色", en: "yellow", rgb: [246, 214, 36] },
    Colour { name: "green", zh: "绿色", en: "green", rgb: [40, 160, 56] },
    Colour { name: "blue", zh: "蓝色", en: "blue", rgb: [36, 84, 214] },
    Colour { name: "purple", zh: "紫色", en: "purple", rgb: [136, 56, 186] },
];

/// The palette colour nearest to `rgb` (squared RGB distance).
pub fn nearest_colour(rgb: [f64; 3]) -> &'static Colour {
    let d = |c: &Colour| (0..3).map(|i| (rgb[i] - c.rgb[i] as f64).powi(2)).sum::<f64>();
    COLOURS.iter().min_by(|a, b| d(a).total_cmp(&d(b))).unwrap_or(&COLOURS[0])
}

/// What a generator wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Dataset names registered in `dataset_info.json`, training split first.
    pub datasets: Vec<String>,
    pub n_train: usize,
    pub n_eval: usize,
    /// Number of image files written.
    pub images: usize,
    /// Bytes written (images and JSON).
    pub bytes: u64,
}

/// `n` values drawn so that every value of `values` occurs ⌊n/len⌋ or ⌈n/len⌉ times, in shuffled order:
/// every value is covered once n ≥ len, and the attributes stay balanced in a small held-out split.
pub(crate) fn balanced<T: Copy>(values: &[T], n: usize, rng: &mut impl rand::Rng) -> Vec<T> {
    use rand::seq::SliceRandom;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mut round = values.to_vec();
        round.shuffle(rng);
        out.extend(round.into_iter().take(n - out.len()));
    }
    // The last round may be partial; shuffle all so that the missing values are not always the last of a round.
    out.shuffle(rng);
    out
}

/// A LLaMA-Factory ShareGPT row with `role`/`content` messages, one image, and structured labels.
pub(crate) fn sharegpt_row(user: &str, assistant: &str, image: &str, attributes: Value) -> Value {
    let mut row = Map::new();
    row.insert(
        "messages".into(),
        json!([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]),
    );
    row.insert("images".into(), json!([image]));
    if !attributes.is_null() {
        row.insert("attributes".into(), attributes);
    }
    Value::Object(row)
}

/// The `dataset_info.json` entry for a file of [`sharegpt_row`]s. The tags are needed: LLaMA-Factory's ShareGPT
/// defaults are `from`/`value`/`human`/`gpt`, and rows with other tags are skipped as invalid.
pub(crate) fn dataset_info_entry(file_name: &str) -> Value {
    json!({
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    })
}

/// Adds `entries` to `dir/dataset_info.json`, keeping the entries already there (so several generators can share
/// one dataset folder). Returns the bytes written.
pub(crate) fn register_datasets(dir: &Path, entries: &[(&str, Value)]) -> Result<u64> {
    let path = dir.join("dataset_info.json");
    let mut info = if path.exists() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => bail!("{}: expected a JSON object of dataset entries", path.display()),
            Err(e) => bail!("{}:{}:{}: {e}", path.display(), e.line(), e.column()),
        }
    } else {
        Map::new()
    };
    for (name, entry) in entries {
        info.insert((*name).to_string(), entry.clone());
    }
    write_json(&path, &Value::Object(info))
}

/// Writes pretty JSON (non-ASCII kept as is, as LLaMA-Factory's own files are) and returns the bytes written.
pub(crate) fn write_json(path: &Path, value: &Value) -> Result<u64> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    Ok(text.len() as u64)
}

/// Writes `img` as PNG and returns the bytes written.
pub(crate) fn write_png(path: &Path, img: &image::RgbImage) -> Result<u64> {
    let bytes = draw::png_bytes(img)?;
    std::fs::write(path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(bytes.len() as u64)
}
