//! The device parity checks (what `ferrotune gpu-check` runs on a GPU) on the CPU: there the op-by-op checks
//! against the CPU are left out (they would compare the CPU with itself), and what remains compares ferrotune
//! with transformers and PEFT fixtures, so each bound is met against a reference, not against this code.

use candle_core::Device;
use ferrotune_core::parity;

use crate::common::fixtures;

#[test]
fn parity_checks_against_transformers_and_peft_pass_on_the_cpu() {
    let checks = parity::run_all(&Device::Cpu, &fixtures()).unwrap();
    eprint!("{}", parity::render(&checks));
    let against_cpu: Vec<_> =
        checks.iter().filter(|c| c.name.ends_with(": forward") || c.name.ends_with(": dX")).collect();
    assert!(against_cpu.is_empty(), "the CPU was compared with itself: {:?}", against_cpu[0].name);
    for prefix in [
        "logits float32",
        "logits bfloat16",
        "LoRA qkvo float32",
        "LoRA all bfloat16",
        "LoRA dropout",
        "greedy generation",
    ] {
        assert!(checks.iter().any(|c| c.name.starts_with(prefix)), "no `{prefix}` check ran");
    }
    let failed: Vec<_> = checks.iter().filter(|c| !c.passed()).map(|c| c.name.as_str()).collect();
    assert!(failed.is_empty(), "failed on the CPU: {failed:?}");
}
