//! The training loop: [`run`] reads as the loop alone (epochs → accumulation windows → micro-batches → clip →
//! AdamW → schedule → log / evaluate / save); the set-up before it and the final files after it are functions of
//! their own.
//!
//! Semantics follow HF Trainer as LLaMA-Factory runs it for Qwen VLMs: each micro-batch's loss is the mean
//! token cross-entropy of that micro-batch, divided by the number of micro-batches in its accumulation window
//! (the last window of an epoch may be shorter); the logged loss is the mean over the steps since the last log;
//! the learning rate is stepped once per optimizer step.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Var};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Map, Value};

use super::batch::{epoch_order, label_tokens, micro_batch, FeatureCache, MicroBatch};
use super::checkpoint::{self, ResumeState, WeightsFiles};
use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use super::schedule::{Kind, Schedule};
use super::state::{append_trainer_log, console_line, round, write_json_atomic, TrainerState};
use super::step::{evaluate, window_backward, window_units, GradAccum, StepOptions};
use crate::config::{FinetuningType, LoraTarget, Plan, Resume, Scheduler, Steps};
use crate::data::{Prepared, Sample};
use crate::device::{self, DeviceSpec};
use crate::image::ImageProcessorConfig;
use crate::lora::{self, Init, LoraSpec, Targets};
use crate::models::qwen3_5::LayerType;
use crate::models::qwen3_5::Qwen3_5;
use crate::parallel::Workers;
use crate::weights::FrozenFormat;

/// Knobs of a run that are not LLaMA-Factory keys.
pub struct RunOptions<'a> {
    /// Set by a Ctrl-C handler: the loop saves a checkpoint and returns.
    pub stop: &'a AtomicBool,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Stop after this optimizer step (tests simulate a killed run with it).
    pub halt_after_step: Option<usize>,
    /// `--device`; None picks as [`device_for`] says.
    pub device: Option<DeviceSpec>,
    /// Who computes the samples of a step on a CPU; None: [`Workers::global`].
    pub workers: Option<&'a Workers>,
}

/// What a finished (or stopped) run reports.
#[derive(Debug)]
pub struct Outcome {
    pub global_step: usize,
    pub total_steps: usize,
    pub train_loss: f64,
    pub output_dir: PathBuf,
    /// True when the run ended early (Ctrl-C or `halt_after_step`) after saving a checkpoint.
    pub interrupted: bool,
    /// (step, loss) of every optimizer step, for tests and reports.
    pub step_losses: Vec<(usize, f64)>,
    /// Tokens of the training rows seen (padding excluded), resumed steps included.
    pub tokens_seen: u64,
}

/// The training device and compute dtype with a note for the log: `--device` when given, else the first GPU
/// (when built with CUDA and one is usable) unless `use_cpu`. On a GPU the base weights are in bf16 when `bf16`
/// is set (f32 otherwise); LoRA weights and optimizer state are always f32. The CPU computes in f32.
pub fn device_for(plan: &Plan, requested: Option<DeviceSpec>) -> Result<(Device, DType, String)> {
    let spec = match requested {
        Some(s) => s,
        None if plan.train.use_cpu => DeviceSpec::Cpu,
        None => DeviceSpec::Auto,
    };
    let mut why_cpu = String::new();
    let device = match spec {
        DeviceSpec::Auto if cfg!(feature = "cuda") => match device::open(DeviceSpec::Cuda(0)) {
            Ok(d) => d,
            Err(e) => {
                why_cpu = format!(" ({e:#})");
                Device::Cpu
            }
        },
        s => device::open(s)?,
    };
    if !device.is_cpu() {
        let dt = if plan.train.bf16 { DType::BF16 } else { DType::F32 };
        let mut note = format!(
            "{}: base weights in {}, LoRA weights and optimizer state in f32",
            device::describe(&device),
            device::dtype_name(dt)
        );
        if plan.train.use_cpu {
            note.push_str(" (--device overrides use_cpu: true)");
        }
        return Ok((device, dt, note));
    }
    let note = if plan.quantization_bit == Some(8) {
        "CPU: frozen base matrices quantized to per-row int8 at load (quantization_bit: 8), computing in f32"
            .to_string()
    } else if plan.train.bf16 {
        format!(
            "CPU: bf16 base weights stay as stored (bf16: true); frozen products in bf16 ({}), f32 accumulation, \
             the rest in f32",
            crate::nn::frozen::bf16_products_engine()
        )
    } else {
        "CPU: base weights converted to f32 (bf16: false), computing in f32".to_string()
    };
    Ok((Device::Cpu, DType::F32, format!("{note}{why_cpu}")))
}

/// How the base's frozen matrices are held: int8 with `quantization_bit: 8`; on the CPU `bf16: true` keeps a
/// 16-bit base as stored (half the memory of f32) and multiplies a bf16 one in bf16, as PyTorch's bf16 does.
pub fn frozen_format(plan: &Plan, device: &Device) -> FrozenFormat {
    match plan.quantization_bit {
        Some(8) => FrozenFormat::Int8,
        _ if device.is_cpu() && plan.train.bf16 => FrozenFormat::Bf16,
        _ => FrozenFormat::Compute,
    }
}

