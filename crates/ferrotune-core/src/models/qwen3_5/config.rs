//! `config.json` of a `qwen3_5` checkpoint (transformers `Qwen3_5Config`): text_config, vision_config and the
//! vision token ids, with the class defaults for absent keys and the legacy rope layout accepted.

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    Linear,
    Full,
}

#[derive(Debug, Clone)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_act: String,
    pub rms_norm_eps: f64,
    pub attention_bias: bool,
    pub rope_theta: f64,
    pub partial_rotary_factor: f64,
    pub mrope_section: Vec<usize>,
    pub mrope_interleaved: bool,
    pub linear_conv_kernel_dim: usize,
    pub linear_key_head_dim: usize,
    pub linear_value_head_dim: usize,
    pub linear_num_key_heads: usize,
    pub linear_num_value_heads: usize,
    pub layer_types: Vec<LayerType>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

impl TextConfig {
    /// Number of rotary channels per head: `int(head_dim * partial_rotary_factor)`.
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "d_depth")]
    pub depth: usize,
    #[serde(default = "d_vhidden")]
    pub hidden_size: usize,
    #[serde(default = "d_vact")]
    pub hidden_act: String,
    #[serde(default = "d_vinter")]
    pub intermediate_size: usize,
    #[serde(default = "d_vheads")]
    pub num_heads: usize,
    #[serde(default = "d_three")]
    pub in_channels: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_two")]
    pub spatial_merge_size: usize,
    #[serde(default = "d_two")]
    pub temporal_patch_size: usize,
    #[serde(default = "d_vout")]
    pub out_hidden_size: usize,
    #[serde(default = "d_npos")]
    pub num_position_embeddings: usize,
}

fn d_depth() -> usize {
    27
}
fn d_vhidden() -> usize {
    1152
}
fn d_vact() -> String {
    "gelu_pytorch_tanh".into()
}
fn d_vinter() -> usize {
    4304
}
fn d_vheads() -> usize {
    16
}
fn d_three() -> usize {
    3
}
fn d_patch() -> usize {
    16
}
fn d_two() -> usize {
    2
}
fn d_vout() -> usize {
    3584
}
fn d_npos() -> usize {
    2304
}

#[derive(Debug, Clone)]
pub struct Config {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    pub tie_word_embeddings: bool,
}

/// Model types this module implements.
pub const MODEL_TYPES: &[&str] = &["qwen3_5"];

fn get<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn usize_or(v: &serde_json::Value, key: &str, default: usize) -> Result<usize> {
    match get(v, key) {
        None => Ok(default),
        Some(x) => x.as_u64().map(|n| n as usize).with_context(|| format!("`{key}` must be a non-negative integer")),
    }
}

fn f64_or(v: &serde_json::Value, key: &str, default: f64) -> Result<f64> {
    match get(v, key) {
        None => Ok(default),
        Some(x) => x.as_f64().with_context(|| format!("`{key}` must be a number")),
    }
}

fn token_id(v: &serde_json::Value, key: &str) -> Option<u32> {
    match get(v, key)? {
        serde_json::Value::Array(a) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        x => x.as_u64().map(|x| x as u32),
    }
}

