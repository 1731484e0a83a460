//! Stage two of reading a config: the validated [`Plan`], with LLaMA-Factory's defaults and cross-key rules
//! (`hparams/parser.py::get_train_args`, `DataArguments.__post_init__`, HF `TrainingArguments.__post_init__`).
//! All cross-key checks live in [`Plan::from_raw`].

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::raw::{show, RawConfig};
use super::steps::{StepInputs, Steps};

/// Held-out evaluation split (`val_size`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ValSize {
    None,
    /// A fraction of the rows: ceil(fraction x rows) go to evaluation (datasets' `train_test_split`).
    Fraction(f64),
    /// An absolute number of rows.
    Count(usize),
}

impl ValSize {
    /// Rows held out from `n` rows.
    pub fn held_out(self, n: usize) -> usize {
        match self {
            ValSize::None => 0,
            ValSize::Fraction(f) => ((f * n as f64).ceil() as usize).min(n),
            ValSize::Count(c) => c.min(n),
        }
    }
}

/// What the data stage needs.
#[derive(Clone, Debug)]
pub struct DataPlan {
    /// `template`; `None` picks it from the checkpoint.
    pub template: Option<String>,
    pub datasets: Vec<String>,
    pub eval_datasets: Vec<String>,
    pub dataset_dir: PathBuf,
    pub media_dir: PathBuf,
    pub cutoff_len: usize,
    pub train_on_prompt: bool,
    pub mask_history: bool,
    pub max_samples: Option<usize>,
    pub val_size: ValSize,
    pub default_system: Option<String>,
    pub enable_thinking: Option<bool>,
    pub preserve_thinking: bool,
    pub image_max_pixels: u64,
    pub image_min_pixels: u64,
    /// `packing` / `neat_packing`.
    pub packing: Packing,
    /// Seed of the validation split and dataset sampling: `seed` (LLaMA-Factory splits with the training seed;
    /// `data_seed` seeds only the sampler).
    pub seed: u64,
}

/// Sequence packing of training rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    Off,
    /// One sequence per packed row (LLaMA-Factory's `packing`).
    Plain,
    /// Every packed sample independent (`neat_packing`).
    Neat,
}

impl DataPlan {
    /// The token limit of one sample: `cutoff_len`, one less when packing (LLaMA-Factory's rule).
    pub fn sample_cutoff(&self) -> usize {
        if self.packing == Packing::Off {
            self.cutoff_len
        } else {
            self.cutoff_len - 1
        }
    }
}

impl DataPlan {
    /// The template options these keys set (`default_system`, `enable_thinking`, `preserve_thinking`), as
    /// encoding, the written chat template and eval's template check all use them.
    pub fn render_options(&self) -> crate::template::TemplateOptions {
        crate::template::TemplateOptions {
            default_system: self.default_system.clone(),
            enable_thinking: self.enable_thinking,
            preserve_thinking: self.preserve_thinking,
        }
    }
}

/// `finetuning_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinetuningType {
    /// LoRA adapters on the target modules; the base stays frozen.
    Lora,
    /// Every parameter of the language model trained (the vision tower and projector follow the freeze keys).
    Full,
}

/// `lora_target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoraTarget {
    /// Every linear layer of the language model (not lm_head, nor the vision tower/merger while frozen).
    All,
    /// Module name suffixes, e.g. `q_proj`.
    Names(Vec<String>),
}

#[derive(Clone, Debug)]
pub struct LoraPlan {
    pub rank: usize,
    /// `lora_alpha`, defaulting to 2 x rank.
    pub alpha: f64,
    pub dropout: f64,
    pub target: LoraTarget,
    pub use_rslora: bool,
    pub freeze_vision_tower: bool,
    pub freeze_multi_modal_projector: bool,
    pub freeze_language_model: bool,
}

impl LoraPlan {
    /// The factor applied to B A x: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scale(&self) -> f64 {
        crate::lora::scale(self.alpha, self.rank, self.use_rslora)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduler {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
}

impl Scheduler {
    const NAMES: [(&'static str, Scheduler); 4] = [
        ("linear", Scheduler::Linear),
        ("cosine", Scheduler::Cosine),
        ("constant", Scheduler::Constant),
        ("constant_with_warmup", Scheduler::ConstantWithWarmup),
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, s)| *s == self).map(|(n, _)| *n).unwrap_or("linear")
    }
}