/// The LoRA target list of the plan as PEFT target names.
pub fn lora_spec(plan: &Plan) -> LoraSpec {
    let names: Vec<String> = match &plan.lora.target {
        LoraTarget::All => {
            let vision = if plan.lora.freeze_vision_tower { &[][..] } else { lora::VISION_LINEARS };
            lora::ALL_DECODER_LINEARS.iter().chain(vision).map(|s| s.to_string()).collect()
        }
        LoraTarget::Names(v) => v.clone(),
    };
    LoraSpec {
        r: plan.lora.rank,
        alpha: plan.lora.alpha,
        dropout: plan.lora.dropout as f32,
        use_rslora: plan.lora.use_rslora,
        targets: Targets::Modules(names),
    }
}

/// One line per target family: how many layers it matched, and what `all` would add.
fn describe_targets(adapted: &[String], n_layers: usize) -> String {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for p in adapted {
        let leaf = p.rsplit('.').next().unwrap_or(p).to_string();
        *counts.entry(leaf).or_default() += 1;
    }
    let list: Vec<String> = counts.iter().map(|(k, v)| format!("{k} ({v}/{n_layers} layers)")).collect();
    let missing: Vec<&str> = lora::ALL_DECODER_LINEARS.iter().copied().filter(|m| !counts.contains_key(*m)).collect();
    let mut s = format!("LoRA on {} modules: {}", adapted.len(), list.join(", "));
    if !missing.is_empty() {
        s.push_str(&format!("\n  not adapted: {} (`lora_target: all` adds them)", missing.join(", ")));
    }
    s
}

