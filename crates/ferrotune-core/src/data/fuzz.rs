//! A seeded config fuzzer: a valid base config with random values (zero, negative, huge, fractional, not a
//! number, `null`, ...) for one or several of the key table's numeric keys, run through what `ferrotune data
//! check` runs ([`data_check`]: the plan, the data stage with its step count, the printed report). Every case
//! must end in `Ok` or an error; a panic is a bug. `cargo test` runs a few hundred cases, `ferrotune bench
//! config-fuzz` as many as asked.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{check_config, Prepared};
use crate::config::keys::{self, Kind, KEYS};
use crate::config::{Plan, RawConfig};

/// What `ferrotune data check` does with a config, in process: [`check_config`] (the plan, the data stage and
/// its step count) and the report it prints (and the plan summary `train` prints).
pub fn data_check(raw: &RawConfig) -> Result<(Plan, Prepared)> {
    let (plan, prepared) = check_config(raw, &|_, _| {})?;
    let _printed = format!("{plan}{}", prepared.report);
    Ok((plan, prepared))
}

/// The numeric keys of the key table (`Kind::Int` and `Kind::Float`).
pub fn numeric_keys() -> Vec<&'static str> {
    KEYS.iter().filter(|k| matches!(k.kind, Kind::Int | Kind::Float)).map(|k| k.name).collect()
}

/// Where the fuzzer's base config points.
#[derive(Clone, Debug)]
pub struct FuzzSetup {
    /// A checkpoint folder (the tiny fixture).
    pub checkpoint: PathBuf,
    /// A dataset folder with `dataset_info.json` defining `mllm_rc` and `alpaca_text` (tests/fixtures/data).
    pub dataset_dir: PathBuf,
    /// An output_dir that does not exist (nothing is written; it only keeps `do_train: true` valid).
    pub output_dir: PathBuf,
}

/// A case that panicked: the config and the panic's message.
#[derive(Clone, Debug)]
pub struct FuzzPanic {
    pub yaml: String,
    pub message: String,
}

#[derive(Clone, Debug, Default)]
pub struct FuzzReport {
    pub cases: usize,
    pub ok: usize,
    pub err: usize,
    pub panics: Vec<FuzzPanic>,
    pub seconds: f64,
}

/// A value as YAML text: mostly edge cases, sometimes an ordinary value so that several keys changed at once
/// still get past validation and into the data stage.
fn value(rng: &mut StdRng, kind: Kind) -> String {
    const EDGES: &[&str] = &[
        "0",
        "-1",
        "1",
        "2",
        "0.0",
        "-0.0",
        "0.5",
        "0.999",
        "1.5",
        "1e-300",
        "5e-324",
        "-1e-9",
        "1.0e18",
        "1.0e308",
        "-1.0e308",
        "1e400",
        "9223372036854775807",
        "-9223372036854775808",
        "9223372036854775808",
        "18446744073709551615",
        "4294967296",
        "4294967297",
        "65536",
        "2147483648",
        ".nan",
        ".inf",
        "-.inf",
        "\"nan\"",
        "\"NaN\"",
        "\"inf\"",
        "\"-inf\"",
        "\"1e400\"",
        "\" 7 \"",
        "\"\"",
        "abc",
        "null",
        "true",
        "[1, 2]",
        "{a: 1}",
    ];
    match rng.random_range(0..10) {
        0..=4 => EDGES[rng.random_range(0..EDGES.len())].to_string(),
        5 => rng.random::<i64>().to_string(),
        6 => format!("{:e}", rng.random::<f64>() * 10f64.powi(rng.random_range(-20..20))),
        7 => format!("-{}", rng.random_range(1..1000u32)),
        _ => match kind {
            Kind::Float => format!("{}", rng.random_range(0.0..2.0f64)),
            _ => rng.random_range(0..64u32).to_string(),
        },
    }
}

/// One random config (YAML text) on top of the base.
pub fn case_yaml(rng: &mut StdRng, setup: &FuzzSetup, numeric: &[&'static str]) -> String {
    let mut pairs: Vec<(String, String)> = vec![
        ("model_name_or_path".into(), format!("{:?}", setup.checkpoint.display().to_string())),
        ("dataset_dir".into(), format!("{:?}", setup.dataset_dir.display().to_string())),
        ("dataset".into(), if rng.random_bool(0.5) { "mllm_rc".into() } else { "mllm_rc,alpaca_text".into() }),
        ("template".into(), "qwen3_5".into()),
        ("do_train".into(), "true".into()),
        ("output_dir".into(), format!("{:?}", setup.output_dir.display().to_string())),
        ("cutoff_len".into(), "1024".into()),
        ("per_device_train_batch_size".into(), "1".into()),
        ("gradient_accumulation_steps".into(), "2".into()),
        ("num_train_epochs".into(), "2".into()),
        ("logging_steps".into(), "1".into()),
        ("save_steps".into(), "10".into()),
    ];
    // The interval strategies change which numeric keys matter.
    if rng.random_bool(0.4) {
        pairs.push(("val_size".into(), "0.25".into()));
        pairs.push(("eval_strategy".into(), "steps".into()));
    }
    for key in ["logging_strategy", "save_strategy"] {
        if rng.random_bool(0.3) {
            pairs.push((key.into(), "no".into()));
        }
    }
    if rng.random_bool(0.2) {
        pairs.push(("lr_scheduler_type".into(), "cosine".into()));
    }
    let n = match rng.random_range(0..10) {
        0..=4 => 1,
        5..=7 => 2,
        _ => rng.random_range(3..8),
    };
    for _ in 0..n {
        let key = numeric[rng.random_range(0..numeric.len())];
        let kind = keys::find(key).map_or(Kind::Int, |k| k.kind);
        let v = value(rng, kind);
        match pairs.iter_mut().find(|(k, _)| k == key) {
            Some(p) => p.1 = v,
            None => pairs.push((key.to_string(), v)),
        }
    }
    pairs.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()
}

/// Runs one case: the config text through [`data_check`], and the step arithmetic for a few sample counts.
pub fn run_case(yaml: &str) -> Result<()> {
    let raw = RawConfig::parse(yaml, Path::new("fuzz.yaml"), false)?;
    let (plan, prepared) = data_check(&raw)?;
    for n in [prepared.train.len(), 1, 7, 1000, 1 << 40] {
        if n > 0 {
            let _ = plan.train.steps(n);
        }
    }
    Ok(())
}

/// The message of a caught panic.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".into()
    }
}

/// Runs `cases` seeded cases; panics are caught and reported with their config.
pub fn fuzz(setup: &FuzzSetup, cases: usize, seed: u64) -> FuzzReport {
    let start = Instant::now();
    let numeric = numeric_keys();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = FuzzReport { cases, ..Default::default() };
    for _ in 0..cases {
        let yaml = case_yaml(&mut rng, setup, &numeric);
        match catch_unwind(AssertUnwindSafe(|| run_case(&yaml))) {
            Ok(Ok(())) => report.ok += 1,
            Ok(Err(_)) => report.err += 1,
            Err(payload) => report.panics.push(FuzzPanic { yaml, message: panic_message(payload.as_ref()) }),
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    report
}
