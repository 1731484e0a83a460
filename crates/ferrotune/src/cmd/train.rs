//! `ferrotune train CONFIG.yaml [key=value ...]`: validates the config, checks every data row, then trains.

use std::process::ExitCode;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};
use ferrotune_core::device::DeviceSpec;
use ferrotune_core::train::run::{self as trainer, RunOptions};

use crate::cli::ConfigArgs;

pub fn run(args: ConfigArgs) -> Result<ExitCode> {
    let input = args.split();
    let plan = super::load_plan(&input)?;
    super::threads_for_checkpoint(&plan.model_name_or_path);
    let device = input.device.as_deref().map(str::parse::<DeviceSpec>).transpose()?;
    if !plan.do_train {
        bail!("`do_train` is not true; set `do_train: true` to train");
    }
    print!("{plan}");
    let prepared = super::prepare_with_progress(&plan)?;
    println!();
    print!("{}", prepared.report);
    let errors = prepared.report.errors(input.strict);
    if errors > 0 && !input.skip_bad_rows {
        bail!("{errors} row(s) have errors (listed above); fix them, or pass --skip-bad-rows to train without them");
    }
    if errors > 0 {
        println!("\nskipping the {errors} row(s) with errors listed above");
    }
    if prepared.train.is_empty() {
        bail!("no training samples are left after the checks above");
    }
    // Ctrl-C finishes the current step, saves a checkpoint and exits; a second Ctrl-C aborts at once.
    static STOP: AtomicBool = AtomicBool::new(false);
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: saving a checkpoint after the current step (press again to abort)");
    });
    let opts = RunOptions {
        stop: &STOP,
        progress: std::io::stderr().is_terminal(),
        halt_after_step: None,
        device,
        workers: None,
    };
    let outcome = ferrotune_core::parallel::on_compute_pool(|| trainer::run(&plan, &prepared, &opts))?;
    if outcome.interrupted {
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}