/// Trains according to `plan` on `data`. Returns after the last step, or early (with a checkpoint saved) when
/// `opts.stop` is set.
pub fn run(plan: &Plan, data: &Prepared, opts: &RunOptions) -> Result<Outcome> {
    let t = &plan.train;
    let out_dir = &t.output_dir;
    let Setup {
        mut model,
        spec,
        lora_modules,
        params,
        mut opt,
        train_embeddings,
        split,
        workers,
        steps,
        sched,
        checkpointing,
        keep_last,
        cache,
        processor,
        pad_id,
        mut state,
        mut rs,
    } = set_up(plan, data, opts)?;
    let train: &[Sample] = &data.train;
    let (total, bs, accum) = (steps.total_steps, t.per_device_train_batch_size, t.gradient_accumulation_steps);
    let bar = progress_bar(total, rs.global_step, opts.progress);
    let say = |line: String| if opts.progress { bar.println(line) } else { println!("{line}") };
    let build = |model: &Qwen3_5, idx: &[usize]| -> Result<MicroBatch> {
        let samples: Vec<&Sample> = idx.iter().map(|&i| &train[i]).collect();
        micro_batch(model, &processor, &samples, pad_id, cache.as_ref())
    };
    let log_path = out_dir.join("trainer_log.jsonl");
    let start = Instant::now();
    let mut acc = GradAccum::default();
    let mut step_losses = Vec::new();
    let mut interrupted = false;
    let batches_per_epoch = steps.batches_per_epoch;
    let (mut window_samples, mut window_tokens, mut window_start) = (0usize, 0usize, Instant::now());
    'epochs: for epoch in 0..steps.epochs {
        let order = epoch_order(train.len(), rs.seed, epoch, !t.disable_shuffling);
        let batches: Vec<&[usize]> = order.chunks(bs).take(batches_per_epoch).collect();
        let windows: Vec<&[&[usize]]> = batches.chunks(accum).collect();
        for (w, window) in windows.iter().enumerate() {
            let step_index = epoch * steps.steps_per_epoch + w; // optimizer step this window makes
            if step_index < rs.global_step {
                continue; // already trained before the resume point
            }
            if rs.global_step >= total {
                break 'epochs;
            }
            // Micro-batches of the window: forward + backward, gradients accumulate (samples side by side on the
            // sample workers; the sum is the window's gradient whatever their number).
            let units =
                window_units(window, |i| label_tokens(&train[i]), split, |j| (step_index as u64) << 16 | j as u64);
            let so = StepOptions { scale: 1.0, checkpointing, keep_last, train_embeddings, dropout_seed: 0 };
            let Some(losses) =
                window_backward(&model, &units, window.len(), &build, &params, &mut acc, so, &workers, opts.stop)?
            else {
                // The partial window is dropped: the checkpoint is at the last completed step.
                acc.take(&params);
                interrupted = true;
                break 'epochs;
            };
            let mut window_loss = 0.0;
            for (batch, loss) in window.iter().zip(&losses) {
                if !loss.is_finite() {
                    let rows: Vec<String> = batch.iter().map(|&i| train[i].source.to_string()).collect();
                    bail!(
                        "the loss became {loss} at step {} on {}; stopped without saving this step (the last checkpoint \
                         in {} is intact). Lower learning_rate or check those rows.",
                        step_index + 1,
                        rows.join(", "),
                        out_dir.display()
                    );
                }
                window_loss += loss / window.len() as f64;
                window_samples += batch.len();
                let tokens: usize = batch.iter().map(|&i| train[i].input_ids.len()).sum();
                window_tokens += tokens;
                rs.tokens_seen += tokens as u64;
            }
            // Optimizer step: clip, AdamW at this step's rate, schedule advances.
            let mut grads = acc.take(&params);
            let grad_norm = clip_grad_norm(&mut grads, t.max_grad_norm)?;
            let lr = sched.lr(step_index);
            opt.step(&grads, lr)?;
            rs.global_step = step_index + 1;
            rs.pending_loss += window_loss;
            rs.train_loss_sum += window_loss;
            step_losses.push((rs.global_step, window_loss));
            let last_batch = (w + 1) * accum - 1;
            state.global_step = rs.global_step;
            state.epoch = epoch as f64 + ((last_batch.min(batches.len() - 1)) + 1) as f64 / batches_per_epoch as f64;
            state.num_input_tokens_seen = rs.tokens_seen;

            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            bar.set_position(rs.global_step as u64);
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.2} samples/s {:.0} tok/s",
                window_loss,
                lr,
                window_samples as f64 / secs,
                window_tokens as f64 / secs
            ));
            (window_samples, window_tokens, window_start) = (0, 0, Instant::now());

            let done = rs.global_step >= total;
            let log_now = (steps.logging_steps > 0 && rs.global_step % steps.logging_steps == 0)
                || (t.logging_first_step && rs.global_step == 1)
                || done;
            if log_now && rs.global_step > rs.last_logged_step {
                let mut m = Map::new();
                // Unrounded, as transformers 5 logs it.
                m.insert("loss".into(), json!(rs.pending_loss / (rs.global_step - rs.last_logged_step) as f64));
                m.insert("grad_norm".into(), json!(grad_norm));
                m.insert("learning_rate".into(), json!(lr));
                let tokens = t.include_num_input_tokens_seen.then_some(rs.tokens_seen);
                log_event(m, &mut state, &log_path, total, start.elapsed().as_secs_f64(), tokens, &say)?;
                rs.pending_loss = 0.0;
                rs.last_logged_step = rs.global_step;
            }
            if let Some(every) = steps.eval_steps {
                if !data.eval.is_empty() && ((every > 0 && rs.global_step % every == 0) || done) {
                    let m =
                        eval_metrics(&model, &processor, &data.eval, t.per_device_eval_batch_size, pad_id, &workers)?;
                    log_event(m, &mut state, &log_path, total, start.elapsed().as_secs_f64(), None, &say)?;
                }
            }
            let halt = opts.halt_after_step == Some(rs.global_step);
            if (steps.save_steps > 0 && rs.global_step % steps.save_steps == 0 && !done) || halt {
                let files = weights_files(&mut model, plan, &spec, &lora_modules)?;
                let p = checkpoint::save(out_dir, &files, Some(&opt), &state, &rs)?;
                say(format!("saved {}", p.display()));
                if let Some(limit) = t.save_total_limit {
                    checkpoint::rotate(out_dir, limit)?;
                }
            }
            if halt {
                interrupted = true;
                break 'epochs;
            }
        }
    }
    bar.finish_and_clear();
    let train_loss = rs.train_loss_sum / rs.global_step.max(1) as f64;
    if !interrupted {
        let run = FinishedRun { spec: &spec, modules: &lora_modules, rs: &rs, runtime: start.elapsed().as_secs_f64() };
        finish(&mut model, plan, data, &run, &mut state, train_loss)?;
    } else if opts.halt_after_step.is_none() {
        let files = weights_files(&mut model, plan, &spec, &lora_modules)?;
        let p = checkpoint::save(out_dir, &files, Some(&opt), &state, &rs)?;
        println!("stopped: saved {} (resume by running the same command again)", p.display());
    }
    Ok(Outcome {
        global_step: rs.global_step,
        total_steps: total,
        train_loss,
        output_dir: out_dir.clone(),
        interrupted,
        step_losses,
        tokens_seen: rs.tokens_seen,
    })
}

/// What the loop works with, made by [`set_up`].
struct Setup {
    model: Qwen3_5,
    spec: LoraSpec,
    /// Paths of the adapted modules (empty for full fine-tuning).
    lora_modules: Vec<String>,
    params: Vec<Var>,
    opt: AdamW,
    /// Whether embeddings or the vision tower train, so that their forward must be tracked.
    train_embeddings: bool,
    /// On a CPU each sample of a micro-batch is computed alone (no padding, and side by side on the sample
    /// workers); a GPU takes the padded micro-batch in one go.
    split: bool,
    workers: Workers,
    steps: Steps,
    sched: Schedule,
    checkpointing: bool,
    /// With checkpointing, the last layers whose activations are kept.
    keep_last: usize,
    cache: Option<FeatureCache>,
    processor: ImageProcessorConfig,
    pad_id: u32,
    state: TrainerState,
    rs: ResumeState,
}

