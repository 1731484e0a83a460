//! Random-init Qwen3.5 checkpoints of any size, written in the Hugging Face layout (config.json +
//! model.safetensors), for benchmarks and for pretraining the demo's small base model from scratch.
//!
//! Initialisation follows transformers' `_init_weights` for this model: normal(0, initializer_range) for
//! linear and embedding weights, zero biases, zero (1+w) norm weights, unit LayerNorm / gated-norm weights,
//! `A_log = log(uniform(0, 16))`, `dt_bias = 1`. Each loader names the init of what it loads
//! ([`crate::weights::Init`]), so the checkpoint keys are spelled only there.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

use super::config::Config;
use super::Qwen3_5;
use crate::weights::Weights;

/// Sizes of a Qwen3.5 model; everything else takes the real family's values.
#[derive(Clone, Debug)]
pub struct Sizes {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub linear_num_key_heads: usize,
    pub linear_num_value_heads: usize,
    pub linear_head_dim: usize,
    pub vision_depth: usize,
    pub vision_hidden_size: usize,
    pub vision_intermediate_size: usize,
    pub vision_heads: usize,
    pub vision_position_side: usize,
    /// Every n-th layer is full attention, the others Gated-DeltaNet (Qwen3.5 uses 4).
    pub full_attention_interval: usize,
}

/// Builds a `config.json` value for `sizes`, with the token ids of `ids` (from the tokenizer it will use).
pub fn config_json(s: &Sizes, ids: &TokenIds) -> serde_json::Value {
    let layer_types: Vec<&str> = (0..s.num_hidden_layers)
        .map(|i| if (i + 1) % s.full_attention_interval.max(1) == 0 { "full_attention" } else { "linear_attention" })
        .collect();
    let rot_half = (s.head_dim / 4) / 2;
    // Interleaved M-RoPE sections summing to the rotary half-dim, in the real 11:11:10 proportion.
    let h = (rot_half * 11).div_ceil(32);
    let w = (rot_half - h) / 2;
    let section = [rot_half - h - w, h, w];
    serde_json::json!({
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "dtype": "bfloat16",
        "image_token_id": ids.image_pad,
        "video_token_id": ids.video_pad,
        "vision_start_token_id": ids.vision_start,
        "vision_end_token_id": ids.vision_end,
        "tie_word_embeddings": true,
        "text_config": {
            "model_type": "qwen3_5_text",
            "vocab_size": s.vocab_size,
            "hidden_size": s.hidden_size,
            "intermediate_size": s.intermediate_size,
            "num_hidden_layers": s.num_hidden_layers,
            "num_attention_heads": s.num_attention_heads,
            "num_key_value_heads": s.num_key_value_heads,
            "head_dim": s.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": true,
            "attention_bias": false,
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": s.linear_head_dim,
            "linear_value_head_dim": s.linear_head_dim,
            "linear_num_key_heads": s.linear_num_key_heads,
            "linear_num_value_heads": s.linear_num_value_heads,
            "layer_types": layer_types,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                "mrope_section": section, "mrope_interleaved": true},
            "eos_token_id": ids.endoftext,
            "pad_token_id": ids.endoftext,
            "initializer_range": 0.02
        },
        "vision_config": {
            "model_type": "qwen3_5",
            "depth": s.vision_depth,
            "hidden_size": s.vision_hidden_size,
            "hidden_act": "gelu_pytorch_tanh",
            "intermediate_size": s.vision_intermediate_size,
            "num_heads": s.vision_heads,
            "in_channels": 3,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": s.hidden_size,
            "num_position_embeddings": s.vision_position_side * s.vision_position_side,
            "initializer_range": 0.02
        }
    })
}

/// Ids of the special tokens a config refers to.
#[derive(Clone, Copy, Debug)]
pub struct TokenIds {
    pub endoftext: u32,
    pub image_pad: u32,
    pub video_pad: u32,
    pub vision_start: u32,
    pub vision_end: u32,
}

impl TokenIds {
    pub fn from_tokenizer(tok: &crate::tokenizer::Tokenizer) -> Result<Self> {
        Ok(Self {
            endoftext: tok.require_token("<|endoftext|>")?,
            image_pad: tok.require_token("<|image_pad|>")?,
            video_pad: tok.require_token("<|video_pad|>")?,
            vision_start: tok.require_token("<|vision_start|>")?,
            vision_end: tok.require_token("<|vision_end|>")?,
        })
    }
}

/// The initializer_range that [`config_json`] writes.
const INIT_STD: f32 = 0.02;

/// Random weights for `cfg`, keyed by checkpoint name, in `dtype` (A_log in f32): the model's loader run on a
/// random source, which draws each tensor when the loader asks for it with its module's init.
pub fn random_weights(cfg: &Config, dtype: DType, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut model = Qwen3_5::from_weights(&Weights::random(seed, INIT_STD, dtype), cfg.clone())?;
    model.state_dict(dtype)
}

/// Writes a complete random-init checkpoint into `out`: config.json, model.safetensors and the tokenizer,
/// chat template and processor files copied from `template_dir`.
pub fn write_random_checkpoint(sizes: &Sizes, template_dir: &Path, out: &Path, dtype: DType, seed: u64) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let tok = crate::tokenizer::Tokenizer::from_path(template_dir)?;
    let json = config_json(sizes, &TokenIds::from_tokenizer(&tok)?);
    let cfg = Config::from_json(&json)?;
    let weights = random_weights(&cfg, dtype, seed)?;
    crate::weights::copy_tokenizer_files(template_dir, out)?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&json)?)?;
    crate::weights::save_safetensors(&weights, &out.join("model.safetensors"))?;
    Ok(())
}

