//! The pre-flight check: every row of every dataset is read, converted, its images looked at and encoded, and
//! the outcome is a [`Report`] (kept / dropped rows with reasons and places, missing images, token lengths,
//! over-cutoff counts, planned steps) plus the samples training consumes. `ferrotune data check` prints the
//! report; `train` runs the same function and refuses to start on bad rows unless told to skip them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::convert::{convert, uses_role_content, Conversation};
use super::encode::{encode, EncodeOptions, Encoded, Lengths, RowRef, Sample, VisionIds};
use super::info::{resolve, DatasetAttr, Tags};
use super::media::{image_size, resolve_image};
use super::read::{read_rows, Row};
use crate::config::{Packing, Plan, RawConfig, Steps};
use crate::image::{preresize, ImageProcessorConfig};
use crate::template::{choose, ChatEncoder, CheckpointInfo, Choice};
use crate::tokenizer::Tokenizer;

/// Why a row is not in the training set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IssueKind {
    /// The row is malformed (format, roles, placeholders, ...): an error.
    BadRow,
    /// An image file is missing or unreadable: an error.
    Image { path: PathBuf },
    /// cutoff_len would cut an image: dropped (an error with `--strict`).
    ImageOverCutoff { needed: usize },
}

#[derive(Clone, Debug)]
pub struct RowIssue {
    pub at: RowRef,
    pub kind: IssueKind,
    pub reason: String,
}

impl RowIssue {
    /// Errors stop training unless bad rows are skipped; image-over-cutoff drops only with `strict`.
    pub fn is_error(&self, strict: bool) -> bool {
        match self.kind {
            IssueKind::ImageOverCutoff { .. } => strict,
            _ => true,
        }
    }
}

/// Summary statistics of one length distribution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dist {
    pub max: usize,
    pub p50: usize,
    pub p95: usize,
    pub mean: usize,
}

impl Dist {
    fn of(mut v: Vec<usize>) -> Dist {
        if v.is_empty() {
            return Dist::default();
        }
        v.sort_unstable();
        // Nearest-rank percentiles.
        let pct = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Dist { max: v[v.len() - 1], p50: pct(0.5), p95: pct(0.95), mean: v.iter().sum::<usize>() / v.len() }
    }
}

/// Per-dataset counts.
#[derive(Clone, Debug)]
pub struct DatasetSummary {
    pub name: String,
    pub origin: String,
    pub files: Vec<PathBuf>,
    pub rows: usize,
    pub kept: usize,
    pub eval: bool,
}

/// What the pre-flight check found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub template: String,
    pub notes: Vec<String>,
    pub datasets: Vec<DatasetSummary>,
    pub issues: Vec<RowIssue>,
    pub cutoff_len: usize,
    /// Token lengths of kept samples before truncation.
    pub text_tokens: Dist,
    pub image_tokens: Dist,
    pub total_tokens: Dist,
    /// Kept samples longer than cutoff_len (truncated as LLaMA-Factory does).
    pub truncated: usize,
    /// The longest kept samples, for memory planning.
    pub longest: Vec<(RowRef, usize)>,
    pub train_samples: usize,
    pub eval_samples: usize,
    /// With packing: (training samples, the rows they were packed into, tokens a row holds at most).
    pub packed: Option<(usize, usize, usize)>,
    pub steps: Option<Steps>,
}

impl Report {
    pub fn errors(&self, strict: bool) -> usize {
        self.issues.iter().filter(|i| i.is_error(strict)).count()
    }

    pub fn dropped(&self) -> usize {
        self.issues.iter().filter(|i| matches!(i.kind, IssueKind::ImageOverCutoff { .. })).count()
    }
}

/// The output of the data stage.
pub struct Prepared {
    pub train: Vec<Sample>,
    pub eval: Vec<Sample>,
    pub template: Choice,
    pub report: Report,
}