/// Everything before the first step, in the order the log shows it: the output folder, the model and its
/// trainable parameters, the plan summary, the disk-space check, the resumed state, the processor and pad token.
fn set_up(plan: &Plan, data: &Prepared, opts: &RunOptions) -> Result<Setup> {
    let t = &plan.train;
    let out_dir = &t.output_dir;
    // Output folder and what to resume from (the Plan applied LLaMA-Factory's rule).
    std::fs::create_dir_all(out_dir).with_context(|| format!("{}: cannot create output_dir", out_dir.display()))?;
    if t.overwrite_output_dir {
        let _ = std::fs::remove_file(out_dir.join("trainer_log.jsonl"));
    }
    let resume_from = match &t.resume {
        Resume::Fresh => None,
        Resume::Given(p) | Resume::Auto(p) => Some(p.clone()),
    };

    let Trainable { model, spec, lora_modules, vars, total_params } = trainable_model(plan, opts.device)?;
    // Full fine-tuning names weights `model.visual.…`, LoRA `base_model.model.model.visual.….lora_A.weight`: either
    // way the vision tower's forward must be tracked for them to get gradients.
    let train_embeddings = vars.iter().any(|(n, _, _)| n.contains("embed_tokens") || n.contains("model.visual."));
    let params: Vec<Var> = vars.iter().map(|(_, v, _)| v.clone()).collect();
    let trainable: usize = params.iter().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(
        AdamWConfig { beta1: t.adam_beta1, beta2: t.adam_beta2, eps: t.adam_epsilon, weight_decay: t.weight_decay },
        vars.clone(),
    )?;

    // Steps, schedule, the plan summary.
    let train: &[Sample] = &data.train;
    let split = model.device.is_cpu();
    let workers = match (split, opts.workers) {
        (false, _) => Workers::one(),
        (true, Some(w)) => w.clone(),
        (true, None) => Workers::global().clone(),
    };
    let steps = t.steps(train.len())?;
    let total = steps.total_steps;
    let bs = t.per_device_train_batch_size;
    let accum = t.gradient_accumulation_steps;
    let kind = match t.lr_scheduler {
        Scheduler::Linear => Kind::Linear,
        Scheduler::Cosine => Kind::Cosine,
        Scheduler::Constant => Kind::Constant,
        Scheduler::ConstantWithWarmup => Kind::ConstantWithWarmup,
    };
    let sched = Schedule { kind, peak: t.learning_rate, warmup: steps.warmup_steps, total };
    println!("***** Running training *****");
    println!("  Num examples = {}", train.len());
    // HF's count: ceil(num_train_epochs), or the epochs that max_steps spans when it is set.
    println!("  Num Epochs = {}", steps.epochs);
    println!("  Instantaneous batch size per device = {bs}");
    println!("  Total train batch size (w. parallel, distributed & accumulation) = {}", bs * accum);
    println!("  Gradient Accumulation steps = {accum}");
    println!("  Total optimization steps = {total}");
    println!(
        "  Number of trainable parameters = {trainable} ({:.4}% of {total_params})",
        100.0 * trainable as f64 / total_params.max(1) as f64
    );
    let longest = train.iter().map(|s| s.input_ids.len()).max().unwrap_or(0) * if split { 1 } else { bs };
    let recompute = checkpointing_choice(t.gradient_checkpointing, &model.cfg.text, longest, activation_budget()?);
    let (checkpointing, keep_last) = (recompute.checkpointing, recompute.keep_last);
    println!("  Gradient checkpointing = {}{}", if checkpointing { "on" } else { "off" }, recompute.why);
    if workers.count() > 1 {
        println!(
            "  Sample workers = {} (the samples of a step computed side by side, one thread each)",
            workers.count()
        );
    }
    // Host memory only: on a GPU the tower's forward is cheap and its memory is what limits a run.
    let cache = (!train_embeddings && model.device.is_cpu()).then(|| FeatureCache::new(FEATURE_CACHE_BYTES));
    if cache.is_some() && train.iter().any(|s| !s.images.is_empty()) {
        println!(
            "  Image features = computed once per picture and reused (the vision tower is frozen; up to {} MB kept)",
            FEATURE_CACHE_BYTES >> 20
        );
    }
    check_disk_space(plan, &steps, trainable)?;

    let (state, rs) = match &resume_from {
        Some(dir) => resume(plan, dir, &steps, &vars, &mut opt, &model.device)?,
        None => fresh_state(plan, &steps),
    };
    let processor = ImageProcessorConfig::from_dir(&plan.model_name_or_path)?;
    let tok = crate::tokenizer::Tokenizer::from_path(&plan.model_name_or_path)?;
    let pad_id = tok.token_id("<|endoftext|>").or(model.cfg.text.pad_token_id).unwrap_or(0);
    Ok(Setup {
        model,
        spec,
        lora_modules,
        params,
        opt,
        train_embeddings,
        split,
        workers,
        steps,
        sched,
        checkpointing,
        keep_last,
        cache,
        processor,
        pad_id,
        state,
        rs,
    })
}

