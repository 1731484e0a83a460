//! Random-init Qwen3.5 checkpoints of any size, written in the Hugging Face layout (config.json +
//! model.safetensors), for benchmarks and for pretraining the demo's small base model from scratch.
//!
//! Initialisation follows transformers' `_init_weights` for this model: normal(0, initializer_range) for
//! linear and embedding weights, zero biases, zero (1+w) norm weights, unit LayerNorm / gated-norm weights,
//! `A_log = log(uniform(0, 16))`, `dt_bias = 1`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::Distribution;

use super::config::{Config, LayerType};

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

/// Random weights for `cfg`, keyed by checkpoint name, in `dtype` (A_log in f32).
pub fn random_weights(cfg: &Config, dtype: DType, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let std = 0.02f32;
    let dev = Device::Cpu;
    let mut out = HashMap::new();
    let normal = |shape: &[usize], rng: &mut rand::rngs::StdRng| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let d = rand_distr::Normal::new(0.0f32, std).context("normal distribution")?;
        let v: Vec<f32> = (0..n).map(|_| d.sample(rng)).collect();
        Ok(Tensor::from_vec(v, shape, &dev)?.to_dtype(dtype)?)
    };
    let full = |shape: &[usize], v: f32| -> Result<Tensor> { Ok(Tensor::full(v, shape, &dev)?.to_dtype(dtype)?) };
    let t = &cfg.text;
    let (d, f) = (t.hidden_size, t.intermediate_size);
    out.insert("model.language_model.embed_tokens.weight".into(), normal(&[t.vocab_size, d], &mut rng)?);
    out.insert("model.language_model.norm.weight".into(), full(&[d], 0.0)?);
    for (i, kind) in t.layer_types.iter().enumerate() {
        let p = format!("model.language_model.layers.{i}");
        out.insert(format!("{p}.input_layernorm.weight"), full(&[d], 0.0)?);
        out.insert(format!("{p}.post_attention_layernorm.weight"), full(&[d], 0.0)?);
        out.insert(format!("{p}.mlp.gate_proj.weight"), normal(&[f, d], &mut rng)?);
        out.insert(format!("{p}.mlp.up_proj.weight"), normal(&[f, d], &mut rng)?);
        out.insert(format!("{p}.mlp.down_proj.weight"), normal(&[d, f], &mut rng)?);
        match kind {
            LayerType::Full => {
                let (h, kv, hd) = (t.num_attention_heads, t.num_key_value_heads, t.head_dim);
                out.insert(format!("{p}.self_attn.q_proj.weight"), normal(&[h * hd * 2, d], &mut rng)?);
                out.insert(format!("{p}.self_attn.k_proj.weight"), normal(&[kv * hd, d], &mut rng)?);
                out.insert(format!("{p}.self_attn.v_proj.weight"), normal(&[kv * hd, d], &mut rng)?);
                out.insert(format!("{p}.self_attn.o_proj.weight"), normal(&[d, h * hd], &mut rng)?);
                out.insert(format!("{p}.self_attn.q_norm.weight"), full(&[hd], 0.0)?);
                out.insert(format!("{p}.self_attn.k_norm.weight"), full(&[hd], 0.0)?);
            }
            LayerType::Linear => {
                let (hk, hv, dk, dv) =
                    (t.linear_num_key_heads, t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim);
                let conv_dim = 2 * hk * dk + hv * dv;
                let k = t.linear_conv_kernel_dim;
                out.insert(format!("{p}.linear_attn.in_proj_qkv.weight"), normal(&[conv_dim, d], &mut rng)?);
                out.insert(format!("{p}.linear_attn.in_proj_z.weight"), normal(&[hv * dv, d], &mut rng)?);
                out.insert(format!("{p}.linear_attn.in_proj_b.weight"), normal(&[hv, d], &mut rng)?);
                out.insert(format!("{p}.linear_attn.in_proj_a.weight"), normal(&[hv, d], &mut rng)?);
                out.insert(format!("{p}.linear_attn.out_proj.weight"), normal(&[d, hv * dv], &mut rng)?);
                // Conv1d default init: uniform(±1/sqrt(fan_in)), fan_in = K for a depthwise kernel.
                let bound = 1.0 / (k as f32).sqrt();
                let conv: Vec<f32> = (0..conv_dim * k).map(|_| rng.random_range(-bound..bound)).collect();
                out.insert(
                    format!("{p}.linear_attn.conv1d.weight"),
                    Tensor::from_vec(conv, (conv_dim, 1, k), &dev)?.to_dtype(dtype)?,
                );
                let a: Vec<f32> = (0..hv).map(|_| rng.random_range(1e-3f32..16.0).ln()).collect();
                out.insert(format!("{p}.linear_attn.A_log"), Tensor::from_vec(a, hv, &dev)?);
                out.insert(format!("{p}.linear_attn.dt_bias"), full(&[hv], 1.0)?);
                out.insert(format!("{p}.linear_attn.norm.weight"), full(&[dv], 1.0)?);
            }
        }
    }
    let v = &cfg.vision;
    let (vd, vf, p, tp) = (v.hidden_size, v.intermediate_size, v.patch_size, v.temporal_patch_size);
    let vp = "model.visual";
    out.insert(format!("{vp}.patch_embed.proj.weight"), normal(&[vd, v.in_channels, tp, p, p], &mut rng)?);
    out.insert(format!("{vp}.patch_embed.proj.bias"), full(&[vd], 0.0)?);
    out.insert(format!("{vp}.pos_embed.weight"), normal(&[v.num_position_embeddings, vd], &mut rng)?);
    for i in 0..v.depth {
        let b = format!("{vp}.blocks.{i}");
        for n in ["norm1", "norm2"] {
            out.insert(format!("{b}.{n}.weight"), full(&[vd], 1.0)?);
            out.insert(format!("{b}.{n}.bias"), full(&[vd], 0.0)?);
        }
        out.insert(format!("{b}.attn.qkv.weight"), normal(&[3 * vd, vd], &mut rng)?);
        out.insert(format!("{b}.attn.qkv.bias"), full(&[3 * vd], 0.0)?);
        out.insert(format!("{b}.attn.proj.weight"), normal(&[vd, vd], &mut rng)?);
        out.insert(format!("{b}.attn.proj.bias"), full(&[vd], 0.0)?);
        out.insert(format!("{b}.mlp.linear_fc1.weight"), normal(&[vf, vd], &mut rng)?);
        out.insert(format!("{b}.mlp.linear_fc1.bias"), full(&[vf], 0.0)?);
        out.insert(format!("{b}.mlp.linear_fc2.weight"), normal(&[vd, vf], &mut rng)?);
        out.insert(format!("{b}.mlp.linear_fc2.bias"), full(&[vd], 0.0)?);
    }
    let m = v.spatial_merge_size * v.spatial_merge_size * vd;
    out.insert(format!("{vp}.merger.norm.weight"), full(&[vd], 1.0)?);
    out.insert(format!("{vp}.merger.norm.bias"), full(&[vd], 0.0)?);
    out.insert(format!("{vp}.merger.linear_fc1.weight"), normal(&[m, m], &mut rng)?);
    out.insert(format!("{vp}.merger.linear_fc1.bias"), full(&[m], 0.0)?);
    out.insert(format!("{vp}.merger.linear_fc2.weight"), normal(&[v.out_hidden_size, m], &mut rng)?);
    out.insert(format!("{vp}.merger.linear_fc2.bias"), full(&[v.out_hidden_size], 0.0)?);
    Ok(out)
}

/// Writes a complete random-init checkpoint into `out`: config.json, model.safetensors and the tokenizer,
/// chat template and processor files copied from `template_dir`.
pub fn write_random_checkpoint(sizes: &Sizes, template_dir: &Path, out: &Path, dtype: DType, seed: u64) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let tok = crate::tokenizer::Tokenizer::from_path(template_dir)?;
    let json = config_json(sizes, &TokenIds::from_tokenizer(&tok)?);
    let cfg = Config::from_json(&json)?;
    let weights = random_weights(&cfg, dtype, seed)?;
    crate::checkpoint::copy_tokenizer_files(template_dir, out)?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&json)?)?;
    crate::checkpoint::save_safetensors(&weights, &out.join("model.safetensors"))?;
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
            _ => None,
        }
    }
}
