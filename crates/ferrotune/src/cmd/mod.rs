//! One file per command, each a thin layer over ferrotune-core.

pub mod api;
pub mod bench;
pub mod chat;
pub mod data;
pub mod demo;
pub mod env;
pub mod eval;
pub mod export;
pub mod gpu_check;
pub mod serving;
pub mod train;

use anyhow::Result;
use ferrotune_core::config::{Plan, RawConfig};
use ferrotune_core::data::{prepare, Prepared};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::ConfigInput;

/// Rows above which the data pass shows a progress bar.
const PROGRESS_FROM_ROWS: usize = 2000;

/// One CPU compute thread per sample for a small model (see [`ferrotune_core::device::ONE_THREAD_MAX_HIDDEN`]),
/// with as many samples computed side by side as there are cores, unless `RAYON_NUM_THREADS` is set. Call it
/// before any compute: candle reads the variable at every matrix product, but rayon's global pool (our own
/// parallel loops) is sized from it once, on first use.
pub fn threads_for_model(config_json: Option<&[u8]>) {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    if let Some(h) = config_json.and_then(ferrotune_core::device::small_model_hidden) {
        std::env::set_var("RAYON_NUM_THREADS", "1");
        let cores = ferrotune_core::parallel::cores();
        ferrotune_core::parallel::set_global(cores);
        eprintln!(
            "small model (hidden size {h}): one CPU thread per sample, {cores} sample{} at a time (one operation is \
             too small to share between cores; RAYON_NUM_THREADS=N computes each sample on N threads instead)",
            if cores == 1 { "" } else { "s" }
        );
    }
}

/// [`threads_for_model`] for the checkpoint in `dir`.
pub fn threads_for_checkpoint(dir: &std::path::Path) {
    threads_for_model(std::fs::read(dir.join("config.json")).ok().as_deref());
}

/// Reads and validates the config.
pub fn load_plan(input: &ConfigInput) -> Result<Plan> {
    Plan::from_raw(&load_raw(input)?)
}

/// Reads the config file and applies the overrides (stage one; [`Plan::from_raw`] validates).
pub fn load_raw(input: &ConfigInput) -> Result<RawConfig> {
    if input.file.is_none() && input.overrides.is_empty() {
        anyhow::bail!("give a config file (train.yaml) or --key value flags; `ferrotune train --help` lists the keys");
    }
    let mut raw = match input.file.as_deref() {
        Some(p) => RawConfig::from_file(p)?,
        None => RawConfig::new(),
    };
    raw.apply_args(&input.overrides)?;
    Ok(raw)
}

/// Runs the data pass with a progress bar on stderr for large datasets.
pub fn prepare_with_progress(plan: &Plan) -> Result<Prepared> {
    with_progress(|progress| prepare(plan, progress))
}

/// Runs `f` with a row-progress callback that draws a bar on stderr for large datasets.
pub fn with_progress<T>(f: impl FnOnce(&(dyn Fn(usize, usize) + Sync)) -> Result<T>) -> Result<T> {
    let bar = ProgressBar::hidden();
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} rows ({per_sec}, {eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("checking rows");
    let progress = |done: usize, total: usize| {
        if total >= PROGRESS_FROM_ROWS && bar.is_hidden() && done < total {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let out = f(&progress);
    bar.finish_and_clear();
    out
}
