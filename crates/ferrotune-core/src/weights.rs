//! Checkpoint directories as Hugging Face writes them: `config.json` plus one or more `*.safetensors` shards
//! (with or without `model.safetensors.index.json`), memory-mapped, each tensor in the dtype of its file.
//!
//! [`Weights`] hands tensors to model constructors by their checkpoint key, converted to the compute dtype,
//! with errors that name the tensor, the file and the expected shape (or, for random-init checkpoints,
//! freshly drawn).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::nn::Param;

/// How frozen matrices (linear weights and the embedding table) are held in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FrozenFormat {
    /// In the compute dtype, as every other parameter.
    #[default]
    Compute,
    /// bf16 / f16 checkpoint tensors as stored (CPU, f32 compute): half the memory of f32, the same numbers.
    Stored,
    /// bf16 checkpoint tensors as stored (CPU), multiplied in bf16 with f32 accumulation: the activations are
    /// rounded to bf16, as PyTorch's bf16 does, so the products run on AMX tiles where the CPU has them.
    /// f16 tensors are kept as [`FrozenFormat::Stored`] keeps them.
    Bf16,
    /// Per-row int8, quantized at load (CPU, f32 compute): a quarter of f32's memory (`quantization_bit: 8`).
    Int8,
}

/// All safetensors shards of one checkpoint directory, indexed by tensor name.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<Shard>,
    index: HashMap<String, usize>,
}

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    map: ShardMap,
    /// Where the tensor data starts (after the 8-byte length and the JSON header).
    data_start: usize,
    tensors: HashMap<String, safetensors::tensor::TensorInfo>,
    /// Tensors whose bytes were handed out in place (a second load of one gets a copy, so that no two tensors
    /// share a buffer).
    in_place: std::sync::Mutex<std::collections::HashSet<String>>,
}

enum ShardMap {
    /// Private mapping whose ranges become CPU tensors without a copy.
    #[cfg(unix)]
    InPlace(crate::mapped::Mapping),
    /// Read-only mapping tensors are copied out of.
    Copied(memmap2::Mmap),
}

impl ShardMap {
    fn open(file: &std::fs::File) -> std::io::Result<Self> {
        #[cfg(unix)]
        if let Some(m) = crate::mapped::Mapping::open(file) {
            return Ok(Self::InPlace(m));
        }
        // SAFETY: the file is mapped read-only; ferrotune never writes into a checkpoint it has open.
        Ok(Self::Copied(unsafe { memmap2::Mmap::map(file) }?))
    }

    fn bytes(&self) -> &[u8] {
        match self {
            #[cfg(unix)]
            Self::InPlace(m) => m.bytes(),
            Self::Copied(m) => m,
        }
    }
}

