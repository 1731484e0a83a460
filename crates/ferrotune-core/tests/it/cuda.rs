//! The CUDA code paths on a GPU: the frozen-weight matmul and every op of the training graph against the CPU,
//! the tiny checkpoint's logits against transformers (f32 and bf16), LoRA gradients against PEFT, dropout
//! replay under checkpointing, greedy generation, and device selection. Built with the `cuda` feature and no
//! usable GPU, each test fails with the reason, unless FERROTUNE_SKIP_GPU=1 says to skip (then it prints
//! SKIPPED and why).

use candle_core::{DType, Device};
use ferrotune_core::{device, parity};

use crate::common::fixtures;

/// The first GPU; with none, a failure, or None after saying why the test is skipped when FERROTUNE_SKIP_GPU=1.
fn gpu(test: &str) -> Option<Device> {
    match device::parse_device("cuda") {
        Ok(d) => Some(d),
        Err(e) if std::env::var("FERROTUNE_SKIP_GPU").is_ok_and(|v| v == "1") => {
            // Straight to stderr, past the test harness's capture, so that a skip is seen.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {test} (FERROTUNE_SKIP_GPU=1): {e:#}");
            None
        }
        Err(e) => panic!("{test}: no usable GPU ({e:#}); set FERROTUNE_SKIP_GPU=1 to skip the CUDA tests"),
    }
}

fn assert_all(test: &str, checks: &[parity::Check]) {
    eprint!("{}", parity::render(checks));
    let failed: Vec<&str> = checks.iter().filter(|c| !c.passed()).map(|c| c.name.as_str()).collect();
    assert!(failed.is_empty(), "{test}: failed {failed:?}");
}

#[test]
fn cuda_frozen_matmul_matches_cpu_forward_and_backward() {
    let Some(dev) = gpu("cuda_frozen_matmul_matches_cpu_forward_and_backward") else { return };
    assert_all("frozen matmul", &parity::frozen_matmul_vs_cpu(&dev).unwrap());
}

#[test]
fn cuda_training_ops_match_cpu_forward_and_backward() {
    let Some(dev) = gpu("cuda_training_ops_match_cpu_forward_and_backward") else { return };
    assert_all("training ops", &parity::training_ops_vs_cpu(&dev).unwrap());
}

#[test]
fn cuda_tiny_checkpoint_logits_match_transformers() {
    let Some(dev) = gpu("cuda_tiny_checkpoint_logits_match_transformers") else { return };
    for dtype in [DType::F32, DType::BF16] {
        assert_all("logits", &parity::logits(&dev, &fixtures(), dtype).unwrap());
    }
}

#[test]
fn cuda_lora_gradients_match_peft() {
    let Some(dev) = gpu("cuda_lora_gradients_match_peft") else { return };
    for checkpointing in [false, true] {
        assert_all("LoRA f32", &parity::lora_gradients(&dev, &fixtures(), DType::F32, checkpointing).unwrap());
    }
    assert_all("LoRA bf16", &parity::lora_gradients(&dev, &fixtures(), DType::BF16, true).unwrap());
}

#[test]
fn cuda_dropout_masks_replay_under_checkpointing() {
    let Some(dev) = gpu("cuda_dropout_masks_replay_under_checkpointing") else { return };
    assert_all("dropout", &[parity::dropout_replay(&dev, &fixtures()).unwrap()]);
}

#[test]
fn cuda_greedy_generation_matches_transformers() {
    let Some(dev) = gpu("cuda_greedy_generation_matches_transformers") else { return };
    assert_all("generation", &[parity::greedy_generation(&dev, &fixtures()).unwrap()]);
}

#[test]
fn cuda_device_selection_names_the_problem() {
    // Works with or without a GPU: an ordinal past the visible ones is refused with the reason.
    let e = device::parse_device("cuda:99").unwrap_err().to_string();
    assert!(e.contains("no usable GPU for cuda:99"), "{e}");
    if let Some(dev) = gpu("cuda_device_selection_names_the_problem (GPU part)") {
        assert!(device::describe(&dev).starts_with("CUDA device 0 ("), "{}", device::describe(&dev));
        let gpus = device::gpus().unwrap();
        assert!(!gpus.is_empty() && gpus[0].total_bytes > 0);
        device::reset_peak_memory(&dev);
        let t = candle_core::Tensor::zeros((1024, 1024), DType::F32, &dev).unwrap();
        device::synchronize(&dev).unwrap();
        let peak = device::peak_memory(&dev).unwrap();
        assert!(peak >= 4 << 20, "peak {peak} bytes after allocating 4 MiB");
        drop(t);
    }
}
