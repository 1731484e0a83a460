//! Running models over a held-out split: eval loss / perplexity on the reference answers, and greedy answers
//! generated with the same settings for every model, from exactly the prompts training used.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::data::Sample;
use crate::infer::{AdapterMode, Engine, GenerateRequest, Prompt, SamplingParams};
use crate::models::qwen3_5::VisionInput;
use crate::tokenizer::Tokenizer;
use crate::weights::FrozenFormat;

/// One model to evaluate: a checkpoint plus adapters (none for the base).
#[derive(Clone, Debug)]
pub struct Candidate {
    pub name: String,
    pub model_dir: PathBuf,
    pub adapters: Vec<PathBuf>,
    /// How the base's frozen matrices are held (int8 with `quantization_bit: 8`).
    pub format: FrozenFormat,
}

/// One held-out example: the prompt as training encoded it, the reference answer and the row's labels.
#[derive(Clone, Debug)]
pub struct Item {
    pub sample: Sample,
    pub prompt_ids: Vec<u32>,
    pub prompt_text: String,
    pub reference: String,
    /// The row's optional `attributes` object (structured labels for attribute accuracy).
    pub attributes: Option<serde_json::Value>,
}

/// Builds eval items from encoded samples: the prompt is everything before the last trained answer, the
/// reference is that answer (without the end-of-turn tokens). Only the tokenizer is needed: no weights load.
pub fn items(samples: &[Sample], tokenizer: &Tokenizer) -> Result<Vec<Item>> {
    let mut rows_cache: std::collections::HashMap<PathBuf, Vec<serde_json::Value>> = Default::default();
    let mut out = Vec::with_capacity(samples.len());
    for s in samples {
        let labelled: Vec<usize> = (0..s.labels.len()).filter(|&i| s.labels[i] != -100).collect();
        let Some(&last) = labelled.last() else { continue };
        let mut start = last;
        while start > 0 && s.labels[start - 1] != -100 {
            start -= 1;
        }
        let prompt_ids = s.input_ids[..start].to_vec();
        let answer: Vec<u32> = s.input_ids[start..=last].to_vec();
        let reference = tokenizer.decode(&answer, true)?.trim_end().to_string();
        let prompt_text = tokenizer.decode(&prompt_ids, false)?;
        // The optional per-row `attributes` object, read back from the source file.
        let rows = match rows_cache.get(&s.source.file) {
            Some(r) => r,
            None => {
                let rows = crate::data::read::read_rows(&s.source.file)?.into_iter().map(|r| r.value).collect();
                rows_cache.entry(s.source.file.clone()).or_insert(rows)
            }
        };
        let attributes = rows.get(s.source.row).and_then(|r| r.get("attributes")).cloned();
        out.push(Item { sample: s.clone(), prompt_ids, prompt_text, reference, attributes });
    }
    Ok(out)
}

/// What one model did on the split.
#[derive(Clone, Debug)]
pub struct ModelRun {
    pub name: String,
    pub eval_loss: f64,
    pub perplexity: f64,
    pub predictions: Vec<String>,
    pub generate_seconds: f64,
    pub generated_tokens: usize,
}

/// Images of a sample, decoded and pre-resized exactly as for training.
fn vision(engine: &Engine, s: &Sample) -> Result<Option<VisionInput>> {
    if s.images.is_empty() {
        return Ok(None);
    }
    let pixels = crate::train::batch::sample_pixels(&engine.processor, s)?;
    Ok(Some(crate::train::batch::vision_input(pixels, &engine.model.device)?))
}

/// Evaluates one candidate: loss on the references, then a greedy answer per item (`max_new_tokens`).
pub fn run_model(candidate: &Candidate, items: &[Item], max_new_tokens: usize, progress: bool) -> Result<ModelRun> {
    let adapters: Vec<&Path> = candidate.adapters.iter().map(PathBuf::as_path).collect();
    let workers = crate::parallel::Workers::global();
    let engine = Engine::load_as(
        &candidate.model_dir,
        &adapters,
        AdapterMode::Merge,
        DType::F32,
        &Device::Cpu,
        candidate.format,
    )
    .with_context(|| format!("loading {}", candidate.name))?;
    let pad = engine.tokenizer.token_id("<|endoftext|>").unwrap_or(0);
    let samples: Vec<Sample> = items.iter().map(|i| i.sample.clone()).collect();
    let (eval_loss, _) = crate::train::step::evaluate(&engine.model, &engine.processor, &samples, 1, pad, workers)?;
    let bar = ProgressBar::new(items.len() as u64);
    bar.set_draw_target(if progress { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() });
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("generating ({})", candidate.name));
    let req = GenerateRequest { sampling: SamplingParams::default(), max_tokens: max_new_tokens, stop: vec![] };
    let t0 = Instant::now();
    // Greedy answers are independent per item: the sample workers take them side by side, in item order.
    let answers = workers.map(items, |item| {
        let prompt = Prompt { ids: item.prompt_ids.clone(), images: vision(&engine, &item.sample)? };
        let g = engine.generate(&prompt, &req, |_| true)?;
        bar.inc(1);
        Ok((g.text.trim().to_string(), g.token_ids.len()))
    })?;
    let generated_tokens = answers.iter().map(|a| a.1).sum();
    let predictions = answers.into_iter().map(|a| a.0).collect();
    bar.finish_and_clear();
    Ok(ModelRun {
        name: candidate.name.clone(),
        eval_loss,
        perplexity: eval_loss.exp(),
        predictions,
        generate_seconds: t0.elapsed().as_secs_f64(),
        generated_tokens,
    })
}

