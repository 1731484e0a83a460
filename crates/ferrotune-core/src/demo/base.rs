//! The demo's small pretrained base: a real `qwen3_5` architecture at about 4M parameters, pretrained from
//! random init on synthetic scenes (shapes, colours, positions: not the robot task) — first its vision tower
//! alone, directly on the pictures, then with ferrotune's own full fine-tuning on their captions and on
//! text-only robot sentences (the words, with no picture) — so that it can see and speak before the LoRA. Its
//! files ship inside the binary; [`rebuild`] is the recipe that makes them.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context, Result};
use candle_core::DType;

use crate::config::Plan;
use crate::models::qwen3_5::init::{config_json, random_weights, Sizes, TokenIds};

/// The files of the base that never change (tokenizer, chat template, processor and generation settings).
const STATIC_FILES: &[(&str, &[u8])] = &[
    ("tokenizer.json", include_bytes!("../../assets/demo-base/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../../assets/demo-base/tokenizer_config.json")),
    ("chat_template.jinja", include_bytes!("../../assets/demo-base/chat_template.jinja")),
    ("preprocessor_config.json", include_bytes!("../../assets/demo-base/preprocessor_config.json")),
    ("video_preprocessor_config.json", include_bytes!("../../assets/demo-base/video_preprocessor_config.json")),
    ("generation_config.json", include_bytes!("../../assets/demo-base/generation_config.json")),
];

/// The pretrained base's `config.json` and `model.safetensors`, held in memory. The `ferrotune` binary embeds
/// the shipped ones and passes them in; the library does not, so that its test binaries do not each carry the
/// 8 MB of weights.
#[derive(Clone, Copy)]
pub struct BaseWeights {
    pub config: &'static [u8],
    pub weights: &'static [u8],
}

impl std::fmt::Debug for BaseWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BaseWeights {{ config: {} bytes, weights: {} bytes }}", self.config.len(), self.weights.len())
    }
}

/// Where the recipe writes the base in a source checkout.
pub fn assets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-base")
}

/// Writes the base checkpoint into `dir`: the static files and `base`'s weights (None when the binary was
/// built without them).
pub fn write_embedded(dir: &Path, base: Option<BaseWeights>) -> Result<()> {
    let Some(BaseWeights { config, weights }) = base else {
        bail!(
            "this build has no pretrained demo base (assets/demo-base/model.safetensors); build it once with \
             `ferrotune demo --rebuild-base`, then rebuild ferrotune"
        )
    };
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    for (name, bytes) in STATIC_FILES.iter().chain([("config.json", config), ("model.safetensors", weights)].iter()) {
        std::fs::write(dir.join(name), bytes).with_context(|| format!("{}: cannot write", dir.join(name).display()))?;
    }
    Ok(())
}

/// Settings of the pretraining recipe. The defaults are what the committed base was built with.
#[derive(Clone, Debug)]
pub struct Recipe {
    pub seed: u64,
    /// Pictures in stage 1's single-shape set; the multi-shape and caption sets have half as many each.
    pub scenes: usize,
    /// Epochs of stage 1 (short visual questions) and stage 2 (captions, with the stage-1 data mixed in).
    pub epochs: f64,
    pub epochs_stage2: f64,
    /// Peak learning rate of stage 1 (stage 2 uses half). Measured on held-out single shapes after stage 1 (with
    /// a tower trained through the language model, before stage 0 existed): colour named right 100% at 3e-4
    /// against 81% at 2e-3.
    pub learning_rate: f64,
    pub batch_size: usize,
    /// Stage 0: the vision tower trained directly on the scene pictures (see [`super::vision`]).
    pub vision: super::vision::VisionStage,
    /// Keep the vision tower and merger frozen in the caption stages (trained through the language model at
    /// batch 8 they lose what stage 0 taught them).
    pub freeze_vision: bool,
}

impl Default for Recipe {
    fn default() -> Self {
        Self {
            seed: 0,
            scenes: 12000,
            epochs: 3.0,
            epochs_stage2: 1.0,
            learning_rate: 3e-4,
            batch_size: 8,
            vision: Default::default(),
            freeze_vision: true,
        }
    }
}

