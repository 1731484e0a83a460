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
            Some(serde_json::Value::Array(a)) => a.iter().map(|x| x.as_u64().unwrap_or(0) as usize).collect(),
            _ => vec![11, 11, 10],
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

    /// Rejects configurations the model code cannot run, naming the keys.
    pub fn validate(&self) -> Result<()> {
        let t = &self.text;
        if t.layer_types.len() != t.num_hidden_layers {
            bail!(
                "text_config: layer_types lists {} layers but num_hidden_layers is {}",
                t.layer_types.len(),
                t.num_hidden_layers
            );
        }
        if t.num_key_value_heads == 0 || t.num_attention_heads % t.num_key_value_heads != 0 {
            bail!(
                "text_config: num_attention_heads {} is not a multiple of num_key_value_heads {}",
                t.num_attention_heads,
                t.num_key_value_heads
            );
        }
        if t.linear_num_key_heads == 0 || t.linear_num_value_heads % t.linear_num_key_heads != 0 {
            bail!(
                "text_config: linear_num_value_heads {} is not a multiple of linear_num_key_heads {}",
                t.linear_num_value_heads,
                t.linear_num_key_heads
            );
        }
        let rot = t.rotary_dim();
        if rot % 2 != 0 || rot > t.head_dim {
            bail!(
                "text_config: head_dim {} × partial_rotary_factor {} gives an odd or too large rotary dim",
                t.head_dim,
                t.partial_rotary_factor
            );
        }
        if t.mrope_section.iter().sum::<usize>() != rot / 2 {
            bail!(
                "text_config: mrope_section {:?} must sum to the rotary half-dim {} (head_dim {} × partial_rotary_factor {} / 2)",
                t.mrope_section,
                rot / 2,
                t.head_dim,
                t.partial_rotary_factor
            );
        }
        if t.mrope_section.len() != 3 {
            bail!("text_config: mrope_section must have 3 entries (T, H, W), got {:?}", t.mrope_section);
        }
        let v = &self.vision;
        if v.num_heads == 0 || v.hidden_size % v.num_heads != 0 {
            bail!("vision_config: hidden_size {} is not a multiple of num_heads {}", v.hidden_size, v.num_heads);
        }
        let side = (v.num_position_embeddings as f64).sqrt() as usize;
        if side * side != v.num_position_embeddings {
            bail!("vision_config: num_position_embeddings {} is not a square", v.num_position_embeddings);
        }
        if v.out_hidden_size != t.hidden_size {
            bail!(
                "vision_config.out_hidden_size {} differs from text_config.hidden_size {}",
                v.out_hidden_size,
                t.hidden_size
            );
        }
        Ok(())
    }
}
