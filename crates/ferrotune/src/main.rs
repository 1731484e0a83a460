//! ferrotune: LoRA fine-tuning and serving of Qwen vision-language models, compatible with LLaMA-Factory's
//! configs and data. This file is the whole command dispatch; each command is a thin file in `cmd/`.

mod cli;
mod cmd;
mod server;

use std::process::ExitCode;

use cli::{Command, DataCommand};

fn main() -> ExitCode {
    ferrotune_core::sys::tune_allocator();
    ferrotune_core::sys::tune_threads();
    let cli = cli::parse();
    let result = match cli.command {
        Command::Train(args) => cmd::train::run(args),
        Command::Data(DataCommand::Check(args)) => cmd::data::check(args),
        Command::Env => cmd::env::run(),
        Command::Demo(args) => cmd::demo::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Api(args) => cmd::api::run(args),
        Command::Chat(args) => cmd::chat::run(args),
        Command::Export(args) => cmd::export::run(args),
        Command::GpuCheck(args) => cmd::gpu_check::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
