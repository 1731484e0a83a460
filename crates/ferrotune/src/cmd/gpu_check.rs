//! `ferrotune gpu-check` (hidden): the parity checks of a device as a PASS/FAIL table; exits non-zero when one
//! fails. tools/cuda/check.sh runs it on a GPU machine with the carried binary.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use ferrotune_core::{device, parity};

use crate::cli::GpuCheckArgs;

pub fn run(args: GpuCheckArgs) -> Result<ExitCode> {
    let dev = device::parse_device(&args.device)?;
    let fixtures = parity::fixtures_dir(args.fixtures.as_deref())?;
    println!("parity checks on {} (fixtures: {})", device::describe(&dev), fixtures.display());
    let t0 = Instant::now();
    let checks = parity::run_all(&dev, &fixtures)?;
    print!("{}", parity::render(&checks));
    let failed = checks.iter().filter(|c| !c.passed()).count();
    println!("{} checks, {failed} failed, {:.1} s", checks.len(), t0.elapsed().as_secs_f64());
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
