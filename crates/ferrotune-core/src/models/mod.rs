//! Model families, chosen by `model_type` in `config.json`. This is the only place that lists them.

pub mod qwen3_5;

use std::path::Path;

use anyhow::{bail, Result};

/// `model_type` values ferrotune can load, with the family that implements them.
pub const SUPPORTED: &[(&str, &str)] =
    &[("qwen3_5", "Qwen3.5 (vision tower + Gated-DeltaNet / gated-attention decoder)")];

/// Reads `model_type` from a checkpoint's config.json and checks that it is supported.
pub fn model_type(dir: &Path) -> Result<String> {
    let json = crate::weights::read_config_json(dir)?;
    let mt = json.get("model_type").and_then(|m| m.as_str()).unwrap_or("").to_string();
    if !SUPPORTED.iter().any(|(t, _)| *t == mt) {
        let list: Vec<String> = SUPPORTED.iter().map(|(t, d)| format!("{t} ({d})")).collect();
        bail!(
            "{}: model_type {mt:?} is not supported; ferrotune supports: {}",
            dir.join("config.json").display(),
            list.join(", ")
        );
    }
    Ok(mt)
}
