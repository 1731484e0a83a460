//! The device parity checks (what `ferrotune gpu-check` runs on a GPU) hold on the CPU: the checks and their
//! fixture plumbing are exercised where no GPU is, and each bound is met by the reference device itself.

use candle_core::Device;
use ferrotune_core::parity;

use crate::common::fixtures;

#[test]
fn parity_checks_pass_on_the_cpu() {
    let checks = parity::run_all(&Device::Cpu, &fixtures()).unwrap();
    eprint!("{}", parity::render(&checks));
    assert!(checks.len() >= 30, "only {} checks ran", checks.len());
    let failed: Vec<_> = checks.iter().filter(|c| !c.passed()).map(|c| c.name.as_str()).collect();
    assert!(failed.is_empty(), "failed on the CPU: {failed:?}");
}