/// The model on its device, with earlier adapters merged and what trains made trainable.
struct Trainable {
    model: Qwen3_5,
    spec: LoraSpec,
    /// Paths of the adapted modules (empty for full fine-tuning).
    lora_modules: Vec<String>,
    /// Trainable variables by checkpoint name, with whether weight decay applies.
    vars: Vec<(String, Var, bool)>,
    /// Parameters of the whole model, vision tower included.
    total_params: usize,
}

/// Loads the base, merges every adapter but the last, and attaches the LoRA (initialised from the last adapter
/// when there is one) or makes the unfrozen weights trainable.
fn trainable_model(plan: &Plan, requested: Option<DeviceSpec>) -> Result<Trainable> {
    let (device, dtype, device_note) = device_for(plan, requested)?;
    println!("{device_note}");
    let mut model = Qwen3_5::load_as(&plan.model_name_or_path, dtype, &device, frozen_format(plan, &device))?;
    let adapters = &plan.adapter_name_or_path;
    let (merge, resume_adapter) = match adapters.split_last() {
        Some((last, rest)) => (rest.to_vec(), Some(last.clone())),
        None => (vec![], None),
    };
    for dir in &merge {
        lora::Adapter::load(dir, &device)?.apply(model.linears_mut(), true)?;
        println!("merged adapter {} into the base", dir.display());
    }
    let total_params: usize = model.params_mut().iter().map(|(_, t, _)| t.elem_count()).sum();
    let spec = lora_spec(plan);
    let mut lora_modules = Vec::new();
    let vars: Vec<(String, Var, bool)> = match plan.finetuning_type {
        FinetuningType::Lora => {
            let init_map = match &resume_adapter {
                Some(dir) => {
                    let a = lora::Adapter::load(dir, &device)?;
                    println!("continuing training of adapter {}", dir.display());
                    a.weights
                        .iter()
                        .flat_map(|(m, (wa, wb))| {
                            [(lora::peft_key(m, "A"), wa.clone()), (lora::peft_key(m, "B"), wb.clone())]
                        })
                        .collect()
                }
                None => std::collections::HashMap::new(),
            };
            let init =
                if init_map.is_empty() { Init::Default { seed: plan.train.seed } } else { Init::From(&init_map) };
            let (vt, proj) = (!plan.lora.freeze_vision_tower, !plan.lora.freeze_multi_modal_projector);
            lora_modules = lora::attach(model.lora_candidates(vt, proj), &spec, &init, &device)?;
            if lora_modules.is_empty() {
                bail!("lora_target {:?} matches no module of this model; try `lora_target: all`", plan.lora.target);
            }
            println!("{}", describe_targets(&lora_modules, model.layers.len()));
            lora::trainable_vars(model.linears_mut()).into_iter().map(|(n, v)| (n, v, true)).collect()
        }
        FinetuningType::Full => {
            let frozen = |n: &str| {
                (plan.lora.freeze_vision_tower
                    && n.starts_with("model.visual.")
                    && !n.starts_with("model.visual.merger"))
                    || (plan.lora.freeze_multi_modal_projector && n.starts_with("model.visual.merger"))
            };
            // Frozen weights stay plain tensors: as variables the backward pass would compute their gradients (a
            // frozen tower's whole backward) only to drop them.
            model.make_trainable(|n| !frozen(n))?
        }
    };
    Ok(Trainable { model, spec, lora_modules, vars, total_params })
}

/// Checkpoints must fit on disk: refuse now rather than after hours of training.
fn check_disk_space(plan: &Plan, steps: &Steps, trainable: usize) -> Result<()> {
    let t = &plan.train;
    let ckpt_bytes =
        (trainable * 4 * 3 + if plan.finetuning_type == FinetuningType::Full { trainable * 2 } else { 0 }) as u64;
    if let Some(free) = crate::sys::free_bytes(&t.output_dir) {
        let n_ckpt =
            (steps.total_steps / steps.save_steps.max(1)).min(t.save_total_limit.unwrap_or(usize::MAX)).max(1) as u64;
        if free < ckpt_bytes * (n_ckpt + 1) {
            bail!(
                "{}: {:.1} MB free, but {} checkpoint(s) of {:.1} MB each plus the final weights are planned; free \
                 space, lower save_total_limit, or raise save_steps",
                t.output_dir.display(),
                free as f64 / 1e6,
                n_ckpt,
                ckpt_bytes as f64 / 1e6
            );
        }
    }
    Ok(())
}