/// `ferrotune data check`: validates the config into a plan, then [`prepare`]s its data (the report includes
/// the optimizer steps its training samples make). The command prints the plan's notes and the report.
pub fn check_config(raw: &RawConfig, progress: &(dyn Fn(usize, usize) + Sync)) -> Result<(Plan, Prepared)> {
    let plan = Plan::from_raw(raw)?;
    let prepared = prepare(&plan, progress)?;
    Ok((plan, prepared))
}

/// Reads, validates and encodes the plan's datasets. Problems with single rows go into the report; problems
/// with the setup (missing dataset_info.json, bad checkpoint, malformed JSON) are errors. `progress` is called
/// with (rows done, rows total).
pub fn prepare(plan: &Plan, progress: &(dyn Fn(usize, usize) + Sync)) -> Result<Prepared> {
    let d = &plan.data;
    let info = CheckpointInfo::read(&plan.model_name_or_path)?;
    let choice = choose(d.template.as_deref(), &info)?;
    let tok = Tokenizer::from_path(&plan.model_name_or_path)?;
    let vision = if info.has_vision { Some(ImageProcessorConfig::from_dir(&plan.model_name_or_path)?) } else { None };
    let options = d.render_options();
    let enc = ChatEncoder::new(choice.template, &tok, &options)?;
    let ctx = RowChecker {
        enc: &enc,
        vision: vision.as_ref(),
        vision_ids: if info.has_vision { Some(VisionIds::from_tokenizer(&tok)?) } else { None },
        media_dir: &d.media_dir,
        max_pixels: d.image_max_pixels,
        min_pixels: d.image_min_pixels,
        opts: EncodeOptions {
            cutoff_len: d.sample_cutoff(),
            train_on_prompt: d.train_on_prompt,
            mask_history: d.mask_history,
        },
    };

    let train_sets = resolve(&d.datasets, &d.dataset_dir)?;
    let eval_sets = resolve(&d.eval_datasets, &d.dataset_dir)?;
    let mut report =
        Report { template: choice.template.name.to_string(), cutoff_len: d.cutoff_len, ..Report::default() };
    if let Some(n) = &choice.note {
        report.notes.push(n.clone());
    }
    // Read everything first so the progress total is known.
    let mut loaded = Vec::new();
    for (attr, is_eval) in train_sets.into_iter().map(|a| (a, false)).chain(eval_sets.into_iter().map(|a| (a, true))) {
        let rows = load_rows(&attr, d.max_samples, d.seed)?;
        loaded.push((attr, rows, is_eval));
    }
    let total_rows: usize = loaded.iter().map(|(_, r, _)| r.len()).sum();
    let done = AtomicUsize::new(0);
    progress(0, total_rows);

    let mut train = Vec::new();
    let mut eval = Vec::new();
    let mut all_lengths = Vec::new();
    for (attr, rows, is_eval) in loaded {
        let tags = if !attr.tags_given
            && attr.formatting != super::info::Formatting::Alpaca
            && uses_role_content(rows.iter().map(|(_, r)| &r.value), &attr)
        {
            report.notes.push(format!(
                "dataset `{}`: messages use role/content keys; read them as OpenAI-style messages \
                 (user/assistant/system). LLaMA-Factory needs a `tags` block in dataset_info.json for this",
                attr.name
            ));
            Tags::openai()
        } else {
            attr.tags.clone()
        };
        let outcomes: Vec<(RowRef, RowOutcome)> = rows
            .par_iter()
            .map(|(file, row)| {
                let at = RowRef { dataset: attr.name.clone(), file: file.clone(), row: row.index, line: row.line };
                let r = ctx.row(&row.value, &attr, &tags, &at);
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_multiple_of(64) || n == total_rows {
                    progress(n, total_rows);
                }
                (at, r)
            })
            .collect();
        let mut kept = 0;
        let mut added = 0;
        for (at, r) in outcomes {
            match r {
                Ok(KeptRow { sample, lengths, placeholders_added }) => {
                    kept += 1;
                    added += usize::from(placeholders_added);
                    all_lengths.push((at.clone(), lengths));
                    if is_eval {
                        eval.push(sample);
                    } else {
                        train.push(sample);
                    }
                }
                Err((kind, reason)) => report.issues.push(RowIssue { at, kind, reason }),
            }
        }
        if added > 0 {
            report.notes.push(format!(
                "dataset `{}`: {added} row(s) have images but no `<image>` placeholder; one placeholder per image was \
                 put before the first user message (as LLaMA-Factory's chat API does). Write `<image>` where the image \
                 belongs to place it yourself",
                attr.name
            ));
        }
        report.datasets.push(DatasetSummary {
            name: attr.name.clone(),
            origin: attr.origin.clone(),
            files: attr.files.clone(),
            rows: rows.len(),
            kept,
            eval: is_eval,
        });
    }
    progress(total_rows, total_rows);

    // Packing comes before the split, as in LLaMA-Factory (its packed rows are what val_size holds out).
    if d.packing != Packing::Off {
        let neat = d.packing == Packing::Neat;
        let (samples, cap) = (train.len(), d.sample_cutoff());
        train = super::pack::pack(train, cap, neat);
        eval = super::pack::pack(eval, cap, neat);
        report.packed = Some((samples, train.len(), cap));
    }

    // Held-out split (val_size) as datasets' train_test_split(test_size, seed) does it: numpy's permutation of the
    // rows, its first rows held out; both splits keep the permuted order (the training order under
    // disable_shuffling).
    let held = d.val_size.held_out(train.len());
    if held > 0 {
        if held >= train.len() {
            anyhow::bail!("val_size leaves no training samples ({} usable rows)", train.len());
        }
        let order = super::numpy_rng::permutation(d.seed, train.len());
        let mut slots: Vec<Option<Sample>> = train.into_iter().map(Some).collect();
        let mut take = |i: usize| slots[i].take().expect("a permutation names each row once");
        eval.extend(order[..held].iter().map(|&i| take(i)));
        train = order[held..].iter().map(|&i| take(i)).collect();
    }

    report.text_tokens = Dist::of(all_lengths.iter().map(|(_, l)| l.total - l.image).collect());
    report.image_tokens = Dist::of(all_lengths.iter().map(|(_, l)| l.image).collect());
    report.total_tokens = Dist::of(all_lengths.iter().map(|(_, l)| l.total).collect());
    report.truncated = all_lengths.iter().filter(|(_, l)| l.truncated).count();
    all_lengths.sort_by_key(|(_, l)| std::cmp::Reverse(l.total));
    report.longest = all_lengths.iter().take(3).map(|(r, l)| (r.clone(), l.total)).collect();
    report.train_samples = train.len();
    report.eval_samples = eval.len();
    if !train.is_empty() {
        report.steps = Some(plan.train.steps(train.len())?);
    }
    Ok(Prepared { train, eval, template: choice, report })
}

