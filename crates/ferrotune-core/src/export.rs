//! `ferrotune export`: one or more LoRA adapters merged into the base weights, written as a complete checkpoint
//! that transformers, vLLM and ferrotune load as they are.
//!
//! - Every tensor of the base is carried over (also those no loader uses, such as `mtp.*`), with
//!   `W + Σ scale·B·A` in f32 for each adapted module, cast once to the output dtype.
//! - Shards of at most `shard_bytes` (`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`),
//!   or one `model.safetensors` when everything fits.
//! - `config.json` (dtype updated), `generation_config.json`, tokenizer and processor files, and the chat
//!   template used in training: an adapter folder's own `chat_template.jinja` wins over the base's.
//! - Everything is written into a staging folder next to the target and moved into place at the end, so an
//!   interrupted export never leaves a half-written checkpoint under the final name.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::device::dtype_name;
use crate::lora::Adapter;
use crate::weights::{read_config_json, save_safetensors, Checkpoint, TOKENIZER_FILES};

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub model_dir: PathBuf,
    /// Merged in order (the sum does not depend on it; the chat template of the last one that has one wins).
    pub adapters: Vec<PathBuf>,
    pub export_dir: PathBuf,
    /// Largest shard in bytes (LLaMA-Factory's `export_size` is in GB = 10⁹ bytes).
    pub shard_bytes: u64,
    /// `None` keeps every tensor in the dtype it is stored in.
    pub dtype: Option<DType>,
    /// Allow writing into a non-empty `export_dir` (only the files of a checkpoint are replaced).
    pub overwrite: bool,
    /// A chat template to write when no adapter carries one (e.g. a built-in template named in the config), with
    /// where it comes from.
    pub chat_template: Option<(String, String)>,
}

#[derive(Clone, Debug)]
pub struct ExportReport {
    pub tensors: usize,
    /// Modules whose weight received at least one adapter.
    pub merged_modules: usize,
    /// Shard file names with their sizes in bytes.
    pub shards: Vec<(String, u64)>,
    /// The other files written (config, tokenizer, processor, template).
    pub files: Vec<String>,
    /// Where the chat template came from.
    pub template_from: Option<String>,
    /// The dtype written into config.json.
    pub dtype: String,
}

/// `infer_dtype` as LLaMA-Factory spells it; `auto` (None) keeps the stored dtypes.
pub fn parse_dtype(s: &str) -> Result<Option<DType>> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "auto" => None,
        "float32" | "fp32" | "f32" => Some(DType::F32),
        "bfloat16" | "bf16" => Some(DType::BF16),
        "float16" | "fp16" | "f16" | "half" => Some(DType::F16),
        other => bail!("infer_dtype {other:?} is not one of auto, float32, bfloat16, float16"),
    })
}

fn is_float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::BF16 | DType::F16 | DType::F64)
}

/// Compares checkpoint keys with numbers in numeric order, so `layers.2` comes before `layers.10`.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    let mut ia = a.split('.');
    let mut ib = b.split('.');
    loop {
        match (ia.next(), ib.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let o = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(p), Ok(q)) => p.cmp(&q),
                    _ => x.cmp(y),
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
        }
    }
}

/// One tensor of the output: its name, stored dtype, output dtype and shape.
struct Planned {
    name: String,
    out: DType,
    bytes: u64,
}

/// Groups tensors into shards of at most `limit` bytes (a tensor larger than the limit gets its own shard).
fn plan_shards(tensors: &[Planned], limit: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        match shards.last_mut() {
            Some(cur) if size + t.bytes <= limit => {
                cur.push(i);
                size += t.bytes;
            }
            _ => {
                shards.push(vec![i]);
                size = t.bytes;
            }
        }
    }
    shards
}

/// The sum of the adapters' `scale·B·A` per module path, in f32.
pub(crate) fn adapter_deltas(adapters: &[PathBuf]) -> Result<HashMap<String, Tensor>> {
    let mut deltas: HashMap<String, Tensor> = HashMap::new();
    for dir in adapters {
        let a = Adapter::load(dir, &Device::Cpu)?;
        let scale = a.spec.scale();
        for (module, (la, lb)) in &a.weights {
            let d = (lb.matmul(la).with_context(|| format!("{}: adapter for {module}", dir.display()))? * scale)?;
            let sum = match deltas.remove(module) {
                Some(prev) => {
                    if prev.dims() != d.dims() {
                        bail!(
                            "{}: the adapter for {module} has shape {:?}, an earlier adapter {:?}",
                            dir.display(),
                            d.dims(),
                            prev.dims()
                        );
                    }
                    (prev + d)?
                }
                None => d,
            };
            deltas.insert(module.clone(), sum);
        }
    }
    Ok(deltas)
}

