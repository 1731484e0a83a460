//! What `api`, `chat` and `export` share: the model and sampling flags (LLaMA-Factory's names), loading the
//! engine, and reading a YAML config file and `key=value` items as lower-priority layers under the typed flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Parser;
use ferrotune_core::chat_template::ChatTemplate;
use ferrotune_core::infer::{AdapterMode, Engine, SamplingParams};
use ferrotune_core::weights::FrozenFormat;

/// The model to load: flags as LLaMA-Factory names them (the kebab-case spelling works too).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ModelArgs {
    /// Checkpoint folder (config.json, *.safetensors, tokenizer.json, chat template, preprocessor_config.json).
    #[arg(long = "model_name_or_path", alias = "model-name-or-path", value_name = "DIR")]
    pub model_name_or_path: Option<PathBuf>,
    /// LoRA adapter folder(s), comma-separated; all are applied in order. `api` also takes NAME=DIR,NAME=DIR:
    /// each adapter served beside the others on one base, picked by a request's `model`.
    #[arg(long = "adapter_name_or_path", alias = "adapter-name-or-path", value_name = "DIR[,DIR..]")]
    pub adapter_name_or_path: Option<String>,
    /// LLaMA-Factory template to render prompts with (qwen3_5, qwen3_5_nothink, qwen2_vl, ...) when the adapter
    /// does not carry the template it was trained with (chat_template.jinja, which training writes and which always
    /// wins). Unset: the checkpoint's own chat template.
    #[arg(long)]
    pub template: Option<String>,
    /// Fold the adapters into the weights (fastest), or keep one as a separate LoRA branch.
    #[arg(long = "adapter-mode", alias = "adapter_mode", value_enum)]
    pub adapter_mode: Option<AdapterModeArg>,
    /// Compute dtype: auto (f32 on CPU, bf16 on a GPU), float32, bfloat16, float16.
    #[arg(long = "infer_dtype", alias = "infer-dtype", value_name = "DTYPE")]
    pub infer_dtype: Option<String>,
    /// 8: quantize the frozen base matrices to per-row int8 at load (CPU; a quarter of f32's memory), LoRA on
    /// top in f32, as LLaMA-Factory's `quantization_bit: 8`.
    #[arg(long = "quantization_bit", alias = "quantization-bit", value_parser = clap::value_parser!(u32).range(8..=8))]
    pub quantization_bit: Option<u32>,
    /// cpu, cuda or cuda:N (default: the first GPU when built with CUDA and one is present, else cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// Longest prompt + completion in tokens (default: the checkpoint's max_position_embeddings).
    #[arg(long = "max-model-len", alias = "max_model_len", value_name = "TOKENS")]
    pub max_model_len: Option<usize>,
    /// Images with more pixels are scaled down before the processor, as in training (LLaMA-Factory's key and
    /// default, 768×768).
    #[arg(long = "image_max_pixels", alias = "image-max-pixels", value_name = "PIXELS")]
    pub image_max_pixels: Option<u64>,
    /// Images with fewer pixels are scaled up, as in training (default 32×32).
    #[arg(long = "image_min_pixels", alias = "image-min-pixels", value_name = "PIXELS")]
    pub image_min_pixels: Option<u64>,
    /// LLaMA-Factory's backend choice; only `huggingface` (this engine) exists here.
    #[arg(long = "infer_backend", alias = "infer-backend", hide = true)]
    pub infer_backend: Option<String>,
    /// Accepted and ignored: ferrotune runs no code from checkpoints.
    #[arg(long = "trust_remote_code", alias = "trust-remote-code", hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub trust_remote_code: Option<bool>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterModeArg {
    Merge,
    Separate,
}

/// Default sampling (LLaMA-Factory's generating arguments). Unset values come from generation_config.json.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass; 1.0 disables.
    #[arg(long = "top_p", alias = "top-p")]
    pub top_p: Option<f64>,
    /// 0 disables.
    #[arg(long = "top_k", alias = "top-k")]
    pub top_k: Option<usize>,
    /// Default completion length (requests may ask for more, up to the context length).
    #[arg(long = "max_new_tokens", alias = "max-new-tokens", alias = "max-tokens")]
    pub max_new_tokens: Option<usize>,
    /// HF semantics; 1.0 disables.
    #[arg(long = "repetition_penalty", alias = "repetition-penalty")]
    pub repetition_penalty: Option<f64>,
    /// false = greedy, whatever the temperature.
    #[arg(long = "do_sample", alias = "do-sample", num_args = 0..=1, default_missing_value = "true")]
    pub do_sample: Option<bool>,
    /// Seed of the sampler, for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Default of the chat template's `enable_thinking` (unset: the template's own default).
    #[arg(long = "enable_thinking", alias = "enable-thinking", num_args = 0..=1, default_missing_value = "true")]
    pub enable_thinking: Option<bool>,
}

