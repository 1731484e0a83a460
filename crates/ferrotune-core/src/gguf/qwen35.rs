//! A Qwen3.5 checkpoint (adapters merged) as llama.cpp loads it: the language model as `qwen35` (llama.cpp's tensor
//! names, its value-head order, norms with their +1 folded in, −exp(A_log)), the vision tower and merger as a
//! `clip` projector of type `qwen3vl_merger`, the tokenizer and chat template embedded; or a LoRA adapter alone.
//! Names, metadata and transforms follow llama.cpp's converter (`convert_hf_to_gguf.py`, `Qwen3_5TextModel` and
//! `Qwen3VLVisionModel`) and `llama-quantize`'s Q4_K_M type choice.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::format::{GgmlType, TensorPlan, Value, Writer};
use super::quant::quantize;
use crate::lora::Adapter;
use crate::models::qwen3_5::config::{Config, LayerType};
use crate::weights::{read_config_json, Checkpoint};

/// The weights' type in the files (`--export_quant`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    F32,
    Bf16,
    F16,
    Q8_0,
    Q4KM,
}

impl Quant {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Quant::F32,
            "bf16" | "bfloat16" => Quant::Bf16,
            "f16" | "float16" => Quant::F16,
            "q8_0" => Quant::Q8_0,
            "q4_k_m" => Quant::Q4KM,
            other => {
                bail!("export_quant {other:?}: expected bf16, f16, q8_0 or q4_k_m (gguf-lora: f32, bf16, f16 or q8_0)")
            }
        })
    }

    /// llama.cpp's name, used in file names.
    pub fn label(self) -> &'static str {
        match self {
            Quant::F32 => "F32",
            Quant::Bf16 => "BF16",
            Quant::F16 => "F16",
            Quant::Q8_0 => "Q8_0",
            Quant::Q4KM => "Q4_K_M",
        }
    }

    /// `general.file_type` (llama_ftype).
    fn file_type(self) -> u32 {
        match self {
            Quant::F32 => 0,
            Quant::F16 => 1,
            Quant::Q8_0 => 7,
            Quant::Q4KM => 15,
            Quant::Bf16 => 32,
        }
    }
}

#[derive(Clone, Debug)]
pub struct GgufOptions {
    pub model_dir: PathBuf,
    pub adapters: Vec<PathBuf>,
    pub export_dir: PathBuf,
    pub quant: Quant,
    /// Write the adapter alone (`gguf-lora`) instead of the merged model.
    pub lora_only: bool,
    pub overwrite: bool,
    /// A chat template to embed when no adapter carries one (source, origin).
    pub chat_template: Option<(String, String)>,
}

#[derive(Clone, Debug, Default)]
pub struct GgufReport {
    /// Files written with their sizes in bytes.
    pub files: Vec<(String, u64)>,
    /// Tensors per written type, over all files.
    pub types: BTreeMap<&'static str, usize>,
    pub merged_modules: usize,
}

/// How one checkpoint tensor becomes a GGUF tensor.
#[derive(Clone, Debug, PartialEq)]
enum Transform {
    None,
    /// RMSNorm weights stored as offsets from 1 (`1 + w` in llama.cpp's file).
    PlusOne,
    /// `A_log` → −exp(A_log), value heads reordered.
    NegExp,
    /// Value heads (`hs` rows each) from row `start` on, from grouped by key head to tiled.
    Rows {
        start: usize,
        hs: usize,
    },
    /// The same on column blocks of `hs` (`out_proj`).
    Cols {
        hs: usize,
    },
    /// The Conv3d patch embedding's temporal slice `t`.
    Temporal(usize),
}

/// A planned GGUF tensor and where it comes from.
#[derive(Clone, Debug)]
struct Source {
    hf: String,
    plan: TensorPlan,
    transform: Transform,
}

struct Shapes {
    nk: usize,
    nv: usize,
    kd: usize,
    vd: usize,
}

impl Shapes {
    fn of(cfg: &Config) -> Self {
        let t = &cfg.text;
        Self {
            nk: t.linear_num_key_heads,
            nv: t.linear_num_value_heads,
            kd: t.linear_key_head_dim,
            vd: t.linear_value_head_dim,
        }
    }

    /// The permutation of value heads llama.cpp expects (tiled: head r·nk + g is HF's g·(nv/nk) + r), as source
    /// index per destination index.
    fn order(&self) -> Vec<usize> {
        let rv = self.nv / self.nk;
        (0..self.nv).map(|p| (p % self.nk) * rv + p / self.nk).collect()
    }
}

/// Refuses what llama.cpp cannot load, before anything is written.
fn check(cfg: &Config) -> Result<()> {
    let t = &cfg.text;
    if t.linear_key_head_dim != t.linear_value_head_dim {
        bail!(
            "linear_key_head_dim {} differs from linear_value_head_dim {}: llama.cpp's qwen35 uses one state size for both",
            t.linear_key_head_dim,
            t.linear_value_head_dim
        );
    }
    if t.mrope_section.len() > 4 {
        bail!("mrope_section {:?}: llama.cpp takes at most 4 sections", t.mrope_section);
    }
    if t.linear_num_key_heads == 0 || !t.linear_num_value_heads.is_multiple_of(t.linear_num_key_heads) {
        bail!(
            "linear_num_value_heads {} is not a multiple of linear_num_key_heads {}",
            t.linear_num_value_heads,
            t.linear_num_key_heads
        );
    }
    if cfg.vision.temporal_patch_size != 2 {
        bail!(
            "vision temporal_patch_size {}: llama.cpp's projector splits a Conv3d of exactly 2 frames",
            cfg.vision.temporal_patch_size
        );
    }
    if cfg.vision.out_hidden_size != t.hidden_size {
        bail!(
            "vision out_hidden_size {} differs from the text hidden_size {}",
            cfg.vision.out_hidden_size,
            t.hidden_size
        );
    }
    Ok(())
}