/// Evaluation / save / log schedule kind (HF `IntervalStrategy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interval {
    No,
    Steps,
    Epoch,
}

/// What to resume from, decided as LLaMA-Factory does at startup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    Fresh,
    /// `resume_from_checkpoint` was given.
    Given(PathBuf),
    /// The last `checkpoint-N` in output_dir (overwrite_output_dir is false).
    Auto(PathBuf),
}

#[derive(Clone, Debug)]
pub struct TrainPlan {
    pub output_dir: PathBuf,
    pub overwrite_output_dir: bool,
    pub resume: Resume,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub num_train_epochs: f64,
    pub max_steps: i64,
    pub lr_scheduler: Scheduler,
    /// HF `warmup_steps` after `warmup_ratio` is folded in: >= 1 steps, < 1 a fraction of the total.
    pub warmup: f64,
    pub logging_strategy: Interval,
    pub logging_steps: f64,
    pub logging_first_step: bool,
    pub save_strategy: Interval,
    pub save_steps: f64,
    pub save_total_limit: Option<usize>,
    pub save_only_model: bool,
    pub eval_strategy: Interval,
    pub eval_steps: Option<f64>,
    pub seed: u64,
    pub data_seed: Option<u64>,
    pub bf16: bool,
    pub use_cpu: bool,
    pub dataloader_drop_last: bool,
    pub plot_loss: bool,
    pub compute_accuracy: bool,
    pub disable_shuffling: bool,
    pub include_num_input_tokens_seen: bool,
    /// Per-layer activation recomputation in the backward pass: `!disable_gradient_checkpointing` when the
    /// config sets it; None lets training decide from the activations' size (LLaMA-Factory: always on).
    pub gradient_checkpointing: Option<bool>,
}

impl TrainPlan {
    /// Step counts for `samples` training samples, as the HF Trainer computes them.
    pub fn steps(&self, samples: usize) -> Result<Steps> {
        Steps::compute(&StepInputs {
            samples,
            per_device_batch: self.per_device_train_batch_size,
            grad_accum: self.gradient_accumulation_steps,
            epochs: self.num_train_epochs,
            max_steps: self.max_steps,
            drop_last: self.dataloader_drop_last,
            warmup: self.warmup,
            logging_steps: self.logging_steps,
            save_steps: self.save_steps,
            eval_steps: (self.eval_strategy == Interval::Steps).then_some(self.eval_steps).flatten(),
        })
    }
}

#[derive(Clone, Debug)]
pub struct GenerationPlan {
    pub do_sample: bool,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub max_length: usize,
    pub max_new_tokens: usize,
    pub repetition_penalty: f64,
    pub skip_special_tokens: bool,
}

#[derive(Clone, Debug)]
pub struct ExportPlan {
    pub export_dir: Option<PathBuf>,
    pub export_size_gb: usize,
    /// auto, float16, bfloat16 or float32.
    pub infer_dtype: String,
}

/// A validated configuration: everything a command needs, with defaults applied and paths resolved.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The config file, when there was one.
    pub source: Option<PathBuf>,
    pub finetuning_type: FinetuningType,
    pub model_name_or_path: PathBuf,
    pub adapter_name_or_path: Vec<PathBuf>,
    /// `quantization_bit: 8`: frozen base matrices in per-row int8.
    pub quantization_bit: Option<u32>,
    pub do_train: bool,
    pub do_eval: bool,
    pub data: DataPlan,
    pub lora: LoraPlan,
    pub train: TrainPlan,
    pub generation: GenerationPlan,
    pub export: ExportPlan,
    /// Things worth one line each: inert keys with non-default values, paths found next to the config, ...
    pub notes: Vec<String>,
}

impl Plan {
    /// Reads a config file plus overrides and validates it.
    pub fn load(path: Option<&Path>, args: &[String]) -> Result<Plan> {
        let mut raw = match path {
            Some(p) => RawConfig::from_file(p)?,
            None => RawConfig::new(),
        };
        raw.apply_args(args)?;
        Plan::from_raw(&raw)
    }

