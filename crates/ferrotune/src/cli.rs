//! Command-line arguments. Config-taking commands accept LLaMA-Factory's forms: `CONFIG.yaml [key=value ...]`
//! or `--key value ...` flags; ferrotune's own switches (`--strict`, `--skip-bad-rows`) may appear anywhere.

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferrotune", version, about = "LoRA fine-tuning and serving of Qwen vision-language models")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Fine-tune with LoRA from a LLaMA-Factory config; every data row is checked first
    Train(ConfigArgs),
    /// Dataset tools
    #[command(subcommand)]
    Data(DataCommand),
    /// Print the environment: version, build features, CPU, threads, GPU, dtypes
    Env,
    /// Measure speed and memory (forward, LoRA training, decoding) on a checkpoint or a generated one
    Bench(BenchArgs),
    /// Serve base + adapters behind an OpenAI-compatible HTTP API
    Api(crate::cmd::api::Args),
    /// Chat in the terminal, or answer one prompt (--prompt) for scripts
    Chat(crate::cmd::chat::Args),
    /// Merge adapters into the base and write a complete checkpoint
    Export(crate::cmd::export::Args),
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure: train, forward or decode
    #[arg(value_parser = ["train", "forward", "decode"])]
    pub what: String,
    /// Checkpoint folder; without it a random-init checkpoint of --preset is generated (and cached)
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    /// Size of the generated checkpoint: tiny (the test fixture), 100m, 135m or 1b
    #[arg(long, default_value = "135m")]
    pub preset: String,
    /// Where generated checkpoints are cached
    #[arg(long, default_value = "target/bench-models")]
    pub cache: std::path::PathBuf,
    /// Tokens per sample (prompt + answer)
    #[arg(long, default_value_t = 264)]
    pub seq: usize,
    /// Side of one square image per sample in pixels (0: text only)
    #[arg(long, default_value_t = 0)]
    pub image: usize,
    /// Measured iterations (after one warm-up)
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Compute threads (also RAYON_NUM_THREADS)
    #[arg(long)]
    pub threads: Option<usize>,
    /// LoRA rank (train)
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Keep all activations instead of recomputing them per layer (train)
    #[arg(long)]
    pub no_checkpointing: bool,
    /// Tokens to generate (decode)
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Decode with bf16 weights (half the memory traffic per token)
    #[arg(long)]
    pub bf16: bool,
    /// Also run the PyTorch + PEFT / transformers anchor from this Python (e.g. tools/golden/.venv/bin/python)
    #[arg(long)]
    pub python: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Check every row of the config's datasets without training and print a report
    Check(ConfigArgs),
}

#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// CONFIG.yaml (or .json) followed by key=value overrides, or --key value flags alone.
    /// Also: --strict (samples whose images do not fit cutoff_len are errors, not dropped) and
    /// --skip-bad-rows (train without the rows that have errors, listing them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "CONFIG [KEY=VALUE]...")]
    pub args: Vec<String>,
}

/// A config-taking command's arguments, split into the config file, the overrides and ferrotune's switches.
pub struct ConfigInput {
    pub file: Option<std::path::PathBuf>,
    pub overrides: Vec<String>,
    pub strict: bool,
    pub skip_bad_rows: bool,
}

impl ConfigArgs {
    pub fn split(self) -> ConfigInput {
        let mut input = ConfigInput { file: None, overrides: Vec::new(), strict: false, skip_bad_rows: false };
        for a in self.args {
            match a.as_str() {
                "--strict" => input.strict = true,
                "--skip-bad-rows" => input.skip_bad_rows = true,
                _ if input.file.is_none()
                    && input.overrides.is_empty()
                    && [".yaml", ".yml", ".json"].iter().any(|e| a.to_ascii_lowercase().ends_with(e)) =>
                {
                    input.file = Some(a.into())
                }
                _ => input.overrides.push(a),
            }
        }
        input
    }
}

/// Parses argv; `ferrotune train --help` lists every config key from the key table.
pub fn parse() -> Cli {
    let command =
        Cli::command().mut_subcommand("train", |c| c.after_long_help(ferrotune_core::config::keys::help_text()));
    let matches = command.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(args: &[&str]) -> ConfigInput {
        ConfigArgs { args: args.iter().map(|s| s.to_string()).collect() }.split()
    }

    #[test]
    fn config_file_overrides_and_switches() {
        let i = split(&["train.yaml", "learning_rate=2e-4", "--strict", "--cutoff_len", "512"]);
        assert_eq!(i.file.as_deref(), Some(std::path::Path::new("train.yaml")));
        assert_eq!(i.overrides, vec!["learning_rate=2e-4", "--cutoff_len", "512"]);
        assert!(i.strict && !i.skip_bad_rows);
        let i = split(&["--skip-bad-rows", "--model_name_or_path", "m", "--output_dir", "out.json"]);
        assert!(i.file.is_none() && i.skip_bad_rows);
        assert_eq!(i.overrides.len(), 4);
    }
}