/// `use_more_bits` of llama-quantize: the first and last eighth of the layers and every third in between.
fn more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize) % 3 == 2
}

/// The type of a matrix (PyTorch `shape`, rows of its last dimension) named `name` in layer `layer` of `n_layer`.
fn weight_type(q: Quant, name: &str, shape: &[usize], layer: Option<usize>, n_layer: usize, tied: bool) -> GgmlType {
    let row = *shape.last().unwrap_or(&1);
    let pick = match q {
        Quant::F32 => GgmlType::F32,
        Quant::Bf16 => GgmlType::BF16,
        Quant::F16 => GgmlType::F16,
        Quant::Q8_0 => GgmlType::Q8_0,
        Quant::Q4KM => {
            let i = layer.unwrap_or(0);
            if name == "output.weight" || (name == "token_embd.weight" && tied) {
                GgmlType::Q6K
            } else if name.ends_with(".attn_v.weight")
                || name.ends_with(".attn_qkv.weight")
                || name.ends_with(".ffn_down.weight")
            {
                if more_bits(i, n_layer) {
                    GgmlType::Q6K
                } else {
                    GgmlType::Q4K
                }
            } else {
                GgmlType::Q4K
            }
        }
    };
    // Rows that do not split into the blocks: llama.cpp's fallbacks.
    let pick = match pick {
        GgmlType::Q4K if !row.is_multiple_of(256) => GgmlType::Q5_0,
        GgmlType::Q6K if !row.is_multiple_of(256) => GgmlType::Q8_0,
        other => other,
    };
    if !row.is_multiple_of(pick.block().0) {
        GgmlType::F16
    } else {
        pick
    }
}

/// The language model's tensors: GGUF name, shape, type and transform of every checkpoint tensor it uses.
fn text_plan(ckpt: &Checkpoint, cfg: &Config, q: Quant) -> Result<Vec<Source>> {
    let t = &cfg.text;
    let sh = Shapes::of(cfg);
    let key_dim = sh.nk * sh.kd;
    let n = t.num_hidden_layers;
    let mut out = Vec::new();
    let mut add = |hf: String, gguf: String, transform: Transform, float: bool, layer: Option<usize>| -> Result<()> {
        let (mut shape, _) = ckpt.info(&hf).with_context(|| format!("the checkpoint has no tensor {hf}"))?;
        if hf.ends_with("conv1d.weight") {
            // (C, 1, K) -> (C, K)
            shape = vec![shape[0], *shape.last().unwrap_or(&1)];
        }
        let ty = if float || shape.len() < 2 {
            GgmlType::F32
        } else {
            weight_type(q, &gguf, &shape, layer, n, cfg.tie_word_embeddings)
        };
        out.push(Source { hf, plan: TensorPlan { name: gguf, shape, ty }, transform });
        Ok(())
    };
    let lm = "model.language_model";
    add(format!("{lm}.embed_tokens.weight"), "token_embd.weight".into(), Transform::None, false, None)?;
    if !cfg.tie_word_embeddings {
        add("lm_head.weight".into(), "output.weight".into(), Transform::None, false, None)?;
    }
    add(format!("{lm}.norm.weight"), "output_norm.weight".into(), Transform::PlusOne, true, None)?;
    for (i, kind) in t.layer_types.iter().enumerate() {
        let hf = |s: &str| format!("{lm}.layers.{i}.{s}");
        let g = |s: &str| format!("blk.{i}.{s}");
        let l = Some(i);
        add(hf("input_layernorm.weight"), g("attn_norm.weight"), Transform::PlusOne, true, l)?;
        add(hf("post_attention_layernorm.weight"), g("post_attention_norm.weight"), Transform::PlusOne, true, l)?;
        match kind {
            LayerType::Full => {
                for (a, b) in
                    [("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")]
                {
                    add(hf(&format!("self_attn.{a}.weight")), g(&format!("{b}.weight")), Transform::None, false, l)?;
                }
                add(hf("self_attn.q_norm.weight"), g("attn_q_norm.weight"), Transform::PlusOne, true, l)?;
                add(hf("self_attn.k_norm.weight"), g("attn_k_norm.weight"), Transform::PlusOne, true, l)?;
            }
            LayerType::Linear => {
                let la = |s: &str| hf(&format!("linear_attn.{s}"));
                add(
                    la("in_proj_qkv.weight"),
                    g("attn_qkv.weight"),
                    Transform::Rows { start: 2 * key_dim, hs: sh.vd },
                    false,
                    l,
                )?;
                add(la("in_proj_z.weight"), g("attn_gate.weight"), Transform::Rows { start: 0, hs: sh.vd }, false, l)?;
                add(la("in_proj_b.weight"), g("ssm_beta.weight"), Transform::Rows { start: 0, hs: 1 }, false, l)?;
                add(la("in_proj_a.weight"), g("ssm_alpha.weight"), Transform::Rows { start: 0, hs: 1 }, false, l)?;
                add(la("A_log"), g("ssm_a"), Transform::NegExp, true, l)?;
                add(la("dt_bias"), g("ssm_dt.bias"), Transform::Rows { start: 0, hs: 1 }, true, l)?;
                add(
                    la("conv1d.weight"),
                    g("ssm_conv1d.weight"),
                    Transform::Rows { start: 2 * key_dim, hs: sh.vd },
                    true,
                    l,
                )?;
                add(la("norm.weight"), g("ssm_norm.weight"), Transform::None, true, l)?;
                add(la("out_proj.weight"), g("ssm_out.weight"), Transform::Cols { hs: sh.vd }, false, l)?;
            }
        }
        for (a, b) in [("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")] {
            add(hf(&format!("mlp.{a}.weight")), g(&format!("{b}.weight")), Transform::None, false, l)?;
        }
    }
    Ok(out)
}