impl Checkpoint {
    /// Opens every shard of `dir`. With `model.safetensors.index.json` the shards it lists are used; otherwise
    /// every `*.safetensors` file in the directory (sorted by name).
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: not a directory; give the folder that holds config.json and *.safetensors", dir.display());
        }
        let index_path = dir.join("model.safetensors.index.json");
        let mut paths: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("{}: cannot read", index_path.display()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", index_path.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: no \"weight_map\" object", index_path.display()))?;
            let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_owned)).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let mut v = Vec::new();
            for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "safetensors") {
                    v.push(path);
                }
            }
            v.sort();
            v
        };
        if paths.is_empty() {
            bail!(
                "{}: no *.safetensors files; ferrotune loads Hugging Face safetensors checkpoints \
                 (convert .bin/.pt weights with transformers' save_pretrained(safe_serialization=True))",
                dir.display()
            );
        }
        paths.dedup();
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            if !path.exists() {
                bail!("{}: listed in model.safetensors.index.json but missing", path.display());
            }
            let file = std::fs::File::open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
            let map = ShardMap::open(&file).with_context(|| format!("{}: cannot map", path.display()))?;
            let (header, meta) = safetensors::SafeTensors::read_metadata(map.bytes())
                .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
            let tensors: HashMap<String, safetensors::tensor::TensorInfo> =
                meta.tensors().into_iter().map(|(n, info)| (n, info.clone())).collect();
            for name in tensors.keys() {
                index.insert(name.clone(), i);
            }
            files.push(Shard { path, map, data_start: 8 + header, tensors, in_place: Default::default() });
        }
        Ok(Self { dir: dir.to_path_buf(), files, index })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    /// Shape and dtype of a tensor as stored.
    pub fn info(&self, name: &str) -> Option<(Vec<usize>, DType)> {
        let info = self.files[*self.index.get(name)?].tensors.get(name)?;
        Some((info.shape.clone(), DType::try_from(info.dtype).ok()?))
    }

    /// The file a tensor lives in.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.files[i].path.as_path())
    }

    /// Loads a tensor as stored (its file's dtype) onto `device`.
    ///
    /// On the CPU the tensor's buffer is the file mapping itself (see [`crate::mapped`]): no copy, and the pages
    /// are the page cache's. Otherwise (another device, a misaligned tensor, a second load of the same name) the
    /// bytes are copied out and the mapping's pages released, so a loaded model is held once either way.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let i = *self.index.get(name).with_context(|| self.missing(name))?;
        let shard = &self.files[i];
        let info = &shard.tensors[name];
        let (start, end) = (shard.data_start + info.data_offsets.0, shard.data_start + info.data_offsets.1);
        let bytes = shard.map.bytes().get(start..end).with_context(|| {
            format!(
                "{}: tensor {name}: its data lies past the end of the file (truncated download?)",
                shard.path.display()
            )
        })?;
        let dtype =
            DType::try_from(info.dtype).map_err(|e| anyhow::anyhow!("{}: tensor {name}: {e}", shard.path.display()))?;
        let what = |e: candle_core::Error| anyhow::anyhow!("{}: tensor {name}: {e}", shard.path.display());
        let mut handed = shard.in_place.lock().unwrap_or_else(|e| e.into_inner());
        let first = !handed.contains(name);
        #[cfg(unix)]
        if let ShardMap::InPlace(map) = &shard.map {
            if device.is_cpu() && first {
                let (shape, dev) = (info.shape.as_slice(), device);
                // SAFETY: each name's range is handed out once (`in_place`), ranges of different tensors are
                // disjoint (safetensors checks that the offsets tile the data), and the element types are plain
                // numbers.
                let t = unsafe {
                    match dtype {
                        DType::BF16 => in_place::<half::bf16>(map, start, shape, dev),
                        DType::F16 => in_place::<half::f16>(map, start, shape, dev),
                        DType::F32 => in_place::<f32>(map, start, shape, dev),
                        _ => None,
                    }
                };
                if let Some(t) = t {
                    handed.insert(name.to_owned());
                    return t.map_err(what);
                }
            }
        }
        let t = Tensor::from_raw_buffer(bytes, dtype, &info.shape, device).map_err(what)?;
        match &shard.map {
            // SAFETY: a read-only shared file mapping: dropped pages read back from the file if touched again, and
            // no reference into the range outlives this call.
            #[cfg(unix)]
            ShardMap::Copied(m) => unsafe {
                let _ = m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start);
            },
            // Pages of a range handed out in place may hold its owner's writes: only a never-handed range is dropped.
            #[cfg(unix)]
            ShardMap::InPlace(m) if first => m.release(start, end - start),
            _ => {}
        }
        Ok(t)
    }

    /// How many tensors were handed out in place (their buffers are the file mapping).
    pub fn used_in_place(&self) -> usize {
        self.files.iter().map(|f| f.in_place.lock().map_or(0, |s| s.len())).sum()
    }

    fn missing(&self, name: &str) -> String {
        // Point at the closest existing names so a prefix mix-up (e.g. `model.layers.` vs
        // `model.language_model.layers.`) is obvious.
        let stem = name.rsplit_once('.').map(|(a, _)| a).unwrap_or(name);
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let mut near: Vec<&str> =
            self.index.keys().map(String::as_str).filter(|k| k.ends_with(leaf) || k.starts_with(stem)).collect();
        near.sort();
        near.truncate(3);
        let hint =
            if near.is_empty() { String::new() } else { format!("; similar names present: {}", near.join(", ")) };
        format!("{}: the checkpoint has no tensor `{name}`{hint}", self.dir.display())
    }
}

/// The tensor of `shape` whose `T` elements start at byte `start` of `map`, owning them in place (None when the
/// range cannot be: misaligned or empty).
///
/// # Safety
/// As [`crate::mapped::Mapping::vec`]: no other buffer of `map` overlaps the range.
#[cfg(unix)]
unsafe fn in_place<T: candle_core::WithDType>(
    map: &crate::mapped::Mapping,
    start: usize,
    shape: &[usize],
    device: &Device,
) -> Option<candle_core::Result<Tensor>> {
    map.vec::<T>(start, shape.iter().product()).map(|v| Tensor::from_vec(v, shape, device))
}

/// Reads `config.json` of a checkpoint directory as JSON.
pub fn read_config_json(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read (is this a Hugging Face checkpoint folder?)", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}:{}:{}: invalid JSON: {e}", path.display(), e.line(), e.column()))
}

