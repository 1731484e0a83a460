//! The files a training run writes besides weights, in the formats HF Trainer and LLaMA-Factory use:
//! `trainer_state.json` (TrainerState with `log_history`), `trainer_log.jsonl` (LLaMA-Factory's LogCallback),
//! `train_results.json` / `all_results.json`, and the console line `{'loss': …, 'grad_norm': …, …}`.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

/// (step, value) points of a logged metric.
pub type Curve = Vec<(f64, f64)>;

/// HF TrainerState, the subset that has meaning here; serialised with HF's key names.
#[derive(Clone, Debug, Default)]
pub struct TrainerState {
    pub global_step: usize,
    pub max_steps: usize,
    pub epoch: f64,
    pub num_train_epochs: f64,
    pub logging_steps: f64,
    pub save_steps: f64,
    pub eval_steps: Option<f64>,
    pub train_batch_size: usize,
    pub num_input_tokens_seen: u64,
    pub log_history: Vec<Value>,
}

impl TrainerState {
    pub fn to_json(&self) -> Value {
        json!({
            "best_global_step": null,
            "best_metric": null,
            "best_model_checkpoint": null,
            "epoch": self.epoch,
            "eval_steps": self.eval_steps,
            "global_step": self.global_step,
            "is_hyper_param_search": false,
            "is_local_process_zero": true,
            "is_world_process_zero": true,
            "log_history": self.log_history,
            "logging_steps": self.logging_steps,
            "max_steps": self.max_steps,
            "num_input_tokens_seen": self.num_input_tokens_seen,
            "num_train_epochs": self.num_train_epochs,
            "save_steps": self.save_steps,
            "stateful_callbacks": {"TrainerControl": {"args": {
                "should_epoch_stop": false, "should_evaluate": false, "should_log": false,
                "should_save": true, "should_training_stop": self.global_step >= self.max_steps
            }, "attributes": {}}},
            "total_flos": 0.0,
            "train_batch_size": self.train_batch_size,
            "trial_name": null,
            "trial_params": null
        })
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let f = |k: &str| v.get(k).and_then(|x| x.as_f64());
        Ok(Self {
            global_step: v.get("global_step").and_then(|x| x.as_u64()).context("trainer_state.json: no global_step")?
                as usize,
            max_steps: v.get("max_steps").and_then(|x| x.as_u64()).unwrap_or(0) as usize,
            epoch: f("epoch").unwrap_or(0.0),
            num_train_epochs: f("num_train_epochs").unwrap_or(0.0),
            logging_steps: f("logging_steps").unwrap_or(0.0),
            save_steps: f("save_steps").unwrap_or(0.0),
            eval_steps: f("eval_steps"),
            train_batch_size: v.get("train_batch_size").and_then(|x| x.as_u64()).unwrap_or(1) as usize,
            num_input_tokens_seen: v.get("num_input_tokens_seen").and_then(|x| x.as_u64()).unwrap_or(0),
            log_history: v.get("log_history").and_then(|x| x.as_array()).cloned().unwrap_or_default(),
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        write_json_atomic(path, &self.to_json())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}:{}:{}: invalid JSON: {e}", path.display(), e.line(), e.column()))?;
        Self::from_json(&v)
    }

    /// `(step, loss)` of the training entries, and `(step, eval_loss)` of the evaluation entries.
    pub fn curves(&self) -> (Curve, Curve) {
        let pick = |key: &str| -> Vec<(f64, f64)> {
            self.log_history.iter().filter_map(|e| Some((e.get("step")?.as_f64()?, e.get(key)?.as_f64()?))).collect()
        };
        (pick("loss"), pick("eval_loss"))
    }
}

/// Writes JSON through a temporary file and a rename, so readers never see half a file.
pub fn write_json_atomic(path: &Path, v: &Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

/// `H:MM:SS` as Python prints a timedelta of whole seconds.
pub fn hms(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// Appends one LLaMA-Factory LogCallback line to `trainer_log.jsonl` (keys with no value are omitted).
#[allow(clippy::too_many_arguments)]
pub fn append_trainer_log(
    path: &Path,
    step: usize,
    total: usize,
    metrics: &Map<String, Value>,
    epoch: f64,
    elapsed: f64,
    tokens: Option<u64>,
) -> Result<()> {
    let mut line = Map::new();
    line.insert("current_steps".into(), step.into());
    line.insert("total_steps".into(), total.into());
    // LogCallback's keys only (the eval timings and grad_norm stay in trainer_state.json).
    for (from, to) in [
        ("loss", "loss"),
        ("eval_loss", "eval_loss"),
        ("predict_loss", "predict_loss"),
        ("reward", "reward"),
        ("rewards/accuracies", "accuracy"),
        ("learning_rate", "lr"),
    ] {
        if let Some(v) = metrics.get(from) {
            line.insert(to.into(), v.clone());
        }
    }
    line.insert("epoch".into(), json!(epoch));
    let pct = if total > 0 { round(step as f64 / total as f64 * 100.0, 2) } else { 0.0 };
    line.insert("percentage".into(), json!(pct));
    line.insert("elapsed_time".into(), hms(elapsed).into());
    let remaining = if step > 0 { elapsed / step as f64 * (total.saturating_sub(step)) as f64 } else { 0.0 };
    line.insert("remaining_time".into(), hms(remaining).into());
    if let Some(t) = tokens {
        line.insert("throughput".into(), json!(round(t as f64 / elapsed.max(1e-9), 2)));
        line.insert("total_tokens".into(), t.into());
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("{}: cannot append", path.display()))?;
    writeln!(f, "{}", Value::Object(line))?;
    Ok(())
}

pub fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// Python's `f"{x:.4g}"`, as HF's progress callback prints metrics.
pub fn g4(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let exp = x.abs().log10().floor() as i32;
    if !(-4..4).contains(&exp) {
        let s = format!("{:.3e}", x);
        // Rust prints 1.234e-5; Python prints 1.234e-05 and trims trailing zeros of the mantissa.
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let m = if m.contains('.') { m.trim_end_matches('0').trim_end_matches('.') } else { m };
        let e: i32 = e.parse().unwrap_or(0);
        return format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    let decimals = (3 - exp).max(0) as usize;
    let s = format!("{:.*}", decimals, x);
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// The console line HF prints for a log event: `{'loss': '1.234', 'grad_norm': '0.5', …}`.
pub fn console_line(metrics: &Map<String, Value>) -> String {
    let parts: Vec<String> = metrics
        .iter()
        .map(|(k, v)| match v.as_f64() {
            Some(x) => format!("'{k}': '{}'", g4(x)),
            None => format!("'{k}': {v}"),
        })
        .collect();
    format!("{{{}}}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_formats() {
        // As printed by HF's progress callback in the reference runs.
        assert_eq!(g4(13.4612), "13.46");
        assert_eq!(g4(0.005), "0.005");
        assert_eq!(g4(0.004962), "0.004962");
        assert_eq!(g4(3.798061746947995e-05), "3.798e-05");
        assert_eq!(g4(0.0005849), "0.0005849");
        assert_eq!(g4(1.0), "1");
        assert_eq!(g4(7.917), "7.917");
        assert_eq!(g4(12345.0), "1.234e+04");
        assert_eq!(hms(4042.0), "1:07:22");
        assert_eq!(hms(59.6), "0:01:00");
    }

    #[test]
    fn trainer_log_line_has_llamafactory_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("trainer_log.jsonl");
        let mut m = Map::new();
        m.insert("loss".into(), json!(4.169));
        m.insert("grad_norm".into(), json!(1.5));
        m.insert("learning_rate".into(), json!(2.25e-6));
        append_trainer_log(&p, 10, 93, &m, 0.329, 242.0, None).unwrap();
        let line: Value = serde_json::from_str(std::fs::read_to_string(&p).unwrap().trim()).unwrap();
        assert_eq!(line["current_steps"], 10);
        assert_eq!(line["total_steps"], 93);
        assert_eq!(line["loss"], 4.169);
        assert_eq!(line["lr"], 2.25e-6);
        assert_eq!(line["epoch"], 0.329);
        assert_eq!(line["percentage"], 10.75);
        assert_eq!(line["elapsed_time"], "0:04:02");
        assert_eq!(line["remaining_time"], "0:33:29");
        assert!(line.get("grad_norm").is_none(), "LLaMA-Factory keeps grad_norm out of trainer_log.jsonl");
    }
}
