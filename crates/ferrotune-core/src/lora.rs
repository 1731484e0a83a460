//! LoRA adapters with PEFT's semantics and file format.
//!
//! - Targets: a list of module names matched as PEFT does (equal to the module path or a suffix after a dot,
//!   so both `q_proj` and `model.language_model.layers.3.self_attn.q_proj` work), or a regex string that
//!   must match the whole path.
//! - Init: A Kaiming-uniform (a = √5, i.e. U(±1/√in)), B zero; scale alpha/r, or alpha/√r with rsLoRA.
//! - Files: `adapter_model.safetensors` with keys `base_model.model.<module path>.lora_{A,B}.weight` (f32) and
//!   `adapter_config.json` as PEFT's `LoraConfig.to_dict()` writes it.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::nn::{Linear, Lora};

/// Which modules get an adapter.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Module names: a full path, or a suffix matched at a dot boundary.
    Modules(Vec<String>),
    /// A regular expression that must match the whole module path (PEFT's string form).
    Regex(String),
}

impl Targets {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Targets::Modules(list) => list
                .iter()
                .any(|t| path == t || (path.ends_with(t.as_str()) && path[..path.len() - t.len()].ends_with('.'))),
            Targets::Regex(re) => regex_full_match(re, path),
        }
    }
}

fn regex_full_match(re: &str, text: &str) -> bool {
    match regex::Regex::new(&format!("^(?:{re})$")) {
        Ok(r) => r.is_match(text),
        Err(_) => false,
    }
}

/// Every linear of the Qwen3.5 decoder, both layer kinds: what `lora_target: all` means while the vision tower
/// is frozen (never lm_head).
pub const ALL_DECODER_LINEARS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "in_proj_qkv",
    "in_proj_z",
    "in_proj_b",
    "in_proj_a",
    "out_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The vision blocks' linears, which `lora_target: all` adds when the vision tower is not frozen. As in
/// LLaMA-Factory, whose `all` collects linear names outside the merger and then matches them anywhere, these names
/// also reach the merger's `linear_fc1`/`linear_fc2` when the projector is not frozen either.
pub const VISION_LINEARS: &[&str] = &["qkv", "proj", "linear_fc1", "linear_fc2"];

#[derive(Clone, Debug)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub use_rslora: bool,
    pub targets: Targets,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        scale(self.alpha, self.r, self.use_rslora)
    }
}

/// PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA.
pub fn scale(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// How to initialise new adapters.
pub enum Init<'a> {
    /// PEFT's default: A Kaiming-uniform from a seeded RNG, B zero.
    Default { seed: u64 },
    /// Exact tensors by PEFT key (e.g. a fixed init shared with a reference run).
    From(&'a HashMap<String, Tensor>),
}

/// PEFT's key for a module's adapter matrix.
pub fn peft_key(module: &str, which: &str) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// Attaches adapters to every `(path, linear)` whose path matches. Returns the adapted paths in order.
/// Adapter matrices are f32 `Var`s on `device`.
pub fn attach(
    linears: Vec<(String, &mut Linear)>,
    spec: &LoraSpec,
    init: &Init,
    device: &Device,
) -> Result<Vec<String>> {
    let mut rng = match init {
        Init::Default { seed } => Some(rand::rngs::StdRng::seed_from_u64(*seed)),
        Init::From(_) => None,
    };
    let mut done = Vec::new();
    for (path, lin) in linears {
        if !spec.targets.matches(&path) {
            continue;
        }
        let (out_dim, in_dim) = (lin.out_dim(), lin.in_dim());
        let (a, b) = match (init, rng.as_mut()) {
            (Init::From(map), _) => {
                let get = |w: &str| -> Result<Tensor> {
                    let key = peft_key(&path, w);
                    let t = map.get(&key).with_context(|| format!("LoRA init has no tensor {key}"))?;
                    Ok(t.to_dtype(DType::F32)?.to_device(device)?)
                };
                (get("A")?, get("B")?)
            }
            (Init::Default { .. }, Some(rng)) => {
                let bound = 1.0 / (in_dim as f32).sqrt();
                let a: Vec<f32> = (0..spec.r * in_dim).map(|_| rng.random_range(-bound..bound)).collect();
                (Tensor::from_vec(a, (spec.r, in_dim), device)?, Tensor::zeros((out_dim, spec.r), DType::F32, device)?)
            }
            (Init::Default { .. }, None) => unreachable!("the RNG exists for default init"),
        };
        if a.dims() != [spec.r, in_dim] || b.dims() != [out_dim, spec.r] {
            bail!(
                "LoRA init for {path}: A {:?} / B {:?}, expected [{}, {in_dim}] / [{out_dim}, {}]",
                a.dims(),
                b.dims(),
                spec.r,
                spec.r
            );
        }
        lin.lora = Some(Lora {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale: spec.scale(),
            dropout: spec.dropout,
            bt: None,
        });
        done.push(path);
    }
    Ok(done)
}

/// The adapter tensors of `linears` by PEFT key (what `adapter_model.safetensors` holds).
pub fn adapter_tensors(linears: Vec<(String, &mut Linear)>) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (path, lin) in linears {
        if let Some(l) = &lin.lora {
            out.insert(peft_key(&path, "A"), l.a.as_tensor().to_device(&Device::Cpu)?.contiguous()?);
            out.insert(peft_key(&path, "B"), l.b.as_tensor().to_device(&Device::Cpu)?.contiguous()?);
        }
    }
    Ok(out)
}

