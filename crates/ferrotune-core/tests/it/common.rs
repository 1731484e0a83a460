//! Shared helpers: fixture paths and tensor comparisons that say where and by how much they differ.

use std::path::PathBuf;

use candle_core::{DType, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn tiny_checkpoint() -> PathBuf {
    fixtures().join("tiny-qwen3_5")
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