impl Config {
    /// Parses a `qwen3_5` `config.json` (already read as JSON). Errors say which key is wrong.
    pub fn from_json(json: &serde_json::Value) -> Result<Self> {
        let model_type = json.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        if !MODEL_TYPES.contains(&model_type) {
            bail!("model_type {model_type:?} is not a Qwen3.5 model (expected one of {MODEL_TYPES:?})");
        }
        let t = get(json, "text_config").context("config.json has no `text_config` object")?;
        let text = Self::text_from_json(t).context("config.json: text_config")?;
        let vision: VisionConfig = match get(json, "vision_config") {
            Some(v) => serde_json::from_value(v.clone()).context("config.json: vision_config")?,
            None => serde_json::from_value(serde_json::json!({}))?,
        };
        let tie = get(json, "tie_word_embeddings")
            .or_else(|| get(t, "tie_word_embeddings"))
            .and_then(|x| x.as_bool())
            .unwrap_or(false);
        let cfg = Self {
            text,
            vision,
            image_token_id: token_id(json, "image_token_id").unwrap_or(248056),
            video_token_id: token_id(json, "video_token_id").unwrap_or(248057),
            vision_start_token_id: token_id(json, "vision_start_token_id").unwrap_or(248053),
            vision_end_token_id: token_id(json, "vision_end_token_id").unwrap_or(248054),
            tie_word_embeddings: tie,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn text_from_json(t: &serde_json::Value) -> Result<TextConfig> {
        let n_layers = usize_or(t, "num_hidden_layers", 32)?;
        let layer_types = match get(t, "layer_types") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, x)| match x.as_str() {
                    Some("linear_attention") => Ok(LayerType::Linear),
                    Some("full_attention") | Some("attention") => Ok(LayerType::Full),
                    other => bail!("layer_types[{i}] = {other:?}: expected \"linear_attention\" or \"full_attention\""),
                })
                .collect::<Result<Vec<_>>>()?,
            Some(_) => bail!("`layer_types` must be a list"),
            None => {
                let interval = usize_or(t, "full_attention_interval", 4)?.max(1);
                (0..n_layers)
                    .map(|i| if (i + 1) % interval == 0 { LayerType::Full } else { LayerType::Linear })
                    .collect()
            }
        };
        // Rope settings live in `rope_parameters` (transformers 5) or, in older files, at the top level or in
        // `rope_scaling`.
        let rope = get(t, "rope_parameters").or_else(|| get(t, "rope_scaling")).cloned().unwrap_or_default();
        let rope_key = |k: &str| get(&rope, k).or_else(|| get(t, k)).cloned();
        let rope_theta = rope_key("rope_theta").and_then(|x| x.as_f64()).unwrap_or(10000.0);
        let partial = rope_key("partial_rotary_factor").and_then(|x| x.as_f64()).unwrap_or(0.25);
        let mrope_section = match rope_key("mrope_section") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
                .context("`mrope_section` must be a list of non-negative integers (T, H, W)")?,
            Some(_) => bail!("`mrope_section` must be a list of three integers (T, H, W)"),
            None => vec![11, 11, 10],
        };
        let mrope_interleaved = rope_key("mrope_interleaved").and_then(|x| x.as_bool()).unwrap_or(true);
        let hidden = usize_or(t, "hidden_size", 4096)?;
        let heads = usize_or(t, "num_attention_heads", 16)?;
        Ok(TextConfig {
            vocab_size: usize_or(t, "vocab_size", 248320)?,
            hidden_size: hidden,
            intermediate_size: usize_or(t, "intermediate_size", 12288)?,
            num_hidden_layers: n_layers,
            num_attention_heads: heads,
            num_key_value_heads: usize_or(t, "num_key_value_heads", 4)?,
            head_dim: usize_or(t, "head_dim", 256)?,
            hidden_act: get(t, "hidden_act").and_then(|x| x.as_str()).unwrap_or("silu").to_string(),
            rms_norm_eps: f64_or(t, "rms_norm_eps", 1e-6)?,
            attention_bias: get(t, "attention_bias").and_then(|x| x.as_bool()).unwrap_or(false),
            rope_theta,
            partial_rotary_factor: partial,
            mrope_section,
            mrope_interleaved,
            linear_conv_kernel_dim: usize_or(t, "linear_conv_kernel_dim", 4)?,
            linear_key_head_dim: usize_or(t, "linear_key_head_dim", 128)?,
            linear_value_head_dim: usize_or(t, "linear_value_head_dim", 128)?,
            linear_num_key_heads: usize_or(t, "linear_num_key_heads", 16)?,
            linear_num_value_heads: usize_or(t, "linear_num_value_heads", 32)?,
            layer_types,
            eos_token_id: token_id(t, "eos_token_id"),
            pad_token_id: token_id(t, "pad_token_id"),
        })
    }

    /// Rejects configurations the model code cannot run (a size it divides by or subtracts from, heads that do
    /// not divide, rotary sections that do not add up), naming config.json, the key and the fix.
    pub fn validate(&self) -> Result<()> {
        const FIX: &str = "config.json is damaged or hand-edited; copy it from the base model's checkpoint";
        let t = &self.text;
        let v = &self.vision;
        // (key, value, the Qwen3.5 default config.json usually holds, the largest value accepted). Sizes are
        // divided by and multiplied together: the ceilings (far above any Qwen model's) keep every product of
        // them inside 64 bits.
        const DIM: usize = 1 << 20;
        const SIDE: usize = 1 << 10;
        let sizes = [
            ("text_config.vocab_size", t.vocab_size, 248320, DIM),
            ("text_config.hidden_size", t.hidden_size, 4096, DIM),
            ("text_config.intermediate_size", t.intermediate_size, 12288, DIM),
            ("text_config.num_hidden_layers", t.num_hidden_layers, 32, SIDE),
            ("text_config.num_attention_heads", t.num_attention_heads, 16, SIDE),
            ("text_config.num_key_value_heads", t.num_key_value_heads, 4, SIDE),
            ("text_config.head_dim", t.head_dim, 256, DIM),
            ("text_config.linear_conv_kernel_dim", t.linear_conv_kernel_dim, 4, SIDE),
            ("text_config.linear_key_head_dim", t.linear_key_head_dim, 128, DIM),
            ("text_config.linear_value_head_dim", t.linear_value_head_dim, 128, DIM),
            ("text_config.linear_num_key_heads", t.linear_num_key_heads, 16, SIDE),
            ("text_config.linear_num_value_heads", t.linear_num_value_heads, 32, SIDE),
            ("vision_config.hidden_size", v.hidden_size, d_vhidden(), DIM),
            ("vision_config.intermediate_size", v.intermediate_size, d_vinter(), DIM),
            ("vision_config.num_heads", v.num_heads, d_vheads(), SIDE),
            ("vision_config.in_channels", v.in_channels, d_three(), SIDE),
            ("vision_config.patch_size", v.patch_size, d_patch(), SIDE),
            ("vision_config.spatial_merge_size", v.spatial_merge_size, d_two(), SIDE),
            ("vision_config.temporal_patch_size", v.temporal_patch_size, d_two(), SIDE),
            ("vision_config.out_hidden_size", v.out_hidden_size, d_vout(), DIM),
            ("vision_config.num_position_embeddings", v.num_position_embeddings, d_npos(), DIM),
        ];
        for (key, value, usual, most) in sizes {
            if value == 0 || value > most {
                bail!(
                    "config.json: `{key}` is {value}; it must be between 1 and {most} (Qwen3.5 checkpoints have \
                     {usual})\n  hint: {FIX}"
                );
            }
        }
        if t.partial_rotary_factor <= 0.0 || t.partial_rotary_factor > 1.0 {
            bail!(
                "config.json: `text_config.partial_rotary_factor` is {}; it must be in (0, 1] (Qwen3.5 checkpoints \
                 have 0.25)\n  hint: {FIX}",
                t.partial_rotary_factor
            );
        }
        if t.rms_norm_eps < 0.0 {
            bail!(
                "config.json: `text_config.rms_norm_eps` is {}; it must not be negative\n  hint: {FIX}",
                t.rms_norm_eps
            );
        }
        if t.layer_types.len() != t.num_hidden_layers {
            bail!(
                "config.json: `text_config.layer_types` lists {} layers but `text_config.num_hidden_layers` is {}\n  \
                 hint: {FIX}",
                t.layer_types.len(),
                t.num_hidden_layers
            );
        }
        if !t.num_attention_heads.is_multiple_of(t.num_key_value_heads) {
            bail!(
                "config.json: `text_config.num_attention_heads` {} is not a multiple of \
                 `text_config.num_key_value_heads` {} (each key/value head serves a whole group of query heads)\n  \
                 hint: {FIX}",
                t.num_attention_heads,
                t.num_key_value_heads
            );
        }
        if !t.linear_num_value_heads.is_multiple_of(t.linear_num_key_heads) {
            bail!(
                "config.json: `text_config.linear_num_value_heads` {} is not a multiple of \
                 `text_config.linear_num_key_heads` {}\n  hint: {FIX}",
                t.linear_num_value_heads,
                t.linear_num_key_heads
            );
        }
        let rot = t.rotary_dim();
        if !rot.is_multiple_of(2) || rot > t.head_dim {
            bail!(
                "config.json: `text_config.head_dim` {} x `partial_rotary_factor` {} gives a rotary dim of {rot}, \
                 which must be even and at most head_dim\n  hint: {FIX}",
                t.head_dim,
                t.partial_rotary_factor
            );
        }
        if t.mrope_section.len() != 3 {
            bail!(
                "config.json: `text_config.rope_parameters.mrope_section` must have 3 entries (T, H, W), got {:?}\n  \
                 hint: {FIX}",
                t.mrope_section
            );
        }
        if t.mrope_section.iter().try_fold(0usize, |a, &b| a.checked_add(b)) != Some(rot / 2) {
            bail!(
                "config.json: `text_config.rope_parameters.mrope_section` {:?} must sum to the rotary half-dim {} \
                 (head_dim {} x partial_rotary_factor {} / 2)\n  hint: {FIX}",
                t.mrope_section,
                rot / 2,
                t.head_dim,
                t.partial_rotary_factor
            );
        }
        if !v.hidden_size.is_multiple_of(v.num_heads) {
            bail!(
                "config.json: `vision_config.hidden_size` {} is not a multiple of `vision_config.num_heads` {}\n  \
                 hint: {FIX}",
                v.hidden_size,
                v.num_heads
            );
        }
        let side = (v.num_position_embeddings as f64).sqrt() as usize;
        if side.checked_mul(side) != Some(v.num_position_embeddings) {
            bail!(
                "config.json: `vision_config.num_position_embeddings` {} is not a square (the position grid is \
                 side x side)\n  hint: {FIX}",
                v.num_position_embeddings
            );
        }
        if v.out_hidden_size != t.hidden_size {
            bail!(
                "config.json: `vision_config.out_hidden_size` {} differs from `text_config.hidden_size` {} (the \
                 merger feeds image features into the decoder)\n  hint: {FIX}",
                v.out_hidden_size,
                t.hidden_size
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny checkpoint's config.json with `edit` applied.
    fn tiny_with(edit: impl FnOnce(&mut serde_json::Value)) -> Result<Config> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny-qwen3_5/config.json");
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        edit(&mut json);
        Config::from_json(&json)
    }

    #[test]
    fn the_fixture_is_valid() {
        tiny_with(|_| {}).unwrap();
    }

    #[test]
    fn zero_and_out_of_range_sizes_name_config_json_and_the_key() {
        let cases: &[(&str, &str, serde_json::Value)] = &[
            ("text_config", "linear_conv_kernel_dim", 0.into()),
            ("text_config", "num_attention_heads", 0.into()),
            ("text_config", "num_key_value_heads", 0.into()),
            ("text_config", "head_dim", 0.into()),
            ("text_config", "linear_num_value_heads", 0.into()),
            ("text_config", "linear_key_head_dim", 0.into()),
            ("text_config", "vocab_size", 0.into()),
            ("text_config", "hidden_size", 0.into()),
            ("text_config", "head_dim", (1u64 << 40).into()),
            ("vision_config", "spatial_merge_size", 0.into()),
            ("vision_config", "patch_size", 0.into()),
            ("vision_config", "temporal_patch_size", 0.into()),
            ("vision_config", "in_channels", 0.into()),
            ("vision_config", "num_heads", 0.into()),
            ("vision_config", "num_position_embeddings", 0.into()),
            ("vision_config", "num_position_embeddings", u64::MAX.into()),
        ];
        for (section, key, value) in cases {
            let err = format!("{:#}", tiny_with(|j| j[*section][*key] = value.clone()).unwrap_err());
            assert!(err.contains("config.json") && err.contains(&format!("`{section}.{key}`")), "{key}: {err}");
            assert!(err.contains("hint:"), "{key}: {err}");
        }
    }

    #[test]
    fn heads_that_do_not_divide_are_an_error() {
        let err = format!("{:#}", tiny_with(|j| j["text_config"]["num_key_value_heads"] = 3.into()).unwrap_err());
        assert!(err.contains("`text_config.num_attention_heads` 4 is not a multiple of"), "{err}");
        let err = format!("{:#}", tiny_with(|j| j["text_config"]["linear_num_key_heads"] = 3.into()).unwrap_err());
        assert!(err.contains("`text_config.linear_num_value_heads` 4"), "{err}");
        let err = format!("{:#}", tiny_with(|j| j["vision_config"]["num_heads"] = 3.into()).unwrap_err());
        assert!(err.contains("`vision_config.hidden_size` 64 is not a multiple"), "{err}");
    }

    #[test]
    fn rotary_settings_are_checked() {
        // rope_parameters wins over the top-level key, as in transformers: edit it there.
        let err = format!(
            "{:#}",
            tiny_with(|j| j["text_config"]["rope_parameters"]["partial_rotary_factor"] = 0.0.into()).unwrap_err()
        );
        assert!(err.contains("`text_config.partial_rotary_factor` is 0"), "{err}");
        let err = format!(
            "{:#}",
            tiny_with(|j| j["text_config"]["rope_parameters"]["mrope_section"] = serde_json::json!([8])).unwrap_err()
        );
        assert!(err.contains("mrope_section") && err.contains("3 entries"), "{err}");
        let err = format!(
            "{:#}",
            tiny_with(|j| j["text_config"]["rope_parameters"]["mrope_section"] = serde_json::json!([3, "x", 2]))
                .unwrap_err()
        );
        assert!(err.contains("mrope_section"), "{err}");
    }
}