    /// Validates raw keys into a plan. Every cross-key rule is here.
    pub fn from_raw(raw: &RawConfig) -> Result<Plan> {
        let mut notes = raw.check_keys()?;
        let config_dir = raw.path.as_deref().and_then(Path::parent).map(Path::to_path_buf);

        // ---- stage and method ----
        let stage = raw.str("stage")?;
        if stage != "sft" {
            bail!(
                "{}: stage `{stage}` is not implemented; ferrotune implements supervised fine-tuning (`stage: sft`)",
                raw.place("stage")
            );
        }
        let finetuning_type = match raw.str("finetuning_type")?.as_str() {
            "lora" => FinetuningType::Lora,
            "full" => FinetuningType::Full,
            other => bail!(
                "{}: finetuning_type `{other}` is not implemented; ferrotune implements `lora` and `full`",
                raw.place("finetuning_type")
            ),
        };
        let quantization_bit = match raw.opt_i64("quantization_bit")? {
            None => None,
            Some(8) if finetuning_type == FinetuningType::Full => bail!(
                "{}: a quantized base cannot be fully fine-tuned; use finetuning_type: lora, or remove the key",
                raw.place("quantization_bit")
            ),
            Some(8) => Some(8),
            Some(4) => bail!(
                "{}: 4-bit quantization is not implemented; use quantization_bit: 8 (per-row int8) or remove the key",
                raw.place("quantization_bit")
            ),
            Some(b) => bail!("{}: expected 8 (or no key), got {b}", raw.place("quantization_bit")),
        };

        // ---- model ----
        let model = raw.opt_str("model_name_or_path")?.with_context(|| {
            "`model_name_or_path` is required: the folder of the base checkpoint (config.json, *.safetensors, \
             tokenizer.json)"
        })?;
        let model_name_or_path = resolve_existing(&model, config_dir.as_deref(), &mut notes).with_context(|| {
            let looks_like_hub = model.matches('/').count() == 1 && !model.starts_with(['/', '.', '~']);
            format!(
                "{}: checkpoint folder {model:?} not found{}",
                raw.place("model_name_or_path"),
                if looks_like_hub {
                    format!(
                        "\n  hint: ferrotune reads local checkpoints only; download it first, e.g. \
                         `huggingface-cli download {model} --local-dir models/{}`, and point model_name_or_path there",
                        model.rsplit('/').next().unwrap_or(&model)
                    )
                } else {
                    String::new()
                }
            )
        })?;
        if !model_name_or_path.is_dir() {
            bail!("{}: {} is not a folder", raw.place("model_name_or_path"), model_name_or_path.display());
        }
        let adapter_name_or_path = raw
            .list("adapter_name_or_path")?
            .iter()
            .map(|a| {
                resolve_existing(a, config_dir.as_deref(), &mut notes)
                    .with_context(|| format!("{}: adapter folder {a:?} not found", raw.place("adapter_name_or_path")))
            })
            .collect::<Result<Vec<_>>>()?;

        // ---- data ----
        let template = raw.opt_str("template")?;
        if let Some(t) = &template {
            crate::template::by_name(t).with_context(|| raw.place("template"))?;
        }
        let datasets = raw.list("dataset")?;
        let eval_datasets = raw.list("eval_dataset")?;
        let dataset_dir_raw = raw.str("dataset_dir")?;
        let dataset_dir = resolve_dir(&dataset_dir_raw, config_dir.as_deref(), &mut notes);
        let media_dir = match raw.opt_str("media_dir")? {
            Some(m) => resolve_dir(&m, config_dir.as_deref(), &mut notes),
            None => dataset_dir.clone(),
        };
        let val = raw.f64("val_size")?;
        let val_size = if val <= 1e-6 {
            ValSize::None
        } else if val < 1.0 {
            ValSize::Fraction(val)
        } else if val.fract() == 0.0 {
            ValSize::Count(val as usize)
        } else {
            bail!("{}: `val_size` above 1 is a row count and must be whole, got {val}", raw.place("val_size"));
        };
        if val_size != ValSize::None && datasets.is_empty() {
            bail!("{}: `val_size` needs `dataset`", raw.place("val_size"));
        }
        if val_size != ValSize::None && !eval_datasets.is_empty() {
            bail!("{}: `val_size` cannot be combined with `eval_dataset`; use one of them", raw.place("val_size"));
        }
        let train_on_prompt = raw.bool("train_on_prompt")?;
        let mask_history = raw.bool("mask_history")?;
        if train_on_prompt && mask_history {
            bail!("{}: `mask_history` cannot be combined with `train_on_prompt`", raw.place("mask_history"));
        }
        // LLaMA-Factory: neat_packing implies packing; packing is off for SFT unless set.
        let packing = match (raw.bool("neat_packing")?, raw.opt_bool("packing")?.unwrap_or(false)) {
            (true, _) => Packing::Neat,
            (false, true) => Packing::Plain,
            (false, false) => Packing::Off,
        };
        let mix = raw.str("mix_strategy")?;
        if mix != "concat" {
            bail!("{}: mix_strategy `{mix}` is not implemented; datasets are concatenated", raw.place("mix_strategy"));
        }
        let image_max_pixels = raw.usize_at_least("image_max_pixels", 1)? as u64;
        let image_min_pixels = raw.usize_at_least("image_min_pixels", 1)? as u64;
        if image_min_pixels > image_max_pixels {
            bail!(
                "{}: image_min_pixels ({image_min_pixels}) is above image_max_pixels ({image_max_pixels})",
                raw.place("image_min_pixels")
            );
        }
        let seed = non_negative(raw, "seed")?;
        let data_seed = raw.opt_i64("data_seed")?.map(|s| s.max(0) as u64);
        let data = DataPlan {
            template,
            datasets,
            eval_datasets,
            dataset_dir,
            media_dir,
            cutoff_len: raw.usize_at_least("cutoff_len", if packing == Packing::Off { 1 } else { 2 })?,
            train_on_prompt,
            mask_history,
            max_samples: raw.opt_usize_at_least("max_samples", 1)?,
            val_size,
            default_system: raw.opt_str("default_system")?,
            enable_thinking: raw.opt_bool("enable_thinking")?,
            preserve_thinking: raw.bool("preserve_thinking")?,
            image_max_pixels,
            image_min_pixels,
            packing,
            seed,
        };

        // ---- LoRA ----
        let rank = raw.usize_at_least("lora_rank", 1)?;
        let alpha = match raw.opt_i64("lora_alpha")? {
            Some(a) if a <= 0 => bail!("{}: `lora_alpha` must be positive", raw.place("lora_alpha")),
            Some(a) => a as f64,
            None => rank as f64 * 2.0,
        };
        let dropout = raw.f64("lora_dropout")?;
        if !(0.0..1.0).contains(&dropout) {
            bail!("{}: `lora_dropout` must be in [0, 1), got {dropout}", raw.place("lora_dropout"));
        }
        let targets = raw.list("lora_target")?;
        let target = if targets.is_empty() {
            bail!("{}: `lora_target` is empty; use `all` or module names", raw.place("lora_target"));
        } else if targets.iter().any(|t| t == "all") {
            if targets.len() > 1 {
                bail!("{}: `all` cannot be combined with module names", raw.place("lora_target"));
            }
            LoraTarget::All
        } else {
            LoraTarget::Names(targets)
        };
        let lora = LoraPlan {
            rank,
            alpha,
            dropout,
            target,
            use_rslora: raw.bool("use_rslora")?,
            freeze_vision_tower: raw.bool("freeze_vision_tower")?,
            freeze_multi_modal_projector: raw.bool("freeze_multi_modal_projector")?,
            freeze_language_model: raw.bool("freeze_language_model")?,
        };

        // ---- training ----
        let do_train = raw.bool("do_train")?;
        let eval_strategy = interval(raw, "eval_strategy", true)?;
        let mut do_eval = raw.bool("do_eval")?;
        if eval_strategy != Interval::No {
            do_eval = true; // HF TrainingArguments.__post_init__
        }
        if do_train && data.datasets.is_empty() {
            bail!("`do_train: true` needs `dataset`: the dataset names from dataset_info.json (or data file paths)");
        }
        if do_eval && data.eval_datasets.is_empty() && data.val_size == ValSize::None {
            bail!("evaluation (do_eval / eval_strategy) needs `eval_dataset` or `val_size`");
        }
        // Zero intervals are refused as HF `TrainingArguments` refuses them (`logging strategy steps requires
        // non-zero --logging_steps`, `evaluation strategy steps requires either non-zero --eval_steps or
        // --logging_steps`). HF silently never saves with `save_steps: 0`; that is refused here too.
        let logging_strategy = interval(raw, "logging_strategy", false)?;
        let logging_steps = steps_value(raw, "logging_steps")?;
        if logging_strategy == Interval::Steps && logging_steps == 0.0 {
            bail!(
                "{}: `logging_steps` is 0, but `logging_strategy: steps` logs every logging_steps steps\n  hint: set \
                 logging_steps to a positive number of steps (e.g. 10) or a fraction below 1 of the total (e.g. \
                 0.05), or `logging_strategy: no`",
                raw.place("logging_steps")
            );
        }
        let save_strategy = interval(raw, "save_strategy", false)?;
        let save_steps = steps_value(raw, "save_steps")?;
        if save_strategy == Interval::Steps && save_steps == 0.0 {
            bail!(
                "{}: `save_steps` is 0, but `save_strategy: steps` saves a checkpoint every save_steps steps\n  hint: \
                 set save_steps to a positive number of steps (e.g. 500) or a fraction below 1 of the total, or \
                 `save_strategy: no` to write only the final weights",
                raw.place("save_steps")
            );
        }
        let mut eval_steps = match raw.opt_f64("eval_steps")? {
            Some(_) => Some(steps_value(raw, "eval_steps")?),
            None => None,
        };
        if eval_strategy == Interval::Steps && eval_steps.is_none_or(|s| s == 0.0) {
            if logging_steps == 0.0 {
                let key = if raw.get("eval_steps").is_some() { "eval_steps" } else { "logging_steps" };
                bail!(
                    "{}: `eval_strategy: steps` needs a non-zero `eval_steps` or `logging_steps` (eval_steps, when \
                     unset or 0, takes the value of logging_steps, which is 0)\n  hint: set eval_steps to a positive \
                     number of steps (e.g. 50) or a fraction below 1 of the total",
                    raw.place(key)
                );
            }
            eval_steps = Some(logging_steps); // HF falls back to logging_steps
        }
        let warmup_steps = raw.f64("warmup_steps")?;
        let warmup = match raw.opt_f64("warmup_ratio")? {
            Some(r) if !(0.0..=1.0).contains(&r) => {
                bail!("{}: `warmup_ratio` must be in [0, 1], got {r}", raw.place("warmup_ratio"))
            }
            Some(r) => r,
            None if warmup_steps < 0.0 => bail!("{}: `warmup_steps` must not be negative", raw.place("warmup_steps")),
            None => warmup_steps,
        };
        let scheduler_name = raw.str("lr_scheduler_type")?;
        let lr_scheduler =
            Scheduler::NAMES.iter().find(|(n, _)| *n == scheduler_name).map(|(_, s)| *s).with_context(|| {
                let names: Vec<&str> = Scheduler::NAMES.iter().map(|(n, _)| *n).collect();
                format!(
                    "{}: lr_scheduler_type `{scheduler_name}` is not implemented; ferrotune implements {}",
                    raw.place("lr_scheduler_type"),
                    names.join(", ")
                )
            })?;
        let optim = raw.str("optim")?;
        if !matches!(optim.as_str(), "adamw_torch" | "adamw_torch_fused" | "adamw_hf") {
            bail!("{}: optim `{optim}` is not implemented; ferrotune uses AdamW (`adamw_torch`)", raw.place("optim"));
        }
        let report_to = raw.list("report_to")?;
        if let Some(r) = report_to.iter().find(|r| r.as_str() != "none") {
            bail!(
                "{}: reporting to `{r}` is not implemented; ferrotune writes trainer_log.jsonl, trainer_state.json and \
                 training_loss.png (set `report_to: none`)",
                raw.place("report_to")
            );
        }
        let bf16 = raw.bool("bf16")?;
        if raw.bool("fp16")? {
            bail!(
                "{}: fp16 is not supported: Qwen3.5's Gated-DeltaNet layers overflow in float16; use `bf16: true`",
                raw.place("fp16")
            );
        }
        let tokens_seen = match raw.any("include_num_input_tokens_seen")? {
            None => false,
            Some(serde_json::Value::Bool(b)) => b,
            Some(serde_json::Value::String(s)) => match s.as_str() {
                "no" | "false" => false,
                "yes" | "true" | "all" | "non_padding" => true,
                _ => bail!("{}: expected yes or no, got {s:?}", raw.place("include_num_input_tokens_seen")),
            },
            Some(other) => {
                bail!("{}: expected yes or no, got {}", raw.place("include_num_input_tokens_seen"), show(&other))
            }
        };
        let output = raw.opt_str("output_dir")?;
        if do_train && output.is_none() {
            bail!("`do_train: true` needs `output_dir`: where the adapter, checkpoints and logs go");
        }
        let output_dir = output.map(PathBuf::from).unwrap_or_else(|| PathBuf::from("output"));
        let overwrite_output_dir = raw.bool("overwrite_output_dir")?;
        let resume = decide_resume(raw, do_train, &output_dir, overwrite_output_dir)?;
        let max_steps = raw.i64("max_steps")?;
        let num_train_epochs = raw.f64("num_train_epochs")?;
        if max_steps <= 0 && num_train_epochs <= 0.0 {
            bail!("{}: `num_train_epochs` must be positive (or set max_steps)", raw.place("num_train_epochs"));
        }
        let per_device_train_batch_size = raw.usize_at_least("per_device_train_batch_size", 1)?;
        let gradient_accumulation_steps = raw.usize_at_least("gradient_accumulation_steps", 1)?;
        if per_device_train_batch_size.checked_mul(gradient_accumulation_steps).is_none() {
            bail!(
                "{}: per_device_train_batch_size {per_device_train_batch_size} x gradient_accumulation_steps \
                 {gradient_accumulation_steps} samples per optimizer step is more than this machine can count\n  \
                 hint: lower gradient_accumulation_steps (LLaMA-Factory's examples use 1 to 16)",
                raw.place("gradient_accumulation_steps")
            );
        }
        let train = TrainPlan {
            output_dir,
            overwrite_output_dir,
            resume,
            per_device_train_batch_size,
            per_device_eval_batch_size: raw.usize_at_least("per_device_eval_batch_size", 1)?,
            gradient_accumulation_steps,
            learning_rate: non_negative_f64(raw, "learning_rate")?,
            weight_decay: non_negative_f64(raw, "weight_decay")?,
            adam_beta1: raw.f64("adam_beta1")?,
            adam_beta2: raw.f64("adam_beta2")?,
            adam_epsilon: raw.f64("adam_epsilon")?,
            max_grad_norm: raw.f64("max_grad_norm")?,
            num_train_epochs,
            max_steps,
            lr_scheduler,
            warmup,
            logging_strategy,
            logging_steps,
            logging_first_step: raw.bool("logging_first_step")?,
            save_strategy,
            save_steps,
            save_total_limit: raw.opt_usize_at_least("save_total_limit", 1)?,
            save_only_model: raw.bool("save_only_model")?,
            eval_strategy,
            eval_steps,
            seed,
            data_seed,
            bf16,
            use_cpu: raw.bool("use_cpu")?,
            dataloader_drop_last: raw.bool("dataloader_drop_last")?,
            plot_loss: raw.bool("plot_loss")?,
            compute_accuracy: raw.bool("compute_accuracy")?,
            disable_shuffling: raw.bool("disable_shuffling")?,
            include_num_input_tokens_seen: tokens_seen,
            gradient_checkpointing: match raw.get("disable_gradient_checkpointing") {
                Some(_) => Some(!raw.bool("disable_gradient_checkpointing")?),
                None => None,
            },
        };

        // ---- generation and export ----
        let num_beams = raw.usize_at_least("num_beams", 1)?;
        if num_beams > 1 {
            bail!("{}: beam search is not implemented; use num_beams: 1", raw.place("num_beams"));
        }
        let generation = GenerationPlan {
            do_sample: raw.bool("do_sample")?,
            temperature: non_negative_f64(raw, "temperature")?,
            top_p: raw.f64("top_p")?,
            top_k: raw.usize_at_least("top_k", 0)?,
            max_length: raw.usize_at_least("max_length", 1)?,
            max_new_tokens: raw.usize_at_least("max_new_tokens", 1)?,
            repetition_penalty: raw.f64("repetition_penalty")?,
            skip_special_tokens: raw.bool("skip_special_tokens")?,
        };
        let infer_dtype = raw.str("infer_dtype")?;
        if !matches!(infer_dtype.as_str(), "auto" | "float16" | "bfloat16" | "float32") {
            bail!("{}: expected auto, float16, bfloat16 or float32", raw.place("infer_dtype"));
        }
        let export = ExportPlan {
            export_dir: raw.opt_str("export_dir")?.map(PathBuf::from),
            export_size_gb: raw.usize_at_least("export_size", 1)?,
            infer_dtype,
        };

        Ok(Plan {
            source: raw.path.clone(),
            finetuning_type,
            model_name_or_path,
            adapter_name_or_path,
            quantization_bit,
            do_train,
            do_eval,
            data,
            lora,
            train,
            generation,
            export,
            notes,
        })
    }
}