/// Rebuilds the base from scratch into `out` (config.json + model.safetensors in bf16), working in `work`:
/// random init → stage 0 (the vision tower and merger alone, reconstructing the scene pictures and naming their
/// shape kinds: see [`super::vision`]) → stage 1 (one large shape per picture, short answers) → stage 2 (several
/// shapes, captions, the stage-1 data, and text-only sentences about robots with no picture), full fine-tuning
/// of the language model with the tower and merger frozen (unless `freeze_vision` is off).
pub fn rebuild(out: &Path, work: &Path, recipe: &Recipe, stop: &AtomicBool, progress: bool) -> Result<PathBuf> {
    std::fs::create_dir_all(work).with_context(|| format!("{}: cannot create", work.display()))?;
    // 1. Random init of the demo architecture with the shipped tokenizer.
    let init = work.join("init");
    write_random_init(&init, recipe.seed)?;
    // 2. Data: short, mostly visual questions about 1-4 shapes (stage 1: the model must learn to look before
    //    long captions let it score on language alone), then full captions of scenes (stage 2).
    let data = work.join("data");
    let single = super::scenes::SceneOptions {
        n_train: recipe.scenes,
        n_eval: 50,
        seed: recipe.seed + 13,
        max_shapes: 1,
        radius: (24.0, 38.0),
        short: true,
        name: "shape".into(),
        settings: true,
        ..Default::default()
    };
    super::scenes::generate(&data, &single)?;
    let several = super::scenes::SceneOptions {
        n_train: recipe.scenes / 2,
        n_eval: 50,
        seed: recipe.seed + 11,
        max_shapes: 4,
        radius: (16.0, 30.0),
        short: true,
        name: "shapes".into(),
        settings: true,
        ..Default::default()
    };
    super::scenes::generate(&data, &several)?;
    let scenes = super::scenes::SceneOptions {
        n_train: recipe.scenes / 2,
        n_eval: 50,
        seed: recipe.seed + 7,
        settings: true,
        ..Default::default()
    };
    super::scenes::generate(&data, &scenes)?;
    // Text without pictures, so the base can also speak the vocabulary of robot descriptions (words only: no row
    // ties a description to a picture; that is what the LoRA learns).
    super::robots::text_corpus(&data, "robot_text", recipe.scenes / 2, recipe.seed + 17)?;
    // 3. Stage 0: the vision tower learns to keep what the pictures look like, from the pictures alone.
    let seen = if recipe.vision.steps > 0 {
        let pictures = |names: &[&str]| -> Result<Vec<super::vision::Picture>> {
            let mut out = Vec::new();
            for name in names {
                out.extend(super::vision::scene_pictures(&data, name)?);
            }
            Ok(out)
        };
        let dir = work.join("vision");
        super::vision::pretrain(
            &init,
            (&pictures(&["shape", "shapes", "scenes"])?, &pictures(&["shape_eval", "scenes_eval"])?),
            &dir,
            &recipe.vision,
            recipe.seed + 19,
            stop,
            progress,
        )?;
        dir
    } else {
        init.clone()
    };
    // 4. Full fine-tuning with LLaMA-Factory configs, one per stage: one large shape per picture first (what
    //    colours and shapes are called), then several shapes and whole captions.
    // A finished stage 1 in `work` is reused (stage 2 can be retuned without redoing it), but only when it was
    // trained from exactly these inputs: a stage 1 left by another seed, learning rate or generator would
    // silently break the bit-for-bit rebuild.
    let fingerprint = stage1_fingerprint(&seen, &data, recipe)?;
    let stamp = work.join("stage1").join(FINGERPRINT_FILE);
    let reusable = work.join("stage1/model.safetensors").exists()
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == fingerprint);
    let stage1 = if reusable {
        println!("reusing {} (same recipe and data: {fingerprint})", work.join("stage1").display());
        work.join("stage1")
    } else {
        if work.join("stage1").exists() {
            println!(
                "{} was trained from other settings or data; training stage 1 again",
                work.join("stage1").display()
            );
        }
        let _ = std::fs::remove_file(&stamp);
        let dir = train_stage(
            work,
            "stage1",
            &seen,
            &data,
            "shape",
            "shape_eval",
            recipe.epochs,
            recipe.learning_rate,
            recipe,
            stop,
            progress,
        )?;
        std::fs::write(&stamp, format!("{fingerprint}\n"))
            .with_context(|| format!("{}: cannot write", stamp.display()))?;
        dir
    };
    let stage2 = train_stage(
        work,
        "stage2",
        &stage1,
        &data,
        "shape,shapes,scenes,robot_text",
        "scenes_eval",
        recipe.epochs_stage2,
        recipe.learning_rate / 2.0,
        recipe,
        stop,
        progress,
    )?;
    // 5. The result: bf16 weights and the config (the static files stay as they are).
    let _ = std::fs::copy(stage2.join("training_loss.png"), work.join("pretrain_loss.png"));
    write_bf16(&stage2, out)
}

/// Writes the checkpoint in `from` to `out` as `config.json` + `model.safetensors` in bf16 (`A_log` stays f32, as
/// reference checkpoints keep it). The stages train and save in f32 from stage 0 on; the base ships at half
/// the size.
pub fn write_bf16(from: &Path, out: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let ckpt = crate::weights::Checkpoint::open(from)?;
    let mut tensors = std::collections::HashMap::new();
    for name in ckpt.names() {
        let dtype = if name.ends_with("A_log") { DType::F32 } else { DType::BF16 };
        tensors.insert(name.to_string(), ckpt.load(name, &candle_core::Device::Cpu)?.to_dtype(dtype)?);
    }
    let weights = out.join("model.safetensors");
    crate::weights::save_safetensors(&tensors, &weights)?;
    let mut cfg = crate::weights::read_config_json(from)?;
    cfg["dtype"] = serde_json::json!("bfloat16");
    super::write_json(&out.join("config.json"), &cfg)?;
    Ok(weights)
}