/// A usable row, or why it is not.
type RowOutcome = Result<KeptRow, (IssueKind, String)>;

struct KeptRow {
    sample: Sample,
    lengths: Lengths,
    /// `<image>` placeholders were added to this row.
    placeholders_added: bool,
}

struct RowChecker<'a> {
    enc: &'a ChatEncoder<'a>,
    vision: Option<&'a ImageProcessorConfig>,
    vision_ids: Option<VisionIds>,
    media_dir: &'a Path,
    max_pixels: u64,
    min_pixels: u64,
    opts: EncodeOptions,
}

impl RowChecker<'_> {
    /// One row, end to end.
    fn row(&self, value: &serde_json::Value, attr: &DatasetAttr, tags: &Tags, at: &RowRef) -> RowOutcome {
        let conv: Conversation = convert(value, attr, tags).map_err(|r| (IssueKind::BadRow, r))?;
        let mut images = Vec::with_capacity(conv.images.len());
        let mut tokens = Vec::with_capacity(conv.images.len());
        let mut sizes = Vec::with_capacity(conv.images.len());
        if !conv.images.is_empty() {
            let Some(vision) = self.vision else {
                return Err((IssueKind::BadRow, "the row has images but the checkpoint has no vision tower".into()));
            };
            for (i, written) in conv.images.iter().enumerate() {
                let path = resolve_image(written, self.media_dir);
                let (w, h) = image_size(&path).map_err(|why| {
                    let tried = if path == self.media_dir.join(written) {
                        path.display().to_string()
                    } else {
                        format!("{} (also looked for {})", path.display(), self.media_dir.join(written).display())
                    };
                    (IssueKind::Image { path: path.clone() }, format!("image {i} {written:?}: {why}: {tried}"))
                })?;
                let (pw, ph) = preresize(w, h, self.max_pixels, self.min_pixels);
                let n = vision
                    .num_image_tokens(ph as usize, pw as usize)
                    .map_err(|e| (IssueKind::Image { path: path.clone() }, format!("image {i} {written:?}: {e}")))?;
                images.push(path);
                sizes.push((pw, ph));
                tokens.push(n);
            }
        }
        let encoded = encode(self.enc, &conv, &tokens, self.vision_ids, self.opts)
            .map_err(|e| (IssueKind::BadRow, format!("{e:#}")))?;
        match encoded {
            Encoded::Kept { input_ids, labels, lengths } => {
                if !labels.iter().any(|&l| l != super::encode::IGNORE_INDEX) {
                    return Err((
                        IssueKind::BadRow,
                        format!(
                            "nothing to train on: after cutting to cutoff_len {} no answer token is left",
                            self.opts.cutoff_len
                        ),
                    ));
                }
                let sample = Sample {
                    input_ids,
                    labels,
                    images,
                    image_sizes: sizes,
                    image_tokens: tokens,
                    source: at.clone(),
                    segments: vec![],
                };
                Ok(KeptRow { sample, lengths, placeholders_added: conv.placeholders_added })
            }
            Encoded::ImageOverCutoff { needed, image_tokens } => Err((
                IssueKind::ImageOverCutoff { needed },
                format!(
                    "needs {needed} tokens ({image_tokens} of them image tokens) but cutoff_len is {}; cutting would \
                     split an image, so the row is dropped. Raise cutoff_len to {needed} or lower image_max_pixels",
                    self.opts.cutoff_len
                ),
            )),
        }
    }
}