/// The trainable variables of the adapters on `linears` (A then B of each adapted module, in module order), by
/// PEFT key: what the optimizer steps and the gradient checks compare.
pub fn trainable_vars(linears: Vec<(String, &mut Linear)>) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for (path, lin) in linears {
        if let Some(l) = &lin.lora {
            out.push((peft_key(&path, "A"), l.a.clone()));
            out.push((peft_key(&path, "B"), l.b.clone()));
        }
    }
    out
}

/// `adapter_config.json` exactly as PEFT writes it for a LoRA on a causal LM.
pub fn adapter_config_json(spec: &LoraSpec, modules: &[String], base_model: &str) -> serde_json::Value {
    let mut targets: Vec<&String> = modules.iter().collect();
    targets.sort();
    targets.dedup();
    serde_json::json!({
        "alora_invocation_tokens": null,
        "alpha_pattern": {},
        "arrow_config": null,
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "corda_config": null,
        "ensure_weight_tying": false,
        "eva_config": null,
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        // PEFT stores an integral alpha as an int.
        "lora_alpha": if spec.alpha.fract() == 0.0 { serde_json::json!(spec.alpha as i64) } else { serde_json::json!(spec.alpha) },
        "lora_bias": false,
        "lora_dropout": spec.dropout,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "peft_type": "LORA",
        "peft_version": "0.18.1",
        "qalora_group_size": 16,
        "r": spec.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "target_parameters": null,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": null,
        "use_dora": false,
        "use_qalora": false,
        "use_rslora": spec.use_rslora
    })
}

/// A PEFT LoRA adapter read from disk (ours, PEFT's or LLaMA-Factory's).
pub struct Adapter {
    pub spec: LoraSpec,
    /// module path -> (A [r, in], B [out, r]) in f32.
    pub weights: HashMap<String, (Tensor, Tensor)>,
    pub base_model: Option<String>,
}