/// The projector's weight type: the model's 16-bit or 32-bit type, F16 beside a quantized model.
fn vision_type(q: Quant) -> GgmlType {
    match q {
        Quant::F32 => GgmlType::F32,
        Quant::Bf16 => GgmlType::BF16,
        _ => GgmlType::F16,
    }
}

/// The projector's tensors.
fn vision_plan(ckpt: &Checkpoint, cfg: &Config, q: Quant) -> Result<Vec<Source>> {
    let ftype = vision_type(q);
    let mut out = Vec::new();
    let mut add = |hf: String, gguf: &str, ty: Option<GgmlType>, transform: Transform| -> Result<()> {
        let (mut shape, _) = ckpt.info(&hf).with_context(|| format!("the checkpoint has no tensor {hf}"))?;
        if let Transform::Temporal(_) = transform {
            // (C, 3, T, p, p) -> (C, 3, p, p)
            shape.remove(2);
        }
        let ty = match ty {
            Some(t) => t,
            None if shape.len() < 2 => GgmlType::F32,
            None if shape.last().is_some_and(|r| r % 2 != 0) => GgmlType::F32,
            None => ftype,
        };
        out.push(Source { hf, plan: TensorPlan { name: gguf.to_string(), shape, ty }, transform });
        Ok(())
    };
    let v = "model.visual";
    let patch_ty = if ftype == GgmlType::F16 { GgmlType::F16 } else { GgmlType::F32 };
    add(format!("{v}.patch_embed.proj.weight"), "v.patch_embd.weight", Some(patch_ty), Transform::Temporal(0))?;
    add(format!("{v}.patch_embed.proj.weight"), "v.patch_embd.weight.1", Some(patch_ty), Transform::Temporal(1))?;
    add(format!("{v}.patch_embed.proj.bias"), "v.patch_embd.bias", Some(GgmlType::F32), Transform::None)?;
    add(format!("{v}.pos_embed.weight"), "v.position_embd.weight", Some(GgmlType::F32), Transform::None)?;
    for i in 0..cfg.vision.depth {
        let b = format!("{v}.blocks.{i}");
        for (hf, g) in [
            ("norm1", "ln1"),
            ("norm2", "ln2"),
            ("attn.qkv", "attn_qkv"),
            ("attn.proj", "attn_out"),
            ("mlp.linear_fc1", "ffn_up"),
            ("mlp.linear_fc2", "ffn_down"),
        ] {
            let norm = hf.starts_with("norm");
            add(
                format!("{b}.{hf}.weight"),
                &format!("v.blk.{i}.{g}.weight"),
                norm.then_some(GgmlType::F32),
                Transform::None,
            )?;
            add(format!("{b}.{hf}.bias"), &format!("v.blk.{i}.{g}.bias"), Some(GgmlType::F32), Transform::None)?;
        }
    }
    for (hf, g, norm) in [("norm", "v.post_ln", true), ("linear_fc1", "mm.0", false), ("linear_fc2", "mm.2", false)] {
        add(format!("{v}.merger.{hf}.weight"), &format!("{g}.weight"), norm.then_some(GgmlType::F32), Transform::None)?;
        add(format!("{v}.merger.{hf}.bias"), &format!("{g}.bias"), Some(GgmlType::F32), Transform::None)?;
    }
    Ok(out)
}

/// Applies `t` to `x` (PyTorch `shape` of the source tensor) with the value-head permutation `order`.
fn apply(t: &Transform, x: Vec<f32>, shape: &[usize], order: &[usize]) -> Vec<f32> {
    let cols = if shape.len() >= 2 { shape[1..].iter().product() } else { 1 };
    match t {
        Transform::None => x,
        Transform::PlusOne => x.into_iter().map(|v| v + 1.0).collect(),
        Transform::NegExp => {
            let y: Vec<f32> = x.into_iter().map(|v| -v.exp()).collect();
            permute_rows(&y, 0, 1, 1, order)
        }
        Transform::Rows { start, hs } => permute_rows(&x, *start, *hs, cols, order),
        Transform::Cols { hs } => {
            let mut y = x.clone();
            for (src, dst) in x.chunks_exact(cols).zip(y.chunks_exact_mut(cols)) {
                for (p, &q) in order.iter().enumerate() {
                    dst[p * hs..(p + 1) * hs].copy_from_slice(&src[q * hs..(q + 1) * hs]);
                }
            }
            y
        }
        Transform::Temporal(k) => {
            // (C, 3, T, p, p): the frame k of every (C, 3) pair.
            let (tt, pp) = (shape[2], shape[3] * shape[4]);
            x.chunks_exact(tt * pp).flat_map(|c| c[k * pp..(k + 1) * pp].to_vec()).collect()
        }
    }
}