/// Writes a randomly initialised checkpoint of the demo architecture (bf16, with the shipped tokenizer,
/// template and processor files) into `dir`.
pub fn write_random_init(dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    for (name, bytes) in STATIC_FILES {
        std::fs::write(dir.join(name), bytes).with_context(|| format!("{}: cannot write", dir.join(name).display()))?;
    }
    let tok = crate::tokenizer::Tokenizer::from_path(dir)?;
    let json = config_json(&Sizes::demo(), &TokenIds::from_tokenizer(&tok)?);
    let cfg = crate::models::qwen3_5::Config::from_json(&json)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&json)?)?;
    crate::weights::save_safetensors(&random_weights(&cfg, DType::BF16, seed)?, &dir.join("model.safetensors"))
}

/// Written next to a finished stage 1: the fingerprint of what it was trained from.
const FINGERPRINT_FILE: &str = "recipe.fingerprint";

/// FNV-1a over stage 1's inputs: the recipe's settings, this ferrotune's version, the weights it starts from
/// (stage 0's result) and every file of the single-shape dataset (names and bytes, in sorted order).
fn stage1_fingerprint(start: &Path, data: &Path, recipe: &Recipe) -> Result<String> {
    use std::hash::Hasher as _;
    // `write` is plain FNV-1a 64 over the bytes: the fingerprints already on disk stay valid.
    let mut h = fnv::FnvHasher::default();
    let Recipe { seed, scenes, epochs, epochs_stage2: _, learning_rate, batch_size, vision, freeze_vision } = recipe;
    h.write(
        format!(
            "{}|{seed}|{scenes}|{epochs}|{learning_rate}|{batch_size}|{vision:?}|{freeze_vision}",
            env!("CARGO_PKG_VERSION")
        )
        .as_bytes(),
    );
    let mut files = vec![start.join("model.safetensors"), data.join("shape.json"), data.join("shape_eval.json")];
    let mut images: Vec<PathBuf> = std::fs::read_dir(data.join("shape"))
        .with_context(|| format!("{}: cannot list", data.join("shape").display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    images.sort();
    files.extend(images);
    for f in &files {
        h.write(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        h.write(&std::fs::read(f).with_context(|| format!("{}: cannot read", f.display()))?);
    }
    Ok(format!("{:016x}", h.finish()))
}

/// One full fine-tuning stage from `model` on `datasets`; returns the output folder.
#[allow(clippy::too_many_arguments)]
fn train_stage(
    work: &Path,
    name: &str,
    model: &Path,
    data: &Path,
    datasets: &str,
    eval: &str,
    epochs: f64,
    lr: f64,
    recipe: &Recipe,
    stop: &AtomicBool,
    progress: bool,
) -> Result<PathBuf> {
    let out = work.join(name);
    let yaml = format!(
        "model_name_or_path: {model}\ntemplate: qwen3_5_nothink\nstage: sft\ndo_train: true\nfinetuning_type: full\n\
         freeze_vision_tower: {frozen}\nfreeze_multi_modal_projector: {frozen}\ndataset: {datasets}\neval_dataset: {eval}\n\
         dataset_dir: {data}\ncutoff_len: 256\nlearning_rate: {lr}\nnum_train_epochs: {epochs}\n\
         per_device_train_batch_size: {bs}\ngradient_accumulation_steps: 1\nlr_scheduler_type: cosine\n\
         warmup_ratio: 0.03\nweight_decay: 0.01\ndisable_gradient_checkpointing: true\nlogging_steps: 25\n\
         eval_strategy: steps\neval_steps: 250\nsave_steps: 100000\nseed: {seed}\noutput_dir: {out}\n\
         overwrite_output_dir: true\nplot_loss: true\nreport_to: none\n",
        model = model.display(),
        data = data.display(),
        bs = recipe.batch_size,
        frozen = recipe.freeze_vision,
        seed = recipe.seed,
        out = out.display()
    );
    let yaml_path = work.join(format!("pretrain_{name}.yaml"));
    std::fs::write(&yaml_path, &yaml)?;
    println!("pretraining the demo base, {name}, with {}:\n{yaml}", yaml_path.display());
    let plan = Plan::load(Some(&yaml_path), &[])?;
    let prepared = crate::data::prepare(&plan, &|_, _| {})?;
    let run = crate::train::run::run(
        &plan,
        &prepared,
        &crate::train::run::RunOptions { stop, progress, halt_after_step: None, device: None, workers: None },
    )?;
    if run.interrupted {
        bail!("pretraining was interrupted");
    }
    Ok(out)
}