impl Sizes {
    /// About 100M parameters with the tiny tokenizer's vocabulary (benchmarks).
    pub fn m100() -> Self {
        Self {
            vocab_size: 2048,
            hidden_size: 768,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 6,
            num_key_value_heads: 2,
            head_dim: 128,
            linear_num_key_heads: 4,
            linear_num_value_heads: 8,
            linear_head_dim: 96,
            vision_depth: 4,
            vision_hidden_size: 384,
            vision_intermediate_size: 1536,
            vision_heads: 6,
            vision_position_side: 24,
            full_attention_interval: 4,
        }
    }

    /// About 135M parameters (the size the training benchmark compares at).
    pub fn m135() -> Self {
        Self { num_hidden_layers: 16, intermediate_size: 2304, ..Self::m100() }
    }

    /// About 1B parameters (GPU benchmarks).
    pub fn b1() -> Self {
        Self {
            vocab_size: 2048,
            hidden_size: 2048,
            intermediate_size: 6144,
            num_hidden_layers: 16,
            num_attention_heads: 8,
            num_key_value_heads: 2,
            head_dim: 256,
            linear_num_key_heads: 8,
            linear_num_value_heads: 16,
            linear_head_dim: 128,
            vision_depth: 8,
            vision_hidden_size: 768,
            vision_intermediate_size: 3072,
            vision_heads: 12,
            vision_position_side: 48,
            full_attention_interval: 4,
        }
    }

    /// Qwen3.5-4B's shapes (4.54B parameters with the vision tower; 9.1 GB in bf16): the real vocabulary of
    /// 248,320 rows (tied head), hidden 2560, 32 layers (every fourth full attention), a 24-block vision tower.
    pub fn b4() -> Self {
        Self {
            vocab_size: 248_320,
            hidden_size: 2560,
            intermediate_size: 9216,
            num_hidden_layers: 32,
            num_attention_heads: 16,
            num_key_value_heads: 4,
            head_dim: 256,
            linear_num_key_heads: 16,
            linear_num_value_heads: 32,
            linear_head_dim: 128,
            vision_depth: 24,
            vision_hidden_size: 1024,
            vision_intermediate_size: 4096,
            vision_heads: 16,
            vision_position_side: 48,
            full_attention_interval: 4,
        }
    }

    /// About 2.2B parameters with the family's vocabulary, head dims and vision tower: the 2B size's hidden
    /// 2048 with the depth and widths scaled as the family scales them (not read from its own config.json).
    pub fn b2() -> Self {
        Self {
            hidden_size: 2048,
            intermediate_size: 6144,
            num_hidden_layers: 24,
            num_attention_heads: 8,
            num_key_value_heads: 2,
            linear_num_value_heads: 16,
            ..Self::b4()
        }
    }

    /// About 0.8B parameters in the same way as [`Sizes::b2`], with a 12-block, 768-wide vision tower.
    pub fn b0_8() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 3584,
            vision_depth: 12,
            vision_hidden_size: 768,
            vision_intermediate_size: 3072,
            vision_heads: 12,
            ..Self::b2()
        }
    }

    /// The demo's small base model: big enough to learn to see colours, shapes and positions in 128x128
    /// images and to describe them, small enough to train in minutes on a laptop CPU (about 3.6M parameters).
    pub fn demo() -> Self {
        Self {
            vocab_size: 2048,
            hidden_size: 192,
            intermediate_size: 512,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 48,
            linear_num_key_heads: 2,
            linear_num_value_heads: 4,
            linear_head_dim: 48,
            vision_depth: 3,
            vision_hidden_size: 192,
            vision_intermediate_size: 384,
            vision_heads: 4,
            vision_position_side: 8,
            // Two attention layers of four: at this width, retrieval across the prompt is learned much faster
            // than with one.
            full_attention_interval: 2,
        }
    }

    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "demo" => Some(Self::demo()),
            "100m" => Some(Self::m100()),
            "135m" => Some(Self::m135()),
            "1b" => Some(Self::b1()),
            "0.8b" => Some(Self::b0_8()),
            "2b" => Some(Self::b2()),
            "4b" => Some(Self::b4()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of random-init checkpoints are pinned: the demo base is rebuilt from them bit for bit, and
    /// they follow from the loaders' order of draws.
    #[test]
    fn random_init_bytes_are_pinned() {
        let ids = TokenIds { endoftext: 1, image_pad: 2, video_pad: 3, vision_start: 4, vision_end: 5 };
        let odd = Sizes {
            full_attention_interval: 3,
            num_hidden_layers: 5,
            vision_depth: 2,
            linear_num_key_heads: 1,
            ..Sizes::demo()
        };
        let dir = tempfile::tempdir().unwrap();
        for (sizes, seed, want) in [(Sizes::demo(), 0, "79adc0b87f38a0aa"), (odd, 3, "106fd766d54475c6")] {
            let cfg = Config::from_json(&config_json(&sizes, &ids)).unwrap();
            let path = dir.path().join("model.safetensors");
            crate::weights::save_safetensors(&random_weights(&cfg, DType::BF16, seed).unwrap(), &path).unwrap();
            let mut h = fnv::FnvHasher::default();
            std::hash::Hasher::write(&mut h, &std::fs::read(&path).unwrap());
            assert_eq!(format!("{:016x}", std::hash::Hasher::finish(&h)), want, "{sizes:?}");
        }
    }
}