fn non_negative(raw: &RawConfig, key: &str) -> Result<u64> {
    let v = raw.i64(key)?;
    if v < 0 {
        bail!("{}: must not be negative", raw.place(key));
    }
    Ok(v as u64)
}

fn non_negative_f64(raw: &RawConfig, key: &str) -> Result<f64> {
    let v = raw.f64(key)?;
    if v < 0.0 {
        bail!("{}: must not be negative, got {v}", raw.place(key));
    }
    Ok(v)
}

/// `logging_steps` / `save_steps` / `eval_steps`: HF accepts a fraction below 1, and above 1 only whole numbers.
fn steps_value(raw: &RawConfig, key: &str) -> Result<f64> {
    let v = raw.f64(key)?;
    if v < 0.0 || (v > 1.0 && v.fract() != 0.0) {
        bail!("{}: must be a whole number of steps, or a fraction below 1 of the total, got {v}", raw.place(key));
    }
    Ok(v)
}

fn interval(raw: &RawConfig, key: &str, epoch_ok: bool) -> Result<Interval> {
    let v = raw.str(key)?;
    match v.as_str() {
        "no" => Ok(Interval::No),
        "steps" => Ok(Interval::Steps),
        "epoch" if epoch_ok => Ok(Interval::Epoch),
        _ => bail!(
            "{}: `{v}` is not implemented; use {}",
            raw.place(key),
            if epoch_ok { "no, steps or epoch" } else { "steps or no" }
        ),
    }
}