/// Options of a comparison.
pub struct CompareOptions {
    pub max_new_tokens: usize,
    /// Examples shown in report.md.
    pub report_examples: usize,
    pub progress: bool,
    pub title: String,
}

/// The result of comparing models on one split.
pub struct Comparison {
    pub models: Vec<String>,
    /// (metric, value) per model, in `models` order.
    pub metrics: Vec<Vec<(String, f64)>>,
    pub files: super::ReportFiles,
    pub runs: Vec<ModelRun>,
}

impl Comparison {
    /// The value of `metric` for model `m`.
    pub fn get(&self, m: usize, metric: &str) -> Option<f64> {
        self.metrics.get(m)?.iter().find(|(n, _)| n == metric).map(|x| x.1)
    }
}

/// Attributes scored by default: what a description of the demo's robots must get right.
pub const CORE_ATTRIBUTES: [&str; 4] = ["colour", "head", "arms", "locomotion"];

/// Runs every candidate on `items` and writes the side-by-side report into `out_dir`.
pub fn compare(candidates: &[Candidate], items: &[Item], opts: &CompareOptions, out_dir: &Path) -> Result<Comparison> {
    let mut runs = Vec::new();
    for c in candidates {
        runs.push(run_model(c, items, opts.max_new_tokens, opts.progress)?);
    }
    report_runs(runs, items, opts, out_dir)
}

/// Scores finished runs (one per model, same items) and writes the side-by-side report into `out_dir`.
pub fn report_runs(runs: Vec<ModelRun>, items: &[Item], opts: &CompareOptions, out_dir: &Path) -> Result<Comparison> {
    use super::attributes::{accuracy, extract, Attributes};
    use super::metrics::{corpus, score_all};
    let labels: Vec<String> = items.iter().map(|i| i.reference.clone()).collect();
    let wanted: Vec<Option<Attributes>> =
        items.iter().map(|i| i.attributes.as_ref().and_then(|a| serde_json::from_value(a.clone()).ok())).collect();
    let mut metrics = Vec::new();
    for run in &runs {
        let text = corpus(&score_all(&run.predictions, &labels));
        // Attribute accuracy over the rows that carry labels.
        let (pred, lab): (Vec<Attributes>, Vec<Attributes>) = run
            .predictions
            .iter()
            .zip(&wanted)
            .filter_map(|(p, w)| w.as_ref().map(|w| (extract(p), w.clone())))
            .unzip();
        let acc = if lab.is_empty() { vec![] } else { accuracy(&pred, &lab) };
        let mut m = super::metrics_row(Some(run.eval_loss), Some(&text), &acc);
        let core: Vec<f64> = acc.iter().filter(|a| CORE_ATTRIBUTES.contains(&a.key)).map(|a| a.percent()).collect();
        if !core.is_empty() {
            m.push(("acc_core_mean".into(), core.iter().sum::<f64>() / core.len() as f64));
        }
        metrics.push(m);
    }
    let models: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    let examples: Vec<super::ReportExample> = items
        .iter()
        .enumerate()
        .map(|(k, it)| super::ReportExample {
            image: it.sample.images.first().cloned(),
            prompt: it.prompt_text.clone(),
            reference: it.reference.clone(),
            answers: runs.iter().map(|r| r.predictions[k].clone()).collect(),
        })
        .collect();
    let report = super::Report {
        title: &opts.title,
        models: &models,
        metrics: &metrics,
        examples: &examples,
        n_examples: opts.report_examples,
    };
    let files = super::write_report(out_dir, &report)?;
    Ok(Comparison { models, metrics, files, runs })
}
