//! `ferrotune train CONFIG.yaml [key=value ...]`: validates the config, checks every data row, prints the plan.

use std::process::ExitCode;

use anyhow::{bail, Result};

use crate::cli::ConfigArgs;

pub fn run(args: ConfigArgs) -> Result<ExitCode> {
    let input = args.split();
    let plan = super::load_plan(&input)?;
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
    bail!(
        "training is not built yet: the config and the {} training samples are valid, but this build of ferrotune \
         stops here",
        prepared.train.len()
    )
}