/// How a random-init checkpoint fills a tensor: the init transformers' `_init_weights` gives the module it
/// belongs to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// normal(0, initializer_range): linear and embedding weights.
    Normal,
    Const(f32),
    /// uniform(±1/√fan_in), fan_in the elements per output channel: torch's default for convolutions.
    FanInUniform,
    /// ln(uniform(lo, hi)).
    LogUniform(f32, f32),
}

/// Where a [`Weights`] view takes its tensors from.
#[derive(Clone)]
enum Source<'a> {
    Checkpoint(&'a Checkpoint),
    /// Fresh tensors from one seeded generator, drawn in the order the loader asks for them: the loader's
    /// order fixes the bytes of a random-init checkpoint.
    Random(std::rc::Rc<std::cell::RefCell<Random>>),
}

struct Random {
    rng: rand::rngs::StdRng,
    std: f32,
}

impl Random {
    fn draw(&mut self, shape: &[usize], init: Init) -> Result<Tensor> {
        use rand::Rng;
        use rand_distr::Distribution;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = match init {
            Init::Normal => {
                let d = rand_distr::Normal::new(0.0f32, self.std).context("normal distribution")?;
                (0..n).map(|_| d.sample(&mut self.rng)).collect()
            }
            Init::Const(c) => vec![c; n],
            Init::FanInUniform => {
                let bound = 1.0 / ((n / shape[0].max(1)) as f32).sqrt();
                (0..n).map(|_| self.rng.random_range(-bound..bound)).collect()
            }
            Init::LogUniform(lo, hi) => (0..n).map(|_| self.rng.random_range(lo..hi).ln()).collect(),
        };
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
}

/// A prefix-aware view of a checkpoint that model constructors pull their tensors from, as [`Param`]s that
/// remember their key.
///
/// Every tensor is converted to `dtype` on `device`, except those the caller asks for in another dtype
/// (`param_as`). Each tensor taken is recorded, so a loader can report what it did not use. A random view
/// ([`Weights::random`]) hands out freshly initialised tensors instead, so a model's loader also writes its
/// random-init checkpoints.
#[derive(Clone)]
pub struct Weights<'a> {
    src: Source<'a>,
    prefix: String,
    pub dtype: DType,
    pub device: Device,
    /// How [`Weights::frozen`] holds frozen matrices.
    format: FrozenFormat,
    used: std::rc::Rc<std::cell::RefCell<BTreeMap<String, ()>>>,
}

impl<'a> Weights<'a> {
    pub fn new(ckpt: &'a Checkpoint, dtype: DType, device: &Device) -> Self {
        Self::with_source(Source::Checkpoint(ckpt), dtype, device)
    }