/// LLaMA-Factory's resume rule: without `resume_from_checkpoint` and `overwrite_output_dir`, an output_dir holding
/// `checkpoint-N` folders resumes from the highest N; one holding weights but no checkpoint is refused.
fn decide_resume(raw: &RawConfig, do_train: bool, output_dir: &Path, overwrite: bool) -> Result<Resume> {
    if let Some(given) = raw.opt_str("resume_from_checkpoint")? {
        let p = PathBuf::from(&given);
        if !p.is_dir() {
            bail!("{}: checkpoint folder {given:?} not found", raw.place("resume_from_checkpoint"));
        }
        return Ok(Resume::Given(p));
    }
    if !do_train || overwrite || !output_dir.is_dir() {
        return Ok(Resume::Fresh);
    }
    if let Some(last) = last_checkpoint(output_dir)? {
        return Ok(Resume::Auto(last));
    }
    const WEIGHTS: [&str; 6] = [
        "adapter_model.safetensors",
        "adapter_model.bin",
        "model.safetensors.index.json",
        "model.safetensors",
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
    ];
    if WEIGHTS.iter().any(|w| output_dir.join(w).is_file()) {
        bail!(
            "output_dir {} already holds a trained model and no checkpoint-N to resume from\n  hint: set \
             `overwrite_output_dir: true` to train again there, or choose another output_dir",
            output_dir.display()
        );
    }
    Ok(Resume::Fresh)
}