/// Reads the checkpoint in `dir` into `vars` and `opt`; returns its trainer and loop state.
fn resume(
    plan: &Plan,
    dir: &Path,
    steps: &Steps,
    vars: &[(String, Var, bool)],
    opt: &mut AdamW,
    device: &Device,
) -> Result<(TrainerState, ResumeState)> {
    let weights_file =
        if plan.finetuning_type == FinetuningType::Lora { "adapter_model.safetensors" } else { "model.safetensors" };
    let loaded = checkpoint::load(dir, weights_file, device)?;
    if loaded.resume.seed != plan.train.seed {
        println!("note: the checkpoint was trained with seed {}, continuing with its data order", loaded.resume.seed);
    }
    for (name, var, _) in vars {
        let w = loaded.weights.get(name).with_context(|| format!("{}: checkpoint has no {name}", dir.display()))?;
        var.set(&w.to_dtype(var.dtype())?)?;
    }
    match &loaded.optimizer {
        Some(o) => opt.load_state(o, &dir.join("optimizer.safetensors"))?,
        None => {
            bail!("{}: no optimizer.safetensors (saved with save_only_model?); cannot resume exactly", dir.display())
        }
    }
    println!("resuming from {} at step {}/{}", dir.display(), loaded.resume.global_step, steps.total_steps);
    Ok((loaded.trainer_state, loaded.resume))
}

/// The trainer and loop state of a run from step 0.
fn fresh_state(plan: &Plan, steps: &Steps) -> (TrainerState, ResumeState) {
    let t = &plan.train;
    let state = TrainerState {
        max_steps: steps.total_steps,
        num_train_epochs: steps.epochs as f64,
        logging_steps: t.logging_steps,
        save_steps: t.save_steps,
        eval_steps: t.eval_steps,
        train_batch_size: t.per_device_train_batch_size,
        ..Default::default()
    };
    let rs = ResumeState {
        global_step: 0,
        total_steps: steps.total_steps,
        seed: t.seed,
        pending_loss: 0.0,
        last_logged_step: 0,
        train_loss_sum: 0.0,
        tokens_seen: 0,
    };
    (state, rs)
}

/// The progress bar of the optimizer steps (drawn only with `progress`), at `position` for a resumed run.
fn progress_bar(total: usize, position: usize, progress: bool) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_draw_target(if progress { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() });
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(position as u64);
    bar
}

/// The eval metrics of one evaluation, as HF Trainer logs them.
fn eval_metrics(
    model: &Qwen3_5,
    processor: &ImageProcessorConfig,
    eval: &[Sample],
    batch_size: usize,
    pad_id: u32,
    workers: &Workers,
) -> Result<Map<String, Value>> {
    let (eval_loss, secs) = evaluate(model, processor, eval, batch_size, pad_id, workers)?;
    let mut m = Map::new();
    m.insert("eval_loss".into(), json!(eval_loss));
    m.insert("eval_runtime".into(), json!(round(secs, 4)));
    m.insert("eval_samples_per_second".into(), json!(round(eval.len() as f64 / secs, 3)));
    m.insert("eval_steps_per_second".into(), json!(round(eval.len().div_ceil(batch_size) as f64 / secs, 3)));
    Ok(m)
}

/// One log event: the console line, an entry of `log_history`, a line of `trainer_log.jsonl`.
fn log_event(
    mut m: Map<String, Value>,
    state: &mut TrainerState,
    log_path: &Path,
    total: usize,
    elapsed: f64,
    tokens: Option<u64>,
    say: &dyn Fn(String),
) -> Result<()> {
    m.insert("epoch".into(), json!(state.epoch));
    say(console_line(&m));
    let mut entry = m.clone();
    entry.insert("step".into(), json!(state.global_step));
    state.log_history.push(Value::Object(entry));
    append_trainer_log(log_path, state.global_step, total, &m, state.epoch, elapsed, tokens)
}

/// Feature bytes a training run keeps for a frozen vision tower ([`FeatureCache`]).
const FEATURE_CACHE_BYTES: usize = 512 << 20;

/// Activations of one micro-batch kept in the backward pass when the config leaves checkpointing to ferrotune
/// (`FERROTUNE_ACTIVATION_BUDGET_MB` overrides it): all of them when they fit (no recomputation), else those of as
/// many last layers as fit, the others recomputed. Below this the memory saved is small next to the weights, and
/// recomputing costs a second forward pass.
pub const ACTIVATION_BUDGET_BYTES: u64 = 512 << 20;

/// The activation budget: `FERROTUNE_ACTIVATION_BUDGET_MB` when set to a number, else
/// [`ACTIVATION_BUDGET_BYTES`].
pub fn activation_budget() -> Result<u64> {
    match std::env::var("FERROTUNE_ACTIVATION_BUDGET_MB") {
        Ok(v) => v.trim().parse::<u64>().map(|mb| mb << 20).map_err(|_| {
            anyhow::anyhow!("FERROTUNE_ACTIVATION_BUDGET_MB={v:?}: give a whole number of MiB (e.g. 2048), or unset it")
        }),
        Err(_) => Ok(ACTIVATION_BUDGET_BYTES),
    }
}

/// An estimate of the activations the backward pass keeps for `tokens` tokens with every layer's activations kept
/// (f32): the sum of [`layer_activation_bytes`].
pub fn activation_bytes(cfg: &crate::models::qwen3_5::config::TextConfig, tokens: usize) -> u64 {
    cfg.layer_types.iter().map(|&kind| layer_activation_bytes(cfg, kind, tokens)).sum()
}

