//! `ferrotune env`: what this build and machine provide.

use std::process::ExitCode;

use anyhow::Result;

pub fn run() -> Result<ExitCode> {
    print!("{}", ferrotune_core::env::render());
    Ok(ExitCode::SUCCESS)
}