/// Rows `start..` of `x` (rows of `cols`) as value heads of `hs` rows, in llama.cpp's order.
fn permute_rows(x: &[f32], start: usize, hs: usize, cols: usize, order: &[usize]) -> Vec<f32> {
    let mut y = x.to_vec();
    let head = hs * cols;
    for (p, &q) in order.iter().enumerate() {
        let (d, s) = (start * cols + p * head, start * cols + q * head);
        y[d..d + head].copy_from_slice(&x[s..s + head]);
    }
    y
}

/// The tokenizer's GGUF keys: tokens by id (padded to the vocabulary size), their types, merges, special ids.
fn tokenizer_kv(model_dir: &Path, vocab_size: usize, cfg_json: &serde_json::Value) -> Result<Vec<(String, Value)>> {
    let path = model_dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let tj: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column()))?;
    let model = tj.get("model").with_context(|| format!("{}: no `model`", path.display()))?;
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        bail!("{}: a {:?} tokenizer; llama.cpp's qwen35 takes a byte-level BPE", path.display(), model.get("type"));
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![1i32; vocab_size];
    let mut put = |id: u64, s: &str| -> Result<()> {
        let slot = tokens.get_mut(id as usize).with_context(|| {
            format!("{}: token id {id} ({s:?}) is past the model's vocab_size {vocab_size}", path.display())
        })?;
        *slot = Some(s.to_string());
        Ok(())
    };
    for (s, id) in
        model.get("vocab").and_then(|v| v.as_object()).with_context(|| format!("{}: no model.vocab", path.display()))?
    {
        put(id.as_u64().with_context(|| format!("{}: vocab id of {s:?}", path.display()))?, s)?;
    }
    let mut by_content = HashMap::new();
    for a in tj.get("added_tokens").and_then(|v| v.as_array()).into_iter().flatten() {
        let (Some(id), Some(content)) =
            (a.get("id").and_then(|v| v.as_u64()), a.get("content").and_then(|v| v.as_str()))
        else {
            continue;
        };
        put(id, content)?;
        let special = a.get("special").and_then(|v| v.as_bool()).unwrap_or(false);
        let control = special || (content.starts_with("<|") && content.ends_with("|>"));
        types[id as usize] = if control { 3 } else { 4 };
        by_content.insert(content.to_string(), id as u32);
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            Value::Str(t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            }))
        })
        .collect();
    let merges: Vec<Value> = model
        .get("merges")
        .and_then(|m| m.as_array())
        .with_context(|| format!("{}: no model.merges", path.display()))?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(Value::Str(s.clone())),
            serde_json::Value::Array(p) if p.len() == 2 => {
                let part = |v: &serde_json::Value| v.as_str().map(|s| s.replace(' ', "\u{120}"));
                match (part(&p[0]), part(&p[1])) {
                    (Some(a), Some(b)) => Ok(Value::Str(format!("{a} {b}"))),
                    _ => bail!("{}: a merge that is not two strings: {m}", path.display()),
                }
            }
            _ => bail!("{}: a merge that is not two strings: {m}", path.display()),
        })
        .collect::<Result<_>>()?;
    let mut kv = vec![
        ("tokenizer.ggml.model".to_string(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::Str("qwen35".into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
    ];
    // Special tokens: tokenizer_config.json's strings, else config.json's ids.
    let tc: serde_json::Value = match std::fs::read_to_string(model_dir.join("tokenizer_config.json")) {
        Ok(s) => serde_json::from_str(&s)
            .with_context(|| format!("{}: invalid JSON", model_dir.join("tokenizer_config.json").display()))?,
        Err(_) => serde_json::json!({}),
    };
    let token_of = |key: &str| -> Option<u32> {
        let v = tc.get(key)?;
        let s = v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str()))?;
        by_content.get(s).copied()
    };
    let text_cfg = cfg_json.get("text_config").unwrap_or(cfg_json);
    let id_of = |key: &str| text_cfg.get(key).or_else(|| cfg_json.get(key)).and_then(|v| v.as_u64()).map(|v| v as u32);
    for (what, tok_key, cfg_key) in [
        ("eos", "eos_token", "eos_token_id"),
        ("padding", "pad_token", "pad_token_id"),
        ("bos", "bos_token", "bos_token_id"),
    ] {
        if let Some(id) = token_of(tok_key).or_else(|| id_of(cfg_key)) {
            kv.push((format!("tokenizer.ggml.{what}_token_id"), Value::U32(id)));
        }
    }
    Ok(kv)
}

