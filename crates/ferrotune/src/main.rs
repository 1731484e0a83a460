//! ferrotune: LoRA fine-tuning and serving of Qwen vision-language models. The whole command dispatch is here;
//! each command is a thin file in `cmd/` over the library.

mod cmd;
mod server;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferrotune", version, about = "LoRA fine-tuning and serving of Qwen vision-language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve base + adapters behind an OpenAI-compatible HTTP API.
    Api(cmd::api::Args),
    /// Chat in the terminal, or answer one prompt (--prompt) for scripts.
    Chat(cmd::chat::Args),
    /// Merge adapters into the base and write a complete checkpoint.
    Export(cmd::export::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Api(args) => cmd::api::run(args),
        Command::Chat(args) => cmd::chat::run(args),
        Command::Export(args) => cmd::export::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
