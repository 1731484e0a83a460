//! `checkpoint-N/` folders: written under a temporary name and renamed, so a run killed at any moment leaves
//! every finished checkpoint intact. They hold the weights (PEFT adapter, or a full checkpoint), the optimizer
//! moments, `trainer_state.json` and `ferrotune_state.json` (what resuming needs beyond HF's files).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::optim::AdamW;
use super::state::{write_json_atomic, TrainerState};

/// What `ferrotune_state.json` records.
#[derive(Clone, Debug, PartialEq)]
pub struct ResumeState {
    pub global_step: usize,
    pub total_steps: usize,
    pub seed: u64,
    /// Σ loss since the last log line, and the step of that line (so resumed logs equal uninterrupted ones).
    pub pending_loss: f64,
    pub last_logged_step: usize,
    pub train_loss_sum: f64,
    pub tokens_seen: u64,
}

impl ResumeState {
    fn to_json(&self) -> Value {
        json!({
            "global_step": self.global_step,
            "total_steps": self.total_steps,
            "seed": self.seed,
            "pending_loss": self.pending_loss,
            "last_logged_step": self.last_logged_step,
            "train_loss_sum": self.train_loss_sum,
            "tokens_seen": self.tokens_seen,
        })
    }

    fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let u = |k: &str| v.get(k).and_then(|x| x.as_u64()).with_context(|| format!("{}: no `{k}`", path.display()));
        let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).with_context(|| format!("{}: no `{k}`", path.display()));
        let s = Self {
            global_step: u("global_step")? as usize,
            total_steps: u("total_steps")? as usize,
            seed: u("seed")?,
            pending_loss: f("pending_loss")?,
            last_logged_step: u("last_logged_step")? as usize,
            train_loss_sum: f("train_loss_sum")?,
            tokens_seen: u("tokens_seen")?,
        };
        if s.last_logged_step > s.global_step {
            bail!(
                "{}: `last_logged_step` {} is after `global_step` {}; the file is damaged: resume from another \
                 checkpoint-N, or start over with overwrite_output_dir: true",
                path.display(),
                s.last_logged_step,
                s.global_step
            );
        }
        Ok(s)
    }
}

/// Files that make up the weights part of a checkpoint.
pub struct WeightsFiles {
    /// name -> tensor, written to `file_name` (adapter_model.safetensors or model.safetensors).
    pub tensors: HashMap<String, Tensor>,
    pub file_name: &'static str,
    /// Extra JSON files (adapter_config.json or config.json).
    pub json: Vec<(&'static str, Value)>,
    /// Folder to copy tokenizer / processor / chat-template files from (full checkpoints need them to load).
    pub copy_from: Option<PathBuf>,
}

/// Writes `checkpoint-<step>` in `output_dir` atomically; returns its path.
pub fn save(
    output_dir: &Path,
    weights: &WeightsFiles,
    optimizer: Option<&AdamW>,
    trainer_state: &TrainerState,
    resume: &ResumeState,
) -> Result<PathBuf> {
    let final_dir = output_dir.join(format!("checkpoint-{}", resume.global_step));
    let tmp = output_dir.join(format!(".checkpoint-{}.partial", resume.global_step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot clear", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    crate::weights::save_safetensors(&weights.tensors, &tmp.join(weights.file_name))?;
    for (name, v) in &weights.json {
        write_json_atomic(&tmp.join(name), v)?;
    }
    if let Some(src) = &weights.copy_from {
        crate::weights::copy_tokenizer_files(src, &tmp)?;
    }
    if let Some(opt) = optimizer {
        crate::weights::save_safetensors(&opt.state_tensors()?, &tmp.join("optimizer.safetensors"))?;
    }
    trainer_state.save(&tmp.join("trainer_state.json"))?;
    write_json_atomic(&tmp.join("ferrotune_state.json"), &resume.to_json())?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).with_context(|| format!("{}: cannot replace", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir).with_context(|| format!("{}: cannot rename into place", final_dir.display()))?;
    Ok(final_dir)
}

/// Deletes the oldest checkpoints beyond `limit`.
pub fn rotate(output_dir: &Path, limit: usize) -> Result<Vec<PathBuf>> {
    let mut all = list(output_dir)?;
    let mut removed = Vec::new();
    while all.len() > limit {
        let (_, p) = all.remove(0);
        std::fs::remove_dir_all(&p).with_context(|| format!("{}: cannot delete", p.display()))?;
        removed.push(p);
    }
    Ok(removed)
}

/// `checkpoint-N` folders of `output_dir` sorted by N.
pub fn list(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut v = Vec::new();
    if !output_dir.is_dir() {
        return Ok(v);
    }
    for e in std::fs::read_dir(output_dir).with_context(|| format!("{}: cannot list", output_dir.display()))? {
        let p = e?.path();
        if let Some(n) = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("checkpoint-")) {
            if let Ok(n) = n.parse::<usize>() {
                if p.is_dir() {
                    v.push((n, p));
                }
            }
        }
    }
    v.sort();
    Ok(v)
}

/// A checkpoint read back for resuming.
pub struct Loaded {
    pub weights: HashMap<String, Tensor>,
    pub optimizer: Option<HashMap<String, Tensor>>,
    pub trainer_state: TrainerState,
    pub resume: ResumeState,
}

pub fn load(dir: &Path, file_name: &str, device: &Device) -> Result<Loaded> {
    let rs_path = dir.join("ferrotune_state.json");
    if !rs_path.exists() {
        bail!(
            "{}: not a ferrotune checkpoint (no ferrotune_state.json); resume from a checkpoint-N folder that \
             ferrotune wrote, or start over with overwrite_output_dir: true",
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&rs_path)?;
    let resume = ResumeState::from_json(&serde_json::from_str(&text)?, &rs_path)?;
    let wpath = dir.join(file_name);
    let weights = candle_core::safetensors::load(&wpath, device)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", wpath.display()))?;
    let opath = dir.join("optimizer.safetensors");
    let optimizer = if opath.exists() {
        Some(
            candle_core::safetensors::load(&opath, device)
                .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", opath.display()))?,
        )
    } else {
        None
    };
    let trainer_state = TrainerState::load(&dir.join("trainer_state.json"))?;
    Ok(Loaded { weights, optimizer, trainer_state, resume })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_step_after_the_global_step_is_an_error() {
        let rs = ResumeState {
            global_step: 4,
            total_steps: 10,
            seed: 1,
            pending_loss: 0.0,
            last_logged_step: 2,
            train_loss_sum: 0.0,
            tokens_seen: 0,
        };
        let path = Path::new("checkpoint-4/ferrotune_state.json");
        assert_eq!(ResumeState::from_json(&rs.to_json(), path).unwrap(), rs);
        let mut bad = rs.to_json();
        bad["last_logged_step"] = 9.into();
        let err = format!("{:#}", ResumeState::from_json(&bad, path).unwrap_err());
        assert!(err.contains("ferrotune_state.json") && err.contains("`last_logged_step` 9"), "{err}");
    }
}