/// generation_config.json's sampling defaults, which llama.cpp takes as its own.
fn sampling_kv(model_dir: &Path) -> Result<Vec<(String, Value)>> {
    let path = model_dir.join("generation_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(vec![]) };
    let j: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let mut kv = Vec::new();
    if let Some(t) = j.get("temperature").and_then(|v| v.as_f64()) {
        kv.push(("general.sampling.temp".to_string(), Value::F32(t as f32)));
    }
    if let Some(k) = j.get("top_k").and_then(|v| v.as_i64()) {
        kv.push(("general.sampling.top_k".to_string(), Value::I32(k as i32)));
    }
    if let Some(p) = j.get("top_p").and_then(|v| v.as_f64()) {
        kv.push(("general.sampling.top_p".to_string(), Value::F32(p as f32)));
    }
    Ok(kv)
}

/// The chat template to embed: an adapter's (the last that has one), the caller's, the base's file, or the one in
/// its tokenizer_config.json.
fn chat_template(opts: &GgufOptions) -> Result<Option<String>> {
    if let Some(dir) = opts.adapters.iter().rev().find(|d| d.join("chat_template.jinja").is_file()) {
        return Ok(Some(std::fs::read_to_string(dir.join("chat_template.jinja"))?));
    }
    if let Some((source, _)) = &opts.chat_template {
        return Ok(Some(source.clone()));
    }
    let file = opts.model_dir.join("chat_template.jinja");
    if file.is_file() {
        return Ok(Some(std::fs::read_to_string(file)?));
    }
    let tc = opts.model_dir.join("tokenizer_config.json");
    if let Ok(s) = std::fs::read_to_string(&tc) {
        let j: serde_json::Value =
            serde_json::from_str(&s).with_context(|| format!("{}: invalid JSON", tc.display()))?;
        if let Some(t) = j.get("chat_template").and_then(|t| t.as_str()) {
            return Ok(Some(t.to_string()));
        }
    }
    Ok(None)
}

fn text_kv(cfg: &Config, cfg_json: &serde_json::Value, name: &str, q: Quant) -> Vec<(String, Value)> {
    let t = &cfg.text;
    let a = "qwen35";
    let tc = cfg_json.get("text_config").unwrap_or(cfg_json);
    let ctx = tc.get("max_position_embeddings").and_then(|v| v.as_u64()).unwrap_or(262_144) as u32;
    let mut sections: Vec<i32> = t.mrope_section.iter().map(|&s| s as i32).collect();
    sections.resize(4, 0);
    let interval = t.layer_types.iter().position(|l| *l == LayerType::Full).map_or(4, |i| i + 1) as u32;
    let u = |v: usize| Value::U32(v as u32);
    vec![
        ("general.architecture".into(), Value::Str(a.into())),
        ("general.type".into(), Value::Str("model".into())),
        ("general.name".into(), Value::Str(name.into())),
        ("general.file_type".into(), Value::U32(q.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        (format!("{a}.block_count"), u(t.num_hidden_layers)),
        (format!("{a}.context_length"), Value::U32(ctx)),
        (format!("{a}.embedding_length"), u(t.hidden_size)),
        (format!("{a}.feed_forward_length"), u(t.intermediate_size)),
        (format!("{a}.attention.head_count"), u(t.num_attention_heads)),
        (format!("{a}.attention.head_count_kv"), u(t.num_key_value_heads)),
        (format!("{a}.attention.key_length"), u(t.head_dim)),
        (format!("{a}.attention.value_length"), u(t.head_dim)),
        (format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(t.rms_norm_eps as f32)),
        (format!("{a}.rope.freq_base"), Value::F32(t.rope_theta as f32)),
        (format!("{a}.rope.dimension_count"), u((t.head_dim as f64 * t.partial_rotary_factor) as usize)),
        (format!("{a}.rope.dimension_sections"), Value::Array(sections.into_iter().map(Value::I32).collect())),
        (format!("{a}.ssm.conv_kernel"), u(t.linear_conv_kernel_dim)),
        (format!("{a}.ssm.state_size"), u(t.linear_key_head_dim)),
        (format!("{a}.ssm.group_count"), u(t.linear_num_key_heads)),
        (format!("{a}.ssm.time_step_rank"), u(t.linear_num_value_heads)),
        (format!("{a}.ssm.inner_size"), u(t.linear_value_head_dim * t.linear_num_value_heads)),
        (
            format!("{a}.attention.recurrent_layers"),
            Value::Array(t.layer_types.iter().map(|l| Value::Bool(*l == LayerType::Linear)).collect()),
        ),
        (format!("{a}.full_attention_interval"), Value::U32(interval)),
    ]
}

fn vision_kv(cfg: &Config, model_dir: &Path, name: &str, q: Quant) -> Result<Vec<(String, Value)>> {
    let v = &cfg.vision;
    let pre = model_dir.join("preprocessor_config.json");
    let pj: serde_json::Value = match std::fs::read_to_string(&pre) {
        Ok(s) => serde_json::from_str(&s).with_context(|| format!("{}: invalid JSON", pre.display()))?,
        Err(_) => serde_json::json!({}),
    };
    let triple = |key: &str| -> Value {
        let vals =
            pj.get(key).and_then(|a| a.as_array()).map(|a| a.iter().filter_map(|x| x.as_f64()).collect::<Vec<_>>());
        Value::Array(
            vals.filter(|v| v.len() == 3).unwrap_or(vec![0.5; 3]).into_iter().map(|x| Value::F32(x as f32)).collect(),
        )
    };
    let side = ((v.num_position_embeddings as f64).sqrt() as usize) * v.patch_size;
    let u = |x: usize| Value::U32(x as u32);
    let file_type = match vision_type(q) {
        GgmlType::F32 => Quant::F32,
        GgmlType::BF16 => Quant::Bf16,
        _ => Quant::F16,
    }
    .file_type();
    Ok(vec![
        ("general.architecture".into(), Value::Str("clip".into())),
        ("general.type".into(), Value::Str("mmproj".into())),
        ("general.name".into(), Value::Str(name.into())),
        ("general.file_type".into(), Value::U32(file_type)),
        ("general.quantization_version".into(), Value::U32(2)),
        ("clip.projector_type".into(), Value::Str("qwen3vl_merger".into())),
        ("clip.has_vision_encoder".into(), Value::Bool(true)),
        ("clip.use_gelu".into(), Value::Bool(true)),
        ("clip.vision.projection_dim".into(), u(cfg.text.hidden_size)),
        ("clip.vision.image_size".into(), u(side)),
        ("clip.vision.patch_size".into(), u(v.patch_size)),
        ("clip.vision.embedding_length".into(), u(v.hidden_size)),
        ("clip.vision.feed_forward_length".into(), u(v.intermediate_size)),
        ("clip.vision.block_count".into(), u(v.depth)),
        ("clip.vision.attention.head_count".into(), u(v.num_heads)),
        ("clip.vision.attention.layer_norm_epsilon".into(), Value::F32(cfg.text.rms_norm_eps as f32)),
        ("clip.vision.image_mean".into(), triple("image_mean")),
        ("clip.vision.image_std".into(), triple("image_std")),
        ("clip.vision.spatial_merge_size".into(), u(v.spatial_merge_size)),
        ("clip.vision.is_deepstack_layers".into(), Value::Array(vec![Value::Bool(false); v.depth])),
    ])
}

/// Bytes of f32 values converted at a time when a tensor goes by row blocks (a few rows in the unit tests, so
/// that the tiny checkpoint's matrices take that path).
#[cfg(not(test))]
const BLOCK_BYTES: usize = 256 << 20;
#[cfg(test)]
const BLOCK_BYTES: usize = 1 << 10;

/// Writes one file from its plan, loading, merging and transforming one tensor at a time.
#[allow(clippy::too_many_arguments)]
fn write_file(
    path: &Path,
    kv: &[(String, Value)],
    sources: &[Source],
    ckpt: &Checkpoint,
    deltas: &HashMap<String, Tensor>,
    order: &[usize],
    report: &mut GgufReport,
    log: &mut dyn FnMut(&str),
) -> Result<u64> {
    let mut w = Writer::create(path, kv, sources.iter().map(|s| s.plan.clone()).collect())?;
    let bar = indicatif::ProgressBar::new(sources.len() as u64);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} tensors [{elapsed_precise}<{eta_precise}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default());
    for s in sources {
        let stored = ckpt.load(&s.hf, &Device::Cpu)?;
        let shape = stored.dims().to_vec();
        let delta = s.hf.strip_suffix(".weight").and_then(|m| deltas.get(m));
        if delta.is_some() {
            report.merged_modules += 1;
        }
        // Rows a block at a time where the transform keeps rows apart (the 248,320-row embedding of the real
        // sizes would otherwise be held in f32 twice); whole otherwise (the value-head reorders move rows).
        let row = *s.plan.shape.last().unwrap_or(&1);
        let merged = |t: Tensor, d: Option<Tensor>| -> Result<Vec<f32>> {
            let t = t.to_dtype(DType::F32)?;
            let t = match d {
                Some(d) => (t + d).with_context(|| format!("merging the adapter into {}", s.hf))?,
                None => t,
            };
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        let by_rows = matches!(s.transform, Transform::None | Transform::Cols { .. }) && shape.len() == 2;
        let block = if by_rows { (BLOCK_BYTES / 4 / shape[1].max(1)).max(1) } else { usize::MAX };
        if block < shape[0] {
            for start in (0..shape[0]).step_by(block) {
                let n = block.min(shape[0] - start);
                let d = delta.map(|d| d.narrow(0, start, n)).transpose()?;
                let x = apply(&s.transform, merged(stored.narrow(0, start, n)?, d)?, &[n, shape[1]], order);
                w.write_part(&s.plan.name, &quantize(s.plan.ty, &x, row))?;
            }
            w.end_tensor(&s.plan.name)?;
        } else {
            let x = apply(&s.transform, merged(stored, delta.cloned())?, &shape, order);
            w.write_tensor(&s.plan.name, &quantize(s.plan.ty, &x, row))?;
        }
        *report.types.entry(s.plan.ty.name()).or_default() += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    w.finish()?;
    let size = std::fs::metadata(path)?.len();
    log(&format!("wrote {} ({} tensors, {:.1} MB)", path.display(), sources.len(), size as f64 / 1e6));
    Ok(size)
}

/// An Ollama Modelfile for the model and its projector.
fn modelfile(model: &str, mmproj: &str) -> String {
    format!(
        "# Ollama: `ollama create NAME -f Modelfile` in this folder.\n\
         FROM ./{model}\n\
         FROM ./{mmproj}\n\
         TEMPLATE \"\"\"{{{{- range .Messages }}}}<|im_start|>{{{{ .Role }}}}\n\
         {{{{ .Content }}}}<|im_end|>\n\
         {{{{ end }}}}<|im_start|>assistant\n\
         \"\"\"\n\
         PARAMETER stop \"<|im_end|>\"\n\
         PARAMETER stop \"<|endoftext|>\"\n"
    )
}

fn prepare_dir(opts: &GgufOptions, files: &[String]) -> Result<()> {
    let dir = &opts.export_dir;
    if dir.exists() && !dir.is_dir() {
        bail!("{}: exists and is not a folder", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    for f in files {
        if dir.join(f).exists() && !opts.overwrite {
            bail!("{}: exists; choose a new export_dir or pass --overwrite", dir.join(f).display());
        }
    }
    Ok(())
}

/// Exports a GGUF model + projector + Modelfile (or, with `lora_only`, the adapter as a GGUF LoRA). `log` gets
/// one line per file.
pub fn export_gguf(opts: &GgufOptions, mut log: impl FnMut(&str)) -> Result<GgufReport> {
    let mt = crate::models::model_type(&opts.model_dir)?;
    if mt != "qwen3_5" {
        bail!("model_type {mt:?}: GGUF export writes Qwen3.5 (qwen3_5), llama.cpp's `qwen35` architecture");
    }
    let cfg_json = read_config_json(&opts.model_dir)?;
    let cfg = Config::from_json(&cfg_json)?;
    check(&cfg)?;
    let name =
        opts.export_dir.file_name().and_then(|n| n.to_str()).filter(|n| !n.is_empty()).unwrap_or("model").to_string();
    let order = Shapes::of(&cfg).order();
    let mut report = GgufReport::default();
    if opts.lora_only {
        return export_lora(opts, &cfg, &name, &order, report, &mut log);
    }
    let ckpt = Checkpoint::open(&opts.model_dir)?;
    let deltas = crate::export::adapter_deltas(&opts.adapters)?;
    let text = text_plan(&ckpt, &cfg, opts.quant)?;
    let vision = vision_plan(&ckpt, &cfg, opts.quant)?;
    for module in deltas.keys() {
        let w = format!("{module}.weight");
        if !text.iter().chain(&vision).any(|s| s.hf == w) {
            bail!("the adapter targets {module}, which the GGUF files do not carry (no tensor {w} is exported)");
        }
    }
    let model_file = format!("{name}-{}.gguf", opts.quant.label());
    let proj_file = format!("mmproj-{name}-{}.gguf", vision_type(opts.quant).name());
    prepare_dir(opts, &[model_file.clone(), proj_file.clone(), "Modelfile".into()])?;
    let need: u64 = text.iter().chain(&vision).map(|s| s.plan.ty.bytes(&s.plan.shape).unwrap_or(0)).sum();
    if let Some(free) = crate::sys::free_bytes(&opts.export_dir) {
        if free < need + (need >> 4) {
            bail!(
                "{}: {:.1} GB free, the GGUF files need {:.1} GB",
                opts.export_dir.display(),
                free as f64 / 1e9,
                need as f64 / 1e9
            );
        }
    }
    let mut kv = text_kv(&cfg, &cfg_json, &name, opts.quant);
    kv.extend(sampling_kv(&opts.model_dir)?);
    kv.extend(tokenizer_kv(&opts.model_dir, cfg.text.vocab_size, &cfg_json)?);
    if let Some(t) = chat_template(opts)? {
        kv.push(("tokenizer.chat_template".into(), Value::Str(t)));
    }
    let size =
        write_file(&opts.export_dir.join(&model_file), &kv, &text, &ckpt, &deltas, &order, &mut report, &mut log)?;
    report.files.push((model_file.clone(), size));
    let mut kv = vision_kv(&cfg, &opts.model_dir, &name, opts.quant)?;
    kv.extend(sampling_kv(&opts.model_dir)?);
    let size =
        write_file(&opts.export_dir.join(&proj_file), &kv, &vision, &ckpt, &deltas, &order, &mut report, &mut log)?;
    report.files.push((proj_file.clone(), size));
    if report.merged_modules != deltas.len() {
        bail!("merged {} of {} adapted modules", report.merged_modules, deltas.len());
    }
    let mf = modelfile(&model_file, &proj_file);
    std::fs::write(opts.export_dir.join("Modelfile"), &mf)?;
    report.files.push(("Modelfile".into(), mf.len() as u64));
    Ok(report)
}

/// The adapter alone, as llama.cpp's `--lora` takes it: `<base tensor>.lora_a` (A, r × in) and `.lora_b` (B,
/// out × r) with the base's value-head order, `adapter.lora.alpha` = scale·r (llama.cpp scales by alpha / r).
fn export_lora(
    opts: &GgufOptions,
    cfg: &Config,
    name: &str,
    order: &[usize],
    mut report: GgufReport,
    log: &mut dyn FnMut(&str),
) -> Result<GgufReport> {
    let [dir] = opts.adapters.as_slice() else {
        bail!("gguf-lora writes one adapter; pass exactly one --adapter_name_or_path (got {})", opts.adapters.len())
    };
    if opts.quant == Quant::Q4KM {
        bail!("export_quant q4_k_m is for models; a GGUF LoRA takes f32, bf16, f16 or q8_0");
    }
    let adapter = Adapter::load(dir, &Device::Cpu)?;
    let ckpt = Checkpoint::open(&opts.model_dir)?;
    let text = text_plan(&ckpt, cfg, Quant::F32)?;
    let mut modules: Vec<_> = adapter.weights.iter().collect();
    modules.sort_by(|a, b| a.0.cmp(b.0));
    let mut plan = Vec::new();
    let mut data = Vec::new();
    for (module, (a, b)) in modules {
        let w = format!("{module}.weight");
        let Some(base) = text.iter().find(|s| s.hf == w) else {
            bail!(
                "{}: the adapter targets {module}, which llama.cpp's LoRA cannot apply (only the language model's \
                 matrices); export the merged model with --export_format gguf instead",
                dir.display()
            );
        };
        let (a_shape, b_shape) = (a.dims().to_vec(), b.dims().to_vec());
        let mut av = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut bv = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        match &base.transform {
            Transform::Rows { start, hs } => bv = permute_rows(&bv, *start, *hs, b_shape[1], order),
            Transform::Cols { .. } => av = apply(&base.transform, av, &a_shape, order),
            _ => {}
        }
        let ty = |shape: &[usize]| weight_type(opts.quant, "", shape, None, 1, false);
        for (suffix, shape, v) in [("lora_a", a_shape, av), ("lora_b", b_shape, bv)] {
            let t = ty(&shape);
            plan.push(TensorPlan { name: format!("{}.{suffix}", base.plan.name), shape: shape.clone(), ty: t });
            data.push((quantize(t, &v, *shape.last().unwrap_or(&1)), t));
        }
    }
    let alpha = adapter.spec.scale() * adapter.spec.r as f64;
    let kv = vec![
        ("general.architecture".to_string(), Value::Str("qwen35".into())),
        ("general.type".to_string(), Value::Str("adapter".into())),
        ("general.name".to_string(), Value::Str(name.into())),
        ("general.quantization_version".to_string(), Value::U32(2)),
        ("adapter.type".to_string(), Value::Str("lora".into())),
        ("adapter.lora.alpha".to_string(), Value::F32(alpha as f32)),
    ];
    let file = format!("{name}-lora-{}.gguf", opts.quant.label());
    prepare_dir(opts, std::slice::from_ref(&file))?;
    let path = opts.export_dir.join(&file);
    let mut w = Writer::create(&path, &kv, plan.clone())?;
    for (p, (bytes, t)) in plan.iter().zip(data) {
        w.write_tensor(&p.name, &bytes)?;
        *report.types.entry(t.name()).or_default() += 1;
    }
    w.finish()?;
    let size = std::fs::metadata(&path)?.len();
    log(&format!("wrote {} ({} tensors, {:.1} MB)", path.display(), plan.len(), size as f64 / 1e6));
    report.files.push((file, size));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's tiled value-head order: with 2 key heads and 4 value heads, HF's [g0r0, g0r1, g1r0, g1r1]
    /// becomes [g0r0, g1r0, g0r1, g1r1].
    #[test]
    fn value_heads_go_from_grouped_to_tiled() {
        let sh = Shapes { nk: 2, nv: 4, kd: 1, vd: 1 };
        assert_eq!(sh.order(), vec![0, 2, 1, 3]);
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect(); // 2 leading rows, then 4 heads of 1 row × 2 cols
        let y = permute_rows(&x, 2, 1, 2, &sh.order());
        assert_eq!(y, vec![0., 1., 2., 3., 4., 5., 8., 9., 6., 7., 10., 11.]);
    }

    /// Written a few rows at a time, the files still equal what llama.cpp's converter writes (the fixture of the
    /// integration test `gguf_files_equal_what_llama_cpps_converter_writes`).
    #[test]
    fn row_blocks_write_the_converters_bytes() {
        use std::hash::Hasher;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("golden/gguf/reference.json")).unwrap()).unwrap();
        let dir = std::env::temp_dir().join(format!("ferrotune-gguf-blocks-{}", std::process::id())).join("tiny");
        let opts = GgufOptions {
            model_dir: root.join("tiny-qwen3_5"),
            adapters: vec![root.join("golden/peft/adapter")],
            export_dir: dir.clone(),
            quant: Quant::Bf16,
            lora_only: false,
            overwrite: true,
            chat_template: None,
        };
        let report = export_gguf(&opts, |_| {}).unwrap();
        let g = super::super::format::Gguf::open(&dir.join(&report.files[0].0)).unwrap();
        let want = reference["converter"]["model"]["tensors"].as_array().unwrap();
        assert_eq!(g.tensors.len(), want.len());
        for t in want {
            let name = t["name"].as_str().unwrap();
            let mut h = fnv::FnvHasher::default();
            h.write(&g.tensor_bytes(name).unwrap());
            assert_eq!(format!("{:016x}", h.finish()), t["fnv1a64"].as_str().unwrap(), "{name}");
        }
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    /// llama-quantize's Q4_K_M choice for 24 layers: Q6_K at 0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23.
    #[test]
    fn q4_k_m_gives_more_bits_to_the_layers_llama_quantize_picks() {
        let six: Vec<usize> = (0..24).filter(|&i| more_bits(i, 24)).collect();
        assert_eq!(six, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]);
        let t =
            |name: &str, row: usize, layer: usize| weight_type(Quant::Q4KM, name, &[512, row], Some(layer), 24, true);
        assert_eq!(t("blk.5.ffn_down.weight", 512, 5), GgmlType::Q6K);
        assert_eq!(t("blk.6.ffn_down.weight", 512, 6), GgmlType::Q4K);
        assert_eq!(t("blk.6.ffn_down.weight", 96, 6), GgmlType::Q5_0);
        assert_eq!(t("blk.5.attn_qkv.weight", 96, 5), GgmlType::Q8_0);
        assert_eq!(t("token_embd.weight", 512, 0), GgmlType::Q6K);
        assert_eq!(t("blk.0.ffn_up.weight", 48, 0), GgmlType::F16);
    }
}