impl Adapter {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).with_context(|| {
            format!(
                "{}: cannot read; an adapter folder holds adapter_config.json and adapter_model.safetensors",
                cfg_path.display()
            )
        })?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}:{}:{}: invalid JSON: {e}", cfg_path.display(), e.line(), e.column()))?;
        let peft_type = cfg.get("peft_type").and_then(|v| v.as_str()).unwrap_or("LORA");
        if peft_type != "LORA" {
            bail!("{}: peft_type {peft_type:?} is not supported (only LORA)", cfg_path.display());
        }
        for (key, what) in [("use_dora", "DoRA"), ("modules_to_save", "modules_to_save")] {
            let v = cfg.get(key);
            let on = match v {
                Some(serde_json::Value::Bool(b)) => *b,
                Some(serde_json::Value::Null) | None => false,
                Some(serde_json::Value::Array(a)) => !a.is_empty(),
                Some(_) => true,
            };
            if on {
                bail!("{}: {what} adapters are not supported yet ({key} is set)", cfg_path.display());
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if cfg.get(key).and_then(|v| v.as_object()).is_some_and(|o| !o.is_empty()) {
                bail!("{}: per-module {key} is not supported yet", cfg_path.display());
            }
        }
        let r = cfg.get("r").and_then(|v| v.as_u64()).context("adapter_config.json: no integer `r`")? as usize;
        let alpha = cfg.get("lora_alpha").and_then(|v| v.as_f64()).unwrap_or(8.0);
        let targets = match cfg.get("target_modules") {
            Some(serde_json::Value::String(s)) => Targets::Regex(s.clone()),
            Some(serde_json::Value::Array(a)) => {
                Targets::Modules(a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
            }
            _ => Targets::Modules(vec![]),
        };
        let spec = LoraSpec {
            r,
            alpha,
            dropout: cfg.get("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0) as f32,
            use_rslora: cfg.get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false),
            targets,
        };
        let st_path = dir.join("adapter_model.safetensors");
        if !st_path.exists() {
            bail!(
                "{}: missing; ferrotune reads safetensors adapters (PEFT ≥ 0.7 writes them by default)",
                st_path.display()
            );
        }
        let tensors = candle_core::safetensors::load(&st_path, device)
            .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", st_path.display()))?;
        let mut pairs: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (key, t) in tensors {
            let Some(rest) = key.strip_prefix("base_model.model.") else {
                bail!("{}: unexpected tensor {key} (PEFT keys start with base_model.model.)", st_path.display())
            };
            let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else {
                bail!("{}: unsupported adapter tensor {key} (only lora_A / lora_B weights)", st_path.display())
            };
            let module = normalize_module_path(module);
            let e = pairs.entry(module).or_default();
            let t = t.to_dtype(DType::F32)?;
            if which == 0 {
                e.0 = Some(t)
            } else {
                e.1 = Some(t)
            }
        }
        let mut weights = HashMap::new();
        for (m, (a, b)) in pairs {
            match (a, b) {
                (Some(a), Some(b)) => {
                    weights.insert(m, (a, b));
                }
                _ => bail!("{}: module {m} has only one of lora_A / lora_B", st_path.display()),
            }
        }
        let base_model = cfg.get("base_model_name_or_path").and_then(|v| v.as_str()).map(str::to_owned);
        Ok(Self { spec, weights, base_model })
    }

    /// Every module the adapter adapts exists (`dims`: a module's (in, out) features, None when the model has
    /// no such module) with the adapter's shapes.
    pub fn check_fits(&self, dims: impl Fn(&str) -> Option<(usize, usize)>) -> Result<()> {
        for (module, (a, b)) in &self.weights {
            let Some((inp, out)) = dims(module) else {
                bail!("the adapter targets {module}, which this model does not have (was it trained on another model?)")
            };
            if a.dim(1)? != inp || b.dim(0)? != out || a.dim(0)? != b.dim(1)? {
                bail!(
                    "adapter for {module}: A {:?} / B {:?} do not fit the module's weight [{out}, {inp}]",
                    a.dims(),
                    b.dims()
                );
            }
        }
        Ok(())
    }

    /// Applies the adapter to `linears`: either merged into the base weight (`W += scale·B·A`, in f32, cast back
    /// to W's dtype) or kept as a separate (non-trainable) LoRA branch. Every adapter module must exist.
    pub fn apply(&self, linears: Vec<(String, &mut Linear)>, merge: bool) -> Result<usize> {
        let mut by_path: HashMap<String, &mut Linear> = linears.into_iter().collect();
        let scale = self.spec.scale();
        self.check_fits(|m| by_path.get(m).map(|l| (l.in_dim(), l.out_dim())))?;
        for (module, (a, b)) in &self.weights {
            let lin = by_path.get_mut(module).expect("checked above");
            let dev = lin.weight.device().clone();
            let (a, b) = (a.to_device(&dev)?, b.to_device(&dev)?);
            if merge {
                let delta = (b.matmul(&a)? * scale)?;
                let merged = (lin.weight.to_f32()? + delta)?;
                // A 16-bit or int8 weight kept compact on the CPU computes in f32 anyway: rounding the merged
                // weight back would only lose the adapter's small updates.
                let compact = lin.weight.scales.is_some() || matches!(lin.weight.dtype(), DType::BF16 | DType::F16);
                let w = if dev.is_cpu() && compact { merged } else { merged.to_dtype(lin.weight.dtype())? };
                lin.weight.tensor = w;
                lin.weight.scales = None;
            } else {
                // Served, not trained: decoding rows multiply with Bᵀ.
                let bt = Some(b.t()?.contiguous()?);
                lin.lora = Some(Lora { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)?, scale, dropout: 0.0, bt });
            }
        }
        Ok(self.weights.len())
    }
}

/// Older Qwen-VL exports keep the decoder at `model.layers.*`; transformers maps them under `language_model`.
fn normalize_module_path(m: &str) -> String {
    if let Some(rest) = m.strip_prefix("model.layers.") {
        format!("model.language_model.layers.{rest}")
    } else {
        m.to_string()
    }
}