/// A loaded engine and what the flags decided around it.
pub struct Loaded {
    pub engine: Engine,
    /// The folder name of the checkpoint, the default served model id.
    pub model_name: String,
    pub max_model_len: usize,
    pub sampling: SamplingParams,
    pub max_new_tokens: Option<usize>,
    pub enable_thinking: Option<bool>,
    /// (image_min_pixels, image_max_pixels) of the pre-resize.
    pub pixels: (u64, u64),
}

/// The last adapter folder that carries the chat template it was trained with.
pub fn template_of_adapters(adapters: &[PathBuf]) -> Option<&Path> {
    adapters.iter().rev().find(|d| d.join("chat_template.jinja").is_file()).map(PathBuf::as_path)
}

/// A built-in template by LLaMA-Factory name as Jinja (rendering prompts as training encodes them), with a
/// description of where it comes from.
pub fn named_template(name: &str) -> Result<(String, String)> {
    let t = ferrotune_core::template::by_name(name)?;
    let source = ferrotune_core::template::to_jinja(t, &ferrotune_core::template::TemplateOptions::default());
    Ok((source, format!("built-in template `{name}`")))
}

/// Parses `a,b` into adapter folders, each of which must exist.
pub fn adapter_dirs(list: Option<&str>) -> Result<Vec<PathBuf>> {
    if named_adapters(list)?.is_some() {
        bail!(
            "--adapter_name_or_path: NAME=DIR entries serve several adapters side by side, which only `api` does; \
             pass the folder(s) alone (DIR[,DIR..]: applied in order)"
        );
    }
    let dirs: Vec<PathBuf> = entries(list).map(PathBuf::from).collect();
    for d in &dirs {
        check_adapter_dir(d)?;
    }
    Ok(dirs)
}

fn entries(list: Option<&str>) -> impl Iterator<Item = &str> {
    list.unwrap_or("").split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn check_adapter_dir(d: &Path) -> Result<()> {
    if !d.join("adapter_config.json").is_file() {
        bail!("{}: not an adapter folder (no adapter_config.json)", d.display());
    }
    Ok(())
}

/// Whether a name can be a served model id: letters, digits and `-_.:/`.
pub fn valid_adapter_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
}

/// Parses `name=DIR,name2=DIR2` (adapters served by name side by side): None when the list has no names.
pub fn named_adapters(list: Option<&str>) -> Result<Option<Vec<(String, PathBuf)>>> {
    let items: Vec<&str> = entries(list).collect();
    if !items.iter().any(|i| i.contains('=')) {
        return Ok(None);
    }
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for item in items {
        let Some((name, dir)) = item.split_once('=') else {
            bail!(
                "--adapter_name_or_path: `{item}` has no name while others do; name every adapter (NAME=DIR,NAME=DIR) \
                 to serve them side by side, or none to apply them in order"
            )
        };
        let (name, dir) = (name.trim(), PathBuf::from(dir.trim()));
        if !valid_adapter_name(name) {
            bail!("--adapter_name_or_path: adapter name {name:?} must be letters, digits and -_.:/ (NAME=DIR)");
        }
        if out.iter().any(|(n, _)| n == name) {
            bail!("--adapter_name_or_path: the name `{name}` is given twice; each adapter needs its own");
        }
        check_adapter_dir(&dir)?;
        out.push((name.to_string(), dir));
    }
    Ok(Some(out))
}

fn device(spec: Option<&str>) -> Result<Device> {
    ferrotune_core::device::parse_device(spec.unwrap_or("auto"))
}

