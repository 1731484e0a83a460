//! `ferrotune data check CONFIG.yaml [key=value ...]`: the pre-flight report, without training.

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::ConfigArgs;

pub fn check(args: ConfigArgs) -> Result<ExitCode> {
    let input = args.split();
    let raw = super::load_raw(&input)?;
    // The same function the config fuzzer (`bench config-fuzz`) runs.
    let (plan, prepared) = super::with_progress(|progress| ferrotune_core::data::check_config(&raw, progress))?;
    for n in &plan.notes {
        println!("note: {n}");
    }
    let report = &prepared.report;
    print!("{report}");
    let errors = report.errors(input.strict);
    if errors > 0 {
        println!(
            "\n{errors} row(s) with errors{}: fix them, or train with --skip-bad-rows to leave them out",
            if input.strict { " (--strict counts dropped rows)" } else { "" }
        );
        return Ok(ExitCode::FAILURE);
    }
    println!("\nall rows usable");
    Ok(ExitCode::SUCCESS)
}
