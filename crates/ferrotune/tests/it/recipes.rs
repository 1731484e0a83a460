//! `ferrotune train` against LLaMA-Factory 0.9.5 (`llamafactory-cli train`, tools/golden/gen_recipes.py) on the
//! recipes users run: batch 1 × accumulation 4; batch 2 × accumulation 2 (padding, two images of different sizes
//! in one row, text-only rows); batch 4 with `val_size` and `eval_steps`; cosine with warmup, clipping and
//! `max_steps`. Both start from the same LoRA adapter and read the same train.yaml; the command runs as a user
//! runs it, and its log_history, trainer_log.jsonl and final adapter are compared with LLaMA-Factory's.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// Loss, grad_norm and eval_loss: relative. LLaMA-Factory ran in f32 on the same weights (an exact f32 copy of
/// the bf16 checkpoint); what remains is summation order.
const REL: f64 = 1e-4;
/// Learning rates are arithmetic on the step count: equal to rounding.
const LR_ABS: f64 = 1e-9;
/// The final adapter, per tensor, relative L2.
const ADAPTER_REL: f64 = 1e-4;

fn recipes() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden/recipes")
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn num(v: &Value, key: &str, what: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{what}: no number `{key}` in {v}"))
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

struct Worst(Vec<(String, f64)>);

impl Worst {
    fn see(&mut self, what: &str, err: f64, bound: f64, ctx: &str) {
        assert!(err <= bound, "{ctx}: {what} off by {err:e} (bound {bound:e})");
        match self.0.iter_mut().find(|(n, _)| n == what) {
            Some((_, w)) => *w = w.max(err),
            None => self.0.push((what.to_string(), err)),
        }
    }
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
    let d = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    d / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt().max(1e-30)
}

fn run_recipe(name: &str) {
    let dir = recipes().join(name);
    let yaml = dir.join("train.yaml");
    assert!(yaml.is_file(), "{} missing: run tools/golden/gen_recipes.py", yaml.display());
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    // As LLaMA-Factory ran: from the recipe's folder (its relative paths), one compute thread so that sums keep
    // one order.
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .current_dir(&dir)
        .args(["train", "train.yaml", &format!("output_dir={}", out_dir.display())])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("run ferrotune");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name}: ferrotune train failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let want = read_json(&dir.join("log_history.json"));
    let state = read_json(&out_dir.join("trainer_state.json"));
    assert_eq!(state["max_steps"], want["max_steps"], "{name}: max_steps");
    assert_eq!(num(&state, "num_train_epochs", name), num(&want, "num_train_epochs", name), "{name}: num_train_epochs");
    let epochs = want["num_train_epochs"].as_f64().unwrap();
    assert!(stdout.contains(&format!("  Num Epochs = {epochs}\n")), "{name}: Num Epochs ≠ {epochs} in\n{stdout}");

    let mut worst = Worst(Vec::new());
    // log_history: train steps and evaluations, in order.
    let pick = |h: &Value| -> Vec<Value> {
        h["log_history"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e.get("loss").is_some() || e.get("eval_loss").is_some())
            .cloned()
            .collect()
    };
    let (got, wanted) = (pick(&state), pick(&want));
    assert_eq!(got.len(), wanted.len(), "{name}: log_history entries");
    assert!(wanted.iter().any(|e| e.get("loss").is_some()), "{name}: no train step in the reference");
    for (g, w) in got.iter().zip(&wanted) {
        let step = w["step"].as_u64().unwrap();
        let ctx = format!("{name} step {step}");
        assert_eq!(g["step"], w["step"], "{ctx}");
        worst.see("epoch", (num(g, "epoch", &ctx) - num(w, "epoch", &ctx)).abs(), 1e-6, &ctx);
        if w.get("eval_loss").is_some() {
            worst.see("eval_loss", rel(num(g, "eval_loss", &ctx), num(w, "eval_loss", &ctx)), REL, &ctx);
        } else {
            worst.see("loss", rel(num(g, "loss", &ctx), num(w, "loss", &ctx)), REL, &ctx);
            worst.see("grad_norm", rel(num(g, "grad_norm", &ctx), num(w, "grad_norm", &ctx)), REL, &ctx);
            worst.see(
                "learning_rate",
                (num(g, "learning_rate", &ctx) - num(w, "learning_rate", &ctx)).abs(),
                LR_ABS,
                &ctx,
            );
        }
    }
    // trainer_log.jsonl: LLaMA-Factory's per-step lines (rounded by its LogCallback).
    let (got, wanted) = (jsonl(&out_dir.join("trainer_log.jsonl")), jsonl(&dir.join("trainer_log.jsonl")));
    assert_eq!(got.len(), wanted.len(), "{name}: trainer_log.jsonl lines");
    for (g, w) in got.iter().zip(&wanted) {
        let ctx = format!("{name} trainer_log step {}", w["current_steps"]);
        assert_eq!(g["current_steps"], w["current_steps"], "{ctx}");
        assert_eq!(g["total_steps"], w["total_steps"], "{ctx}");
        assert_eq!(g["epoch"], w["epoch"], "{ctx}: epoch");
        for key in ["loss", "eval_loss"] {
            assert_eq!(g.get(key).is_some(), w.get(key).is_some(), "{ctx}: {key} present");
            if w.get(key).is_some() {
                worst.see(&format!("trainer_log {key}"), rel(num(g, key, &ctx), num(w, key, &ctx)), REL, &ctx);
            }
        }
        if w.get("lr").is_some() {
            worst.see("trainer_log lr", (num(g, "lr", &ctx) - num(w, "lr", &ctx)).abs(), LR_ABS, &ctx);
        }
    }
    // The final adapter.
    let got = candle_core::safetensors::load(out_dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let wanted = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<_> = wanted.keys().collect();
    names.sort();
    assert_eq!(got.len(), wanted.len(), "{name}: adapter tensors");
    for k in names {
        let g = got.get(k).unwrap_or_else(|| panic!("{name}: adapter lacks {k}"));
        worst.see("adapter", rel_l2(g, &wanted[k]), ADAPTER_REL, &format!("{name}: {k}"));
    }
    let summary: Vec<String> = worst.0.iter().map(|(n, w)| format!("{n} {w:.1e}")).collect();
    eprintln!("{name} vs LLaMA-Factory, worst: {}", summary.join(", "));
}

#[test]
fn batch1_accum4_equals_llamafactory() {
    run_recipe("batch1_accum4");
}

#[test]
fn batch2_accum2_equals_llamafactory() {
    run_recipe("batch2_accum2");
}

#[test]
fn batch4_val_size_eval_steps_equals_llamafactory() {
    run_recipe("batch4_val");
}

#[test]
fn cosine_warmup_clipping_max_steps_equals_llamafactory() {
    run_recipe("cosine_warmup_clip");
}

/// LoRA on a per-row int8 base (`quantization_bit: 8`, QLoRA-style): the same recipe as LLaMA-Factory's on the
/// full-precision base, within the quantization's cost. Measured: per-step losses within 1.5e-3 relative, the
/// final adapter within 4.2e-2 relative L2 (bounds 1e-2 and 1e-1; at full precision: 2.2e-7 and 8.4e-7).
#[test]
fn lora_on_an_int8_base_stays_near_the_full_precision_recipe() {
    let name = "batch2_accum2";
    let dir = recipes().join(name);
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .current_dir(&dir)
        .args(["train", "train.yaml", &format!("output_dir={}", out_dir.display()), "quantization_bit=8"])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("run ferrotune");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ferrotune train failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("quantized to per-row int8"), "the log says the base is int8:\n{stdout}");
    let (got, wanted) = (jsonl(&out_dir.join("trainer_log.jsonl")), jsonl(&dir.join("trainer_log.jsonl")));
    assert_eq!(got.len(), wanted.len(), "trainer_log.jsonl lines");
    let mut worst_loss = 0f64;
    for (g, w) in got.iter().zip(&wanted) {
        if w.get("loss").is_some() {
            let ctx = format!("step {}", w["current_steps"]);
            worst_loss = worst_loss.max(rel(num(g, "loss", &ctx), num(w, "loss", &ctx)));
        }
    }
    let got = candle_core::safetensors::load(out_dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let wanted = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(got.len(), wanted.len(), "adapter tensors");
    let worst_adapter = wanted.iter().map(|(k, w)| rel_l2(&got[k], w)).fold(0f64, f64::max);
    eprintln!("int8 base vs LLaMA-Factory full precision: loss {worst_loss:.1e}, adapter {worst_adapter:.1e}");
    assert!(worst_loss < 1e-2, "per-step loss differs by {worst_loss:e} relative");
    assert!(worst_adapter < 1e-1, "adapter differs by {worst_adapter:e} relative L2");
}