/// The rows of a dataset's files, with `num_samples` drawn and `max_samples` applied (first N, per dataset).
fn load_rows(attr: &DatasetAttr, max_samples: Option<usize>, seed: u64) -> Result<Vec<(PathBuf, Row)>> {
    let mut rows = Vec::new();
    for f in &attr.files {
        let file_rows = read_rows(f).with_context(|| format!("dataset `{}`", attr.name))?;
        rows.extend(file_rows.into_iter().map(|r| (f.clone(), r)));
    }
    if let Some(n) = attr.num_samples {
        // Every row once (in a seeded random order), then random extra rows when n exceeds the count.
        let mut rng = StdRng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.shuffle(&mut rng);
        order.truncate(n);
        while order.len() < n && !rows.is_empty() {
            order.push(rng.random_range(0..rows.len()));
        }
        rows = order.into_iter().map(|i| rows[i].clone()).collect();
    }
    if let Some(m) = max_samples {
        rows.truncate(m);
    }
    Ok(rows)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "template: {}", self.template)?;
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        writeln!(f)?;
        writeln!(f, "datasets:")?;
        for d in &self.datasets {
            writeln!(
                f,
                "  {}{}: {} rows, {} kept ({})",
                d.name,
                if d.eval { " [eval]" } else { "" },
                d.rows,
                d.kept,
                d.origin
            )?;
        }
        let errors = self.issues.iter().filter(|i| i.is_error(false)).count();
        let dropped = self.dropped();
        let rows: usize = self.datasets.iter().map(|d| d.rows).sum();
        let kept: usize = self.datasets.iter().map(|d| d.kept).sum();
        writeln!(f, "rows: {rows} read, {kept} kept, {errors} with errors, {dropped} dropped (image over cutoff_len)")?;
        // Errors first (they stop training), then the rows dropped for cutoff_len, each in row order.
        let (errs, drops): (Vec<&RowIssue>, Vec<&RowIssue>) = self.issues.iter().partition(|i| i.is_error(false));
        if !errs.is_empty() {
            writeln!(f)?;
            writeln!(f, "errors ({}):", errs.len())?;
            for i in errs.iter().take(50) {
                writeln!(f, "  {}: {}", i.at, i.reason)?;
            }
            if errs.len() > 50 {
                let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
                for i in &errs[50..] {
                    let k = if matches!(i.kind, IssueKind::Image { .. }) { "image problems" } else { "bad rows" };
                    *by_kind.entry(k).or_default() += 1;
                }
                let rest: Vec<String> = by_kind.iter().map(|(k, n)| format!("{n} {k}")).collect();
                writeln!(f, "  ... and {} more: {}", errs.len() - 50, rest.join(", "))?;
            }
            let images: Vec<&PathBuf> = errs
                .iter()
                .filter_map(|i| match &i.kind {
                    IssueKind::Image { path } => Some(path),
                    _ => None,
                })
                .collect();
            if !images.is_empty() {
                writeln!(f, "images missing or unreadable ({}):", images.len())?;
                for p in images.iter().take(50) {
                    writeln!(f, "  {}", p.display())?;
                }
            }
        }
        if !drops.is_empty() {
            writeln!(f)?;
            writeln!(f, "dropped: cutoff_len {} would cut an image ({} rows):", self.cutoff_len, drops.len())?;
            for i in drops.iter().take(10) {
                writeln!(f, "  {}: {}", i.at, i.reason)?;
            }
            let most = drops
                .iter()
                .filter_map(|i| match i.kind {
                    IssueKind::ImageOverCutoff { needed } => Some(needed),
                    _ => None,
                })
                .max()
                .unwrap_or(0);
            if drops.len() > 10 {
                writeln!(f, "  ... and {} more; cutoff_len {most} keeps them all", drops.len() - 10)?;
            }
        }
        if kept > 0 {
            writeln!(f)?;
            writeln!(f, "tokens per sample (before cutoff):  max    p50    p95   mean")?;
            for (name, d) in [("text", self.text_tokens), ("image", self.image_tokens), ("total", self.total_tokens)] {
                writeln!(f, "  {name:<33}{:>5} {:>6} {:>6} {:>6}", d.max, d.p50, d.p95, d.mean)?;
            }
            writeln!(
                f,
                "over cutoff_len {}: {} truncated (text only), {dropped} dropped",
                self.cutoff_len, self.truncated
            )?;
            if let Some((r, n)) = self.longest.first() {
                writeln!(f, "longest: {n} tokens at {r}")?;
            }
        }
        writeln!(f)?;
        if let Some((samples, rows, cap)) = self.packed {
            writeln!(f, "packing: {samples} samples packed into {rows} rows of at most {cap} tokens")?;
        }
        writeln!(f, "samples: {} train, {} eval", self.train_samples, self.eval_samples)?;
        if let Some(s) = &self.steps {
            writeln!(
                f,
                "steps: {} per epoch x {} epochs = {} optimizer steps ({} samples per step, {} warmup)",
                s.steps_per_epoch, s.epochs, s.total_steps, s.effective_batch, s.warmup_steps
            )?;
        }
        Ok(())
    }
}