/// The `checkpoint-N` folder with the highest N in `dir`.
pub fn last_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(n) = name.to_str().and_then(|s| s.strip_prefix("checkpoint-")).and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().is_dir() && best.as_ref().is_none_or(|(b, _)| n > *b) {
            best = Some((n, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// A path that must exist: as given (relative to the working directory, like LLaMA-Factory), else relative to
/// the config file's folder (noted), else `None`.
fn resolve_existing(p: &str, config_dir: Option<&Path>, notes: &mut Vec<String>) -> Option<PathBuf> {
    let path = expand_home(p);
    if path.exists() {
        return Some(path);
    }
    let beside = config_dir.filter(|_| path.is_relative()).map(|d| d.join(&path)).filter(|q| q.exists())?;
    notes.push(format!("{p:?} is not in the working directory; using {} next to the config", beside.display()));
    Some(beside)
}

/// A folder that may not exist yet (dataset_dir, media_dir): resolved like [`resolve_existing`], else as given.
fn resolve_dir(p: &str, config_dir: Option<&Path>, notes: &mut Vec<String>) -> PathBuf {
    resolve_existing(p, config_dir, notes).unwrap_or_else(|| expand_home(p))
}

fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.data;
        let t = &self.train;
        let l = &self.lora;
        writeln!(f, "model:      {}", self.model_name_or_path.display())?;
        if let Some(b) = self.quantization_bit {
            writeln!(f, "base:       frozen matrices in per-row int{b} (quantization_bit: {b}), LoRA in f32")?;
        }
        writeln!(f, "template:   {}", d.template.as_deref().unwrap_or("(from the checkpoint)"))?;
        writeln!(f, "datasets:   {} (dir {})", d.datasets.join(", "), d.dataset_dir.display())?;
        if !d.eval_datasets.is_empty() {
            writeln!(f, "eval:       {}", d.eval_datasets.join(", "))?;
        }
        writeln!(f, "cutoff_len: {}, image pixels {}..{}", d.cutoff_len, d.image_min_pixels, d.image_max_pixels)?;
        let target = match &l.target {
            LoraTarget::All => "all".to_string(),
            LoraTarget::Names(n) => n.join(","),
        };
        writeln!(
            f,
            "lora:       r={} alpha={} (scale {:.3}) dropout={} target={target}{}",
            l.rank,
            l.alpha,
            l.scale(),
            l.dropout,
            if l.use_rslora { " rslora" } else { "" }
        )?;
        writeln!(
            f,
            "optimizer:  AdamW lr={:e} wd={} schedule={} warmup={} max_grad_norm={}",
            t.learning_rate,
            t.weight_decay,
            t.lr_scheduler.name(),
            t.warmup,
            t.max_grad_norm
        )?;
        writeln!(
            f,
            "batches:    {} per step x {} accumulation = {} samples per optimizer step; {}",
            t.per_device_train_batch_size,
            t.gradient_accumulation_steps,
            t.per_device_train_batch_size * t.gradient_accumulation_steps,
            if t.max_steps > 0 {
                format!("max_steps {}", t.max_steps)
            } else {
                format!("{} epochs", t.num_train_epochs)
            }
        )?;
        writeln!(f, "output:     {}", t.output_dir.display())?;
        match &t.resume {
            Resume::Fresh => {}
            Resume::Given(p) => writeln!(f, "resume:     {}", p.display())?,
            Resume::Auto(p) => writeln!(
                f,
                "resume:     {} (last checkpoint in output_dir; set overwrite_output_dir: true to start over)",
                p.display()
            )?,
        }
        for n in &self.notes {
            writeln!(f, "note:       {n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> String {
        format!("{}/../../tests/fixtures/tiny-qwen3_5", env!("CARGO_MANIFEST_DIR"))
    }

    fn plan(yaml: &str) -> Result<Plan> {
        let text = format!("model_name_or_path: {}\n{yaml}", tiny());
        Plan::from_raw(&RawConfig::parse(&text, Path::new("t.yaml"), false)?)
    }

    #[test]
    fn defaults_follow_llamafactory() {
        let p = plan("").unwrap();
        assert_eq!(p.lora.rank, 8);
        assert_eq!(p.lora.alpha, 16.0);
        assert_eq!(p.lora.target, LoraTarget::All);
        assert_eq!(p.data.cutoff_len, 2048);
        assert_eq!(p.data.image_max_pixels, 768 * 768);
        assert_eq!(p.data.enable_thinking, Some(true));
        assert_eq!(p.train.learning_rate, 5e-5);
        assert_eq!(p.train.per_device_train_batch_size, 8);
        assert_eq!(p.train.lr_scheduler, Scheduler::Linear);
        assert!(p.lora.freeze_vision_tower);
    }

    #[test]
    fn cross_key_rules() {
        let err = plan("do_train: true\noutput_dir: /tmp/x\n").unwrap_err().to_string();
        assert!(err.contains("needs `dataset`"), "{err}");
        let err = plan("dataset: a\nval_size: 0.1\neval_dataset: b\n").unwrap_err().to_string();
        assert!(err.contains("val_size"), "{err}");
        let err = plan("stage: dpo\n").unwrap_err().to_string();
        assert!(err.contains("not implemented"), "{err}");
        let err = plan("eval_strategy: steps\n").unwrap_err().to_string();
        assert!(err.contains("eval_dataset"), "{err}");
        let p = plan("lora_rank: 16\nlora_alpha: 8\nwarmup_ratio: 0.1\n").unwrap();
        assert_eq!((p.lora.alpha, p.lora.scale(), p.train.warmup), (8.0, 0.5, 0.1));
    }

    #[test]
    fn unknown_template_is_an_error() {
        let err = format!("{:#}", plan("template: qwen2_5_vl\n").unwrap_err());
        assert!(err.contains("qwen2_vl") && err.contains("t.yaml:2:1"), "{err}");
    }
}