/// Activations one decoder layer keeps for `tokens` tokens (f32): per token 60 vectors of the hidden size, 20 of
/// the MLP width and 12 of the Gated-DeltaNet projections' width (every intermediate of the graph, the chunked
/// delta rule's included), plus a full-attention layer's scores. Calibrated on a 135M model (h 576, 30 layers),
/// where keeping them for a 264-token sample took 2.1 GB more peak RSS than recomputing, and on the 4B shapes,
/// where each kept layer took 510 MB at 264 tokens.
pub fn layer_activation_bytes(cfg: &crate::models::qwen3_5::config::TextConfig, kind: LayerType, tokens: usize) -> u64 {
    let (t, h, f) = (tokens as u64, cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let gdn = 2
        * (cfg.linear_num_key_heads * cfg.linear_key_head_dim + cfg.linear_num_value_heads * cfg.linear_value_head_dim)
            as u64;
    let scores = if matches!(kind, LayerType::Full) { 3 * cfg.num_attention_heads as u64 * t * t } else { 0 };
    4 * (t * (60 * h + 20 * f + 12 * gdn) + scores)
}

/// How the backward pass treats activations (for the step and the plan summary).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recompute {
    pub checkpointing: bool,
    /// With checkpointing, layers at the end whose activations are kept.
    pub keep_last: usize,
    pub why: String,
}

/// As the config says when it sets `disable_gradient_checkpointing`; else within `budget` bytes for the longest
/// micro-batch: nothing recomputed when everything fits, otherwise the last layers that fit keep their
/// activations and the others are recomputed.
pub fn checkpointing_choice(
    configured: Option<bool>,
    cfg: &crate::models::qwen3_5::config::TextConfig,
    longest_tokens: usize,
    budget: u64,
) -> Recompute {
    if let Some(on) = configured {
        return Recompute { checkpointing: on, keep_last: 0, why: " (disable_gradient_checkpointing)".into() };
    }
    let bytes = activation_bytes(cfg, longest_tokens);
    let mb = |b: u64| b as f64 / 1e6;
    let limit = budget >> 20;
    if bytes <= budget {
        return Recompute {
            checkpointing: false,
            keep_last: 0,
            why: format!(
                " (activations of the longest micro-batch ~{:.0} MB fit the {limit} MiB budget: recomputing would \
                 only cost time; FERROTUNE_ACTIVATION_BUDGET_MB sets the budget, disable_gradient_checkpointing: false \
                 recomputes every layer)",
                mb(bytes)
            ),
        };
    }
    let (mut kept, mut keep_last) = (0u64, 0usize);
    for &kind in cfg.layer_types.iter().rev() {
        let b = layer_activation_bytes(cfg, kind, longest_tokens);
        if kept + b > budget {
            break;
        }
        kept += b;
        keep_last += 1;
    }
    let n = cfg.layer_types.len();
    let which = if keep_last == 0 {
        format!(
            "every layer recomputed (one layer's ~{:.0} MB is over",
            mb(layer_activation_bytes(cfg, cfg.layer_types[n - 1], longest_tokens))
        )
    } else {
        format!(
            "layers 0–{} recomputed, {}–{} keep theirs (~{:.0} MB, within",
            n - keep_last - 1,
            n - keep_last,
            n - 1,
            mb(kept)
        )
    };
    Recompute {
        checkpointing: true,
        keep_last,
        why: format!(
            " (activations of the longest micro-batch ~{:.0} MB: {which} the {limit} MiB budget; \
             FERROTUNE_ACTIVATION_BUDGET_MB sets it, disable_gradient_checkpointing: true keeps all)",
            mb(bytes)
        ),
    }
}

/// The weights part of a checkpoint or of the final output.
fn weights_files(model: &mut Qwen3_5, plan: &Plan, spec: &LoraSpec, modules: &[String]) -> Result<WeightsFiles> {
    let base = plan.model_name_or_path.display().to_string();
    Ok(match plan.finetuning_type {
        FinetuningType::Lora => WeightsFiles {
            tensors: lora::adapter_tensors(model.linears_mut())?,
            file_name: "adapter_model.safetensors",
            json: vec![("adapter_config.json", lora::adapter_config_json(spec, modules, &base))],
            copy_from: None,
        },
        FinetuningType::Full => {
            let dtype = match crate::weights::Checkpoint::open(&plan.model_name_or_path)?
                .info("model.language_model.embed_tokens.weight")
            {
                Some((_, dt)) => dt,
                None => DType::BF16,
            };
            let mut cfg = crate::weights::read_config_json(&plan.model_name_or_path)?;
            cfg["dtype"] = json!(device::dtype_name(dtype));
            WeightsFiles {
                tensors: model.state_dict(dtype)?,
                file_name: "model.safetensors",
                json: vec![("config.json", cfg)],
                copy_from: Some(plan.model_name_or_path.clone()),
            }
        }
    })
}