/// Loads base + adapters as the flags say, with the chat template used in training when an adapter has one.
pub fn load_engine(m: &ModelArgs, s: &SamplingArgs) -> Result<Loaded> {
    let Some(model_dir) = m.model_name_or_path.as_deref() else {
        bail!("no model: pass --model_name_or_path DIR (or `model_name_or_path:` in the YAML file)")
    };
    if let Some(b) = m.infer_backend.as_deref() {
        if !matches!(b, "huggingface" | "hf" | "ferrotune") {
            bail!("infer_backend {b:?}: ferrotune has one engine of its own; remove the key");
        }
    }
    let named = named_adapters(m.adapter_name_or_path.as_deref())?.unwrap_or_default();
    let adapters = if named.is_empty() { adapter_dirs(m.adapter_name_or_path.as_deref())? } else { vec![] };
    let dev = device(m.device.as_deref())?;
    super::threads_for_checkpoint(model_dir);
    let asked = ferrotune_core::export::parse_dtype(m.infer_dtype.as_deref().unwrap_or("auto"))?;
    let dtype = match (asked, &dev) {
        (_, Device::Cpu) => DType::F32, // bf16 arithmetic on CPUs is slower than f32, and less exact
        (Some(d), _) => d,
        (None, _) => DType::BF16,
    };
    // On the CPU a bf16 checkpoint stays as stored and multiplies in bf16 (as PyTorch's bf16 does) unless
    // float32 is asked for.
    let format = match m.quantization_bit {
        Some(_) => FrozenFormat::Int8,
        None if dev.is_cpu() && asked != Some(DType::F32) => FrozenFormat::Bf16,
        None => FrozenFormat::Compute,
    };
    let mode = match m.adapter_mode {
        Some(AdapterModeArg::Separate) => AdapterMode::Separate,
        _ => AdapterMode::Merge,
    };
    let started = std::time::Instant::now();
    let refs: Vec<&Path> = adapters.iter().map(PathBuf::as_path).collect();
    let mut engine = Engine::load_as(model_dir, &refs, mode, dtype, &dev, format)?;
    // The engine renders with the template the adapter was trained with when the adapter folder carries one;
    // else a template named by --template (LLaMA-Factory's, rendered as training renders it); else the
    // checkpoint's own.
    match (m.template.as_deref(), template_of_adapters(&adapters)) {
        (Some(name), Some(dir)) => eprintln!(
            "note: --template {name} is not used: {} holds the chat template the adapter was trained with",
            dir.display()
        ),
        (Some(name), None) => {
            let (source, origin) = named_template(name)?;
            engine.template = ChatTemplate::new(source, PathBuf::from(origin))?;
        }
        (None, _) => {}
    }
    for (name, dir) in &named {
        let a = engine.load_adapter(name, dir)?;
        eprintln!(
            "adapter `{name}`: {} modules, rank {}, {:.1} MB ({}{})",
            a.weights.modules.len(),
            a.rank,
            a.bytes as f64 / 1e6,
            dir.display(),
            if a.template.is_some() { "; with its chat template" } else { "" }
        );
        engine.add_adapter(a)?;
    }
    eprintln!(
        "loaded {}{} ({:?}, {:?}) in {:.1}s; chat template: {}",
        model_dir.display(),
        adapters.iter().map(|a| format!(" + {}", a.display())).collect::<String>(),
        dev.location(),
        dtype,
        started.elapsed().as_secs_f64(),
        engine.template.path.display()
    );
    let enable_thinking = s.enable_thinking;
    let cfg = ferrotune_core::weights::read_config_json(model_dir)?;
    let ctx = cfg
        .get("text_config")
        .and_then(|t| t.get("max_position_embeddings"))
        .or_else(|| cfg.get("max_position_embeddings"))
        .and_then(|v| v.as_u64())
        .unwrap_or(32768) as usize;
    let max_model_len = m.max_model_len.unwrap_or(ctx);
    if max_model_len == 0 {
        bail!("--max-model-len must be positive");
    }
    let mut sampling = engine.generation.default_sampling();
    if let Some(t) = s.temperature {
        sampling.temperature = t;
    }
    if let Some(p) = s.top_p {
        sampling.top_p = p;
    }
    if let Some(k) = s.top_k {
        sampling.top_k = k;
    }
    if let Some(r) = s.repetition_penalty {
        sampling.repetition_penalty = r;
    }
    if s.do_sample == Some(false) {
        sampling.temperature = 0.0;
    } else if s.do_sample == Some(true) && sampling.temperature == 0.0 {
        sampling.temperature = engine.generation.temperature.unwrap_or(1.0);
    }
    sampling.seed = s.seed;
    let model_name = model_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_else(|| model_dir.display().to_string());
    let pixels = (
        m.image_min_pixels.unwrap_or(crate::server::DEFAULT_MIN_PIXELS),
        m.image_max_pixels.unwrap_or(crate::server::DEFAULT_MAX_PIXELS),
    );
    if pixels.0 == 0 || pixels.0 > pixels.1 {
        bail!("image_min_pixels ({}) must be positive and at most image_max_pixels ({})", pixels.0, pixels.1);
    }
    Ok(Loaded {
        engine,
        model_name,
        max_model_len,
        sampling,
        max_new_tokens: s.max_new_tokens,
        enable_thinking,
        pixels,
    })
}