    /// Random tensors on the CPU from a generator seeded with `seed`; `std` is the initializer_range. It holds
    /// no tensor by name ([`Weights::contains`] is false), so optional tensors such as an untied head are left out.
    pub fn random(seed: u64, std: f32, dtype: DType) -> Weights<'static> {
        use rand::SeedableRng;
        let random = Random { rng: rand::rngs::StdRng::seed_from_u64(seed), std };
        Weights::with_source(Source::Random(std::rc::Rc::new(std::cell::RefCell::new(random))), dtype, &Device::Cpu)
    }

    fn with_source(src: Source<'a>, dtype: DType, device: &Device) -> Self {
        Self {
            src,
            prefix: String::new(),
            dtype,
            device: device.clone(),
            format: FrozenFormat::Compute,
            used: Default::default(),
        }
    }

    /// How [`Weights::frozen`] holds frozen matrices. The compact formats need the CPU and an f32 compute dtype:
    /// there [`FrozenFormat::Stored`] falls back to the compute dtype, and [`FrozenFormat::Int8`] is an error.
    pub fn frozen_format(mut self, format: FrozenFormat) -> Result<Self> {
        let compact_ok = self.device.is_cpu() && self.dtype == DType::F32;
        self.format = match format {
            FrozenFormat::Int8 if !compact_ok => {
                bail!("quantization_bit: 8-bit base weights run on the CPU only; remove the key to use the GPU in bf16")
            }
            FrozenFormat::Stored | FrozenFormat::Bf16 if !compact_ok => FrozenFormat::Compute,
            f => f,
        };
        Ok(self)
    }

    /// What the tensors come from, for messages: the checkpoint folder, or "random init".
    pub fn origin(&self) -> String {
        match &self.src {
            Source::Checkpoint(c) => c.dir().display().to_string(),
            Source::Random(_) => "random init".into(),
        }
    }

    /// A view one level down: `w.pp("layers").pp(3)` reads `layers.3.*`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Self { prefix, ..self.clone() }
    }

    /// The full checkpoint key for `name` under this view.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.src {
            Source::Checkpoint(c) => c.contains(&self.path(name)),
            Source::Random(_) => false,
        }
    }

    /// The tensor `name`, checked against `shape` (which `why` explains, e.g. "hidden_size=64"), in the
    /// compute dtype; a random view fills it as `init` says.
    pub fn param(&self, name: &str, shape: &[usize], why: &str, init: Init) -> Result<Param> {
        self.param_as(name, shape, why, init, self.dtype)
    }

    /// Like [`Weights::param`] with an explicit dtype (e.g. f32 for `A_log`, which HF keeps in f32).
    pub fn param_as(&self, name: &str, shape: &[usize], why: &str, init: Init, dtype: DType) -> Result<Param> {
        let key = self.path(name);
        let t = match &self.src {
            Source::Random(r) => r.borrow_mut().draw(shape, init)?.to_device(&self.device)?,
            Source::Checkpoint(ckpt) => {
                let t = ckpt.load(&key, &self.device)?;
                if t.dims() != shape {
                    let file = ckpt.file_of(&key).map(|p| p.display().to_string()).unwrap_or_default();
                    bail!(
                        "{file}: tensor `{key}` has shape {:?}, but config.json implies {:?} ({why}); \
                         the weights do not belong to this config",
                        t.dims(),
                        shape
                    );
                }
                self.used.borrow_mut().insert(key.clone(), ());
                t
            }
        };
        Ok(Param::new(key, t.to_dtype(dtype)?))
    }

    /// A matrix used only through [`crate::nn::frozen::frozen_matmul_param`] and row lookups (linear weights and
    /// the embedding table), held as [`Weights::frozen_format`] says; otherwise as [`Weights::param`].
    pub fn frozen(&self, name: &str, shape: &[usize], why: &str, init: Init) -> Result<Param> {
        let stored = match &self.src {
            Source::Checkpoint(ckpt) => ckpt.info(&self.path(name)).map(|(_, d)| d),
            Source::Random(_) => None,
        };
        let p = match stored {
            Some(d @ (DType::BF16 | DType::F16)) if self.format != FrozenFormat::Compute => {
                let mut p = self.param_as(name, shape, why, init, d)?;
                p.bf16_products = d == DType::BF16 && self.format == FrozenFormat::Bf16;
                p
            }
            _ => self.param(name, shape, why, init)?,
        };
        match self.format {
            FrozenFormat::Int8 if shape.len() == 2 => Ok(p.quantize_int8()?),
            _ => Ok(p),
        }
    }

    /// Checkpoint keys not taken by any `param` so far, excluding those matching `ignore` prefixes.
    pub fn unused(&self, ignore: &[&str]) -> Vec<String> {
        let Source::Checkpoint(ckpt) = &self.src else { return Vec::new() };
        let used = self.used.borrow();
        ckpt.names()
            .into_iter()
            .filter(|n| !used.contains_key(*n) && !ignore.iter().any(|p| n.starts_with(p)))
            .map(str::to_owned)
            .collect()
    }
}

/// Files that travel with a model: tokenizer, chat template, processor and generation settings.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
];

/// Copies the [`TOKENIZER_FILES`] that exist in `from` into `to`.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    for name in TOKENIZER_FILES {
        let src = from.join(name);
        if src.exists() {
            std::fs::copy(&src, to.join(name))
                .with_context(|| format!("copying {} to {}", src.display(), to.display()))?;
            copied.push(name.to_string());
        }
    }
    Ok(copied)
}

/// Writes tensors as a safetensors file (metadata `format: pt`, as PyTorch writers do) via a temporary
/// name and a rename, so a crash never leaves a half-written file under the final name.
pub fn save_safetensors(tensors: &std::collections::HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let views: Vec<(&str, &Tensor)> = names.iter().map(|n| (n.as_str(), &tensors[*n])).collect();
    let tmp = path.with_extension("safetensors.tmp");
    let meta: std::collections::HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let contiguous: Vec<(&str, Tensor)> =
        views.iter().map(|(n, t)| Ok((*n, t.contiguous()?))).collect::<candle_core::Result<_>>()?;
    safetensors::tensor::serialize_to_file(contiguous.iter().map(|(n, t)| (*n, t)), Some(meta), &tmp)
        .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", tmp.display()))?;
    // The serialiser creates private (0600) files; weights are meant to be shared like any other output.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}