/// What the final files need to know about a finished run.
struct FinishedRun<'a> {
    spec: &'a LoraSpec,
    modules: &'a [String],
    rs: &'a ResumeState,
    /// Seconds of the loop.
    runtime: f64,
}

/// Final files: weights, tokenizer and chat template, results JSON, trainer_state, loss plots.
fn finish(
    model: &mut Qwen3_5,
    plan: &Plan,
    data: &Prepared,
    run: &FinishedRun,
    state: &mut TrainerState,
    train_loss: f64,
) -> Result<()> {
    let FinishedRun { spec, modules, rs, runtime } = *run;
    let out = &plan.train.output_dir;
    let files = weights_files(model, plan, spec, modules)?;
    crate::weights::save_safetensors(&files.tensors, &out.join(files.file_name))?;
    for (name, v) in &files.json {
        write_json_atomic(&out.join(name), v)?;
    }
    crate::weights::copy_tokenizer_files(&plan.model_name_or_path, out)?;
    // The template the model was trained with, as a Jinja chat template, so serving and export render prompts
    // exactly as training did.
    let render = plan.data.render_options();
    std::fs::write(out.join("chat_template.jinja"), crate::template::to_jinja(data.template.template, &render))
        .with_context(|| format!("{}: cannot write chat_template.jinja", out.display()))?;
    let steps_per_s = rs.global_step as f64 / runtime.max(1e-9);
    let samples_per_s =
        (rs.global_step * plan.train.per_device_train_batch_size * plan.train.gradient_accumulation_steps) as f64
            / runtime.max(1e-9);
    let mut results = Map::new();
    results.insert("epoch".into(), json!(round(state.epoch, 4)));
    results.insert("total_flos".into(), json!(0.0));
    results.insert("train_loss".into(), json!(train_loss));
    results.insert("train_runtime".into(), json!(round(runtime, 4)));
    results.insert("train_samples_per_second".into(), json!(round(samples_per_s, 3)));
    results.insert("train_steps_per_second".into(), json!(round(steps_per_s, 3)));
    if let Some(rss) = crate::sys::peak_rss_bytes() {
        results.insert("train_peak_rss_gb".into(), json!(round(rss as f64 / 1e9, 3)));
    }
    let mut final_entry = results.clone();
    final_entry.insert("step".into(), json!(rs.global_step));
    state.log_history.push(Value::Object(final_entry));
    // LLaMA-Factory's LogCallback writes a line for the summary log too: no metric of its own, just the progress.
    let (step, total) = (rs.global_step, state.max_steps);
    append_trainer_log(&out.join("trainer_log.jsonl"), step, total, &Map::new(), state.epoch, runtime, None)?;
    state.save(&out.join("trainer_state.json"))?;
    write_json_atomic(&out.join("train_results.json"), &Value::Object(results.clone()))?;
    let mut all = results;
    if let Some(last_eval) = state.log_history.iter().rev().find(|e| e.get("eval_loss").is_some()) {
        for k in ["eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"] {
            if let Some(v) = last_eval.get(k) {
                all.insert(k.into(), v.clone());
            }
        }
    }
    write_json_atomic(&out.join("all_results.json"), &Value::Object(all))?;
    write_model_card(out, plan)?;
    if plan.train.plot_loss {
        let (loss, eval) = state.curves();
        let name = out.display().to_string();
        if !loss.is_empty() {
            crate::plot::line_chart(
                &out.join("training_loss.png"),
                &format!("training loss of {name}"),
                "loss",
                &loss,
            )?;
        }
        if !eval.is_empty() {
            crate::plot::line_chart(
                &out.join("training_eval_loss.png"),
                &format!("training eval_loss of {name}"),
                "eval_loss",
                &eval,
            )?;
        }
    }
    println!("***** train metrics *****");
    println!("  train_loss = {train_loss:.4}");
    println!("  train_runtime = {}", super::state::hms(runtime));
    println!("  train_samples_per_second = {samples_per_s:.3}");
    println!(
        "saved the {} to {}",
        if plan.finetuning_type == FinetuningType::Lora { "adapter" } else { "model" },
        out.display()
    );
    Ok(())
}

fn write_model_card(out: &Path, plan: &Plan) -> Result<()> {
    let base = plan.model_name_or_path.display();
    let kind = match plan.finetuning_type {
        FinetuningType::Lora => "lora",
        FinetuningType::Full => "full",
    };
    let datasets = plan.data.datasets.join(", ");
    let text = format!(
        "---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- ferrotune\n- {kind}\n---\n\n# {}\n\nFine-tuned from \
         `{base}` with ferrotune ({kind}) on {datasets}.\n\nServe it with:\n\n```sh\nferrotune api \
         --model_name_or_path {base} --adapter_name_or_path {}\n```\n",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("model"),
        out.display()
    );
    std::fs::write(out.join("README.md"), text).with_context(|| format!("{}: cannot write README.md", out.display()))
}