/// Refuses a non-empty target unless `overwrite`; returns the staging folder (empty, next to the target).
fn prepare_dirs(opts: &ExportOptions) -> Result<PathBuf> {
    let dir = &opts.export_dir;
    let model_dir =
        opts.model_dir.canonicalize().with_context(|| format!("{}: not found", opts.model_dir.display()))?;
    if let Ok(target) = dir.canonicalize() {
        if target == model_dir || opts.adapters.iter().any(|a| a.canonicalize().ok().as_ref() == Some(&target)) {
            bail!("{}: export_dir is an input folder; choose a new folder", dir.display());
        }
    }
    if dir.exists() {
        if !dir.is_dir() {
            bail!("{}: exists and is not a folder", dir.display());
        }
        let non_empty =
            std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?.next().is_some();
        if non_empty && !opts.overwrite {
            bail!("{}: the folder is not empty; choose a new export_dir or pass --overwrite", dir.display());
        }
    }
    let name =
        dir.file_name().and_then(|n| n.to_str()).with_context(|| format!("{}: no folder name", dir.display()))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    let staging = parent.join(format!(".{name}.export-tmp-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("{}: cannot remove", staging.display()))?;
    }
    std::fs::create_dir(&staging).with_context(|| format!("{}: cannot create", staging.display()))?;
    Ok(staging)
}

/// Is `name` a file a checkpoint export writes (and so may replace with --overwrite)?
fn is_checkpoint_file(name: &str) -> bool {
    name == "config.json"
        || name == "model.safetensors.index.json"
        || (name.starts_with("model") && name.ends_with(".safetensors"))
        || TOKENIZER_FILES.contains(&name)
}

/// Moves the staged files into `export_dir`: a rename of the whole folder when the target does not exist,
/// else file by file after removing the old checkpoint's files (stale shards of another count included).
fn commit(staging: &Path, dir: &Path) -> Result<()> {
    if !dir.exists() {
        return std::fs::rename(staging, dir)
            .with_context(|| format!("moving {} to {}", staging.display(), dir.display()));
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if entry.file_type()?.is_file() && is_checkpoint_file(&name) {
            std::fs::remove_file(entry.path()).with_context(|| format!("{}: cannot remove", entry.path().display()))?;
        }
    }
    for entry in std::fs::read_dir(staging)? {
        let entry = entry?;
        let to = dir.join(entry.file_name());
        std::fs::rename(entry.path(), &to).with_context(|| format!("{}: cannot move into place", to.display()))?;
    }
    std::fs::remove_dir(staging).with_context(|| format!("{}: cannot remove", staging.display()))?;
    Ok(())
}

/// Sets the dtype in config.json wherever transformers records it (`dtype`, older `torch_dtype`, also in the
/// sub-configs).
fn set_config_dtype(cfg: &mut serde_json::Value, name: &str) {
    if let Some(obj) = cfg.as_object_mut() {
        let mut had = false;
        for key in ["dtype", "torch_dtype"] {
            if obj.contains_key(key) {
                obj.insert(key.into(), name.into());
                had = true;
            }
        }
        if !had {
            obj.insert("dtype".into(), name.into());
        }
        for (k, v) in obj.iter_mut() {
            if k.ends_with("_config") {
                if let Some(sub) = v.as_object_mut() {
                    for key in ["dtype", "torch_dtype"] {
                        if sub.contains_key(key) {
                            sub.insert(key.into(), name.into());
                        }
                    }
                }
            }
        }
    }
}

/// Merges the adapters into the base and writes the checkpoint. `log` receives one line per step.
pub fn export(opts: &ExportOptions, mut log: impl FnMut(&str)) -> Result<ExportReport> {
    crate::models::model_type(&opts.model_dir)?;
    if opts.shard_bytes == 0 {
        bail!("export_size must be positive");
    }
    let ckpt = Checkpoint::open(&opts.model_dir)?;
    let deltas = adapter_deltas(&opts.adapters)?;

    // Every adapted module must exist as `<module>.weight` with the delta's shape.
    for (module, d) in &deltas {
        let key = format!("{module}.weight");
        match ckpt.info(&key) {
            Some((shape, _)) if shape == d.dims() => {}
            Some((shape, _)) => bail!(
                "the adapter for {module} has shape {:?}, the base weight {key} has {shape:?}; \
                 was the adapter trained on another model?",
                d.dims()
            ),
            None => bail!(
                "the adapter targets {module}, but the base has no tensor {key}; was it trained on another model?"
            ),
        }
    }

    // Output dtypes. Tensors a lower-precision base keeps in f32 on purpose (e.g. `A_log`) stay f32.
    let mut names: Vec<String> = ckpt.names().into_iter().map(str::to_owned).collect();
    names.sort_by(|a, b| natural_cmp(a, b));
    let mut count_by_dtype: BTreeMap<&'static str, usize> = BTreeMap::new();
    let infos: Vec<(Vec<usize>, DType)> = names
        .iter()
        .map(|n| ckpt.info(n).with_context(|| format!("{}: unreadable tensor {n}", opts.model_dir.display())))
        .collect::<Result<_>>()?;
    for (_, d) in &infos {
        if is_float(*d) {
            *count_by_dtype.entry(dtype_name(*d)).or_default() += 1;
        }
    }
    let main_dtype_name = count_by_dtype.iter().max_by_key(|(_, c)| **c).map(|(n, _)| *n).unwrap_or("float32");
    let planned: Vec<Planned> = names
        .iter()
        .zip(&infos)
        .map(|(name, (shape, stored))| {
            let out = match opts.dtype {
                Some(d) if is_float(*stored) && !(*stored == DType::F32 && main_dtype_name != "float32") => d,
                _ => *stored,
            };
            let bytes = shape.iter().product::<usize>() as u64 * out.size_in_bytes() as u64;
            Planned { name: name.clone(), out, bytes }
        })
        .collect();
    let out_dtype_name = opts.dtype.map(dtype_name).unwrap_or(main_dtype_name).to_string();

    let staging = prepare_dirs(opts)?;
    let result = (|| -> Result<ExportReport> {
        let shards = plan_shards(&planned, opts.shard_bytes);
        let n = shards.len();
        let mut weight_map = serde_json::Map::new();
        let mut shard_report = Vec::new();
        let total: u64 = planned.iter().map(|t| t.bytes).sum();
        let mut merged = 0usize;
        for (si, members) in shards.iter().enumerate() {
            let file = if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", si + 1, n)
            };
            let mut tensors = HashMap::new();
            let mut bytes = 0u64;
            for &i in members {
                let p = &planned[i];
                let t = ckpt.load(&p.name, &Device::Cpu)?;
                let module = p.name.strip_suffix(".weight");
                let t = match module.and_then(|m| deltas.get(m)) {
                    Some(d) => {
                        merged += 1;
                        (t.to_dtype(DType::F32)? + d)?.to_dtype(p.out)?
                    }
                    None if t.dtype() != p.out => t.to_dtype(p.out)?,
                    None => t,
                };
                bytes += p.bytes;
                weight_map.insert(p.name.clone(), file.clone().into());
                tensors.insert(p.name.clone(), t);
            }
            save_safetensors(&tensors, &staging.join(&file))?;
            // The writer's temporary file is private (0600); a model folder is for everyone who may read it.
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(staging.join(&file), std::fs::Permissions::from_mode(0o644))?;
            }
            log(&format!("wrote {file} ({} tensors, {:.1} MB)", members.len(), bytes as f64 / 1e6));
            shard_report.push((file, bytes));
        }
        if merged != deltas.len() {
            bail!("merged {merged} of {} adapted modules", deltas.len());
        }
        let mut files = Vec::new();
        if n > 1 {
            let index = serde_json::json!({
                "metadata": {
                    "total_parameters": planned.iter().map(|t| t.bytes / t.out.size_in_bytes() as u64).sum::<u64>(),
                    "total_size": total,
                },
                "weight_map": weight_map,
            });
            std::fs::write(staging.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
            files.push("model.safetensors.index.json".to_string());
        }

        let mut cfg = read_config_json(&opts.model_dir)?;
        if opts.dtype.is_some() {
            set_config_dtype(&mut cfg, &out_dtype_name);
        }
        std::fs::write(staging.join("config.json"), serde_json::to_string_pretty(&cfg)? + "\n")?;
        files.push("config.json".to_string());

        // Tokenizer, processor and generation files of the base...
        for name in TOKENIZER_FILES {
            let src = opts.model_dir.join(name);
            if src.is_file() {
                std::fs::copy(&src, staging.join(name)).with_context(|| format!("copying {}", src.display()))?;
                files.push(name.to_string());
            }
        }
        // ...and the chat template used in training: the one training wrote next to the adapter, else the one
        // the caller names. It replaces any template inside tokenizer_config.json or chat_template.json, which
        // would compete with it.
        let mut template_from =
            opts.model_dir.join("chat_template.jinja").is_file().then(|| opts.model_dir.display().to_string());
        let chosen = match opts.adapters.iter().rev().find(|d| d.join("chat_template.jinja").is_file()) {
            Some(dir) => Some((std::fs::read_to_string(dir.join("chat_template.jinja"))?, dir.display().to_string())),
            None => opts.chat_template.clone(),
        };
        if let Some((source, origin)) = chosen {
            std::fs::write(staging.join("chat_template.jinja"), source)?;
            if !files.iter().any(|f| f == "chat_template.jinja") {
                files.push("chat_template.jinja".to_string());
            }
            let tc = staging.join("tokenizer_config.json");
            if tc.is_file() {
                let mut j: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&tc)?).with_context(|| {
                        format!("{}: invalid JSON", opts.model_dir.join("tokenizer_config.json").display())
                    })?;
                if let Some(o) = j.as_object_mut() {
                    if o.remove("chat_template").is_some() {
                        std::fs::write(&tc, serde_json::to_string_pretty(&j)? + "\n")?;
                    }
                }
            }
            if staging.join("chat_template.json").is_file() {
                std::fs::remove_file(staging.join("chat_template.json"))?;
                files.retain(|f| f != "chat_template.json");
            }
            template_from = Some(origin);
        }

        // The written checkpoint must hold every tensor with its planned shape and dtype.
        let written = Checkpoint::open(&staging)?;
        for (p, (shape, _)) in planned.iter().zip(&infos) {
            match written.info(&p.name) {
                Some((s, d)) if &s == shape && d == p.out => {}
                other => bail!("verification: {} is {other:?} in the written checkpoint", p.name),
            }
        }
        Ok(ExportReport {
            tensors: planned.len(),
            merged_modules: merged,
            shards: shard_report,
            files,
            template_from,
            dtype: out_dtype_name.clone(),
        })
    })();
    match result {
        Ok(report) => {
            commit(&staging, &opts.export_dir)?;
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_and_shard_plan() {
        let mut v = vec!["a.layers.10.w", "a.layers.2.w", "a.layers.2", "lm_head"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["a.layers.2", "a.layers.2.w", "a.layers.10.w", "lm_head"]);
        let t = |bytes| Planned { name: String::new(), out: DType::F32, bytes };
        // 4 + 4 fit in 10; 4 starts a new one; 20 exceeds the limit alone and gets its own shard.
        let shards = plan_shards(&[t(4), t(4), t(4), t(20), t(1)], 10);
        assert_eq!(shards, vec![vec![0, 1], vec![2], vec![3], vec![4]]);
    }

    #[test]
    fn dtype_names() {
        assert_eq!(parse_dtype("auto").unwrap(), None);
        assert_eq!(parse_dtype("bfloat16").unwrap(), Some(DType::BF16));
        assert!(parse_dtype("int4").unwrap_err().to_string().contains("float16"));
        let mut cfg = serde_json::json!({"dtype": "bfloat16", "text_config": {"dtype": "bfloat16"}, "x_config": {}});
        set_config_dtype(&mut cfg, "float32");
        assert_eq!(cfg["dtype"], "float32");
        assert_eq!(cfg["text_config"]["dtype"], "float32");
        assert!(cfg["x_config"].get("dtype").is_none());
    }
}