/// A YAML value as the text of a flag value; lists become comma-separated (LLaMA-Factory's adapter lists).
fn yaml_flag_value(key: &str, v: &serde_yaml_ng::Value, file: &str) -> Result<Option<String>> {
    use serde_yaml_ng::Value as Y;
    Ok(match v {
        Y::Null => None,
        Y::Bool(b) => Some(b.to_string()),
        Y::Number(n) => Some(n.to_string()),
        Y::String(s) => Some(s.clone()),
        Y::Sequence(items) => {
            let parts: Vec<String> = items
                .iter()
                .map(|x| match x {
                    Y::String(s) => Ok(s.clone()),
                    Y::Number(n) => Ok(n.to_string()),
                    _ => bail!("{file}: `{key}`: a list may only hold strings"),
                })
                .collect::<Result<_>>()?;
            Some(parts.join(","))
        }
        // `adapter_name_or_path: {robots: DIR, docs: DIR}`: adapters served by name.
        Y::Mapping(m) if key == "adapter_name_or_path" => {
            let parts: Vec<String> = m
                .iter()
                .map(|(k, v)| match (k, v) {
                    (Y::String(k), Y::String(v)) => Ok(format!("{k}={v}")),
                    _ => bail!("{file}: `{key}`: each entry is `NAME: DIR`"),
                })
                .collect::<Result<_>>()?;
            Some(parts.join(","))
        }
        _ => bail!("{file}: `{key}` must be a string, number, boolean or list"),
    })
}

/// Re-parses a command's flags with lower-priority layers in front of those typed: environment fallbacks
/// (`env`: variable → flag), then the YAML file and `key=value` items among `positionals`. Flags keep their
/// last occurrence, so typed flags win over the file, and the file over the environment. Returns `None` when
/// there is nothing to layer.
pub fn layered<P: Parser>(sub: &str, positionals: &[String], env: &[(&str, &str)]) -> Result<Option<P>> {
    let cmd = P::command();
    let mut known: BTreeMap<String, String> = BTreeMap::new();
    for arg in cmd.get_arguments() {
        if let Some(long) = arg.get_long() {
            known.insert(long.replace('-', "_"), long.to_string());
            for alias in arg.get_all_aliases().unwrap_or_default() {
                known.insert(alias.replace('-', "_"), long.to_string());
            }
        }
    }
    let flag = |key: &str, origin: &str| -> Result<String> {
        let norm = key.replace('-', "_");
        if let Some(long) = known.get(&norm) {
            return Ok(long.clone());
        }
        let hint = ferrotune_core::suggest::hint(&norm, known.keys().map(String::as_str));
        let hint = if hint.is_empty() { hint } else { format!("; {hint}") };
        bail!("{origin}: unknown key `{key}` for `ferrotune {sub}`{hint} (see `ferrotune {sub} --help`)")
    };
    let mut layers: Vec<String> = Vec::new();
    for (var, key) in env {
        if let Ok(v) = std::env::var(var) {
            if !v.is_empty() {
                layers.push(format!("--{}={v}", flag(key, var)?));
            }
        }
    }
    for p in positionals {
        if let Some((k, v)) = p.split_once('=').filter(|(k, _)| !k.contains('/') && !k.is_empty()) {
            layers.push(format!("--{}={v}", flag(k, p)?));
            continue;
        }
        let text = std::fs::read_to_string(p).with_context(|| format!("{p}: cannot read the config file"))?;
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).map_err(|e| match e.location() {
            Some(l) => anyhow::anyhow!("{p}:{}:{}: invalid YAML: {e}", l.line(), l.column()),
            None => anyhow::anyhow!("{p}: invalid YAML: {e}"),
        })?;
        let map = match doc {
            serde_yaml_ng::Value::Mapping(m) => m,
            serde_yaml_ng::Value::Null => Default::default(),
            _ => bail!("{p}: expected `key: value` lines at the top level"),
        };
        for (k, v) in map {
            let Some(k) = k.as_str() else { bail!("{p}: keys must be strings") };
            if let Some(v) = yaml_flag_value(k, &v, p)? {
                layers.push(format!("--{}={v}", flag(k, p)?));
            }
        }
    }
    if layers.is_empty() {
        return Ok(None);
    }
    let typed: Vec<String> = std::env::args().skip(1).skip_while(|a| a != sub).skip(1).collect();
    let argv = std::iter::once(format!("ferrotune {sub}")).chain(layers).chain(typed);
    P::try_parse_from(argv).map(Some).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
}
