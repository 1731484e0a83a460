//! Shared helpers: fixture paths, config builders, and tensor comparisons that say where and by how much
//! they differ.

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use ferrotune_core::config::{Origin, Plan, RawConfig};
use serde_json::Value;

/// `tests/fixtures` at the workspace root: where the tests were built, else under the current folder (a test
/// binary carried to a GPU machine runs from the repository root there).
pub fn fixtures() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    if built.is_dir() {
        built
    } else {
        PathBuf::from("tests/fixtures")
    }
}

pub fn tiny_checkpoint() -> PathBuf {
    fixtures().join("tiny-qwen3_5")
}

pub fn tiny() -> PathBuf {
    tiny_checkpoint()
}

pub fn golden(name: &str) -> Value {
    let path = fixtures().join("golden/lf").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A config of `key: value` pairs on top of the tiny checkpoint and the data fixtures.
pub fn raw_config(pairs: &[(&str, Value)]) -> RawConfig {
    let mut raw = RawConfig::new();
    raw.set("model_name_or_path", Value::String(tiny().display().to_string()), Origin::Default);
    raw.set("dataset_dir", Value::String(fixtures().join("data").display().to_string()), Origin::Default);
    for (k, v) in pairs {
        raw.set(k, v.clone(), Origin::Default);
    }
    raw
}

pub fn plan(pairs: &[(&str, Value)]) -> Plan {
    Plan::from_raw(&raw_config(pairs)).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A scratch folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrotune-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Max |a − b| over all elements (both cast to f32); panics with `what` when shapes differ.
pub fn max_abs_diff(a: &Tensor, b: &Tensor, what: &str) -> f32 {
    assert_eq!(a.dims(), b.dims(), "{what}: shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    (a - b).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Asserts max |a − b| ≤ tol and returns the measured value.
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) -> f32 {
    let d = max_abs_diff(a, b, what);
    assert!(d <= tol, "{what}: max abs diff {d:e} > {tol:e}");
    d
}
