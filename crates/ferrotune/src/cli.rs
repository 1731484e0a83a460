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
    /// The whole workflow on the embedded default: data, before/after evaluation, LoRA training (no downloads)
    Demo(DemoArgs),
    /// Compare the base model and fine-tunes on a held-out split (loss, BLEU-4, ROUGE, attribute accuracy)
    Eval(EvalArgs),
    /// Measure speed and memory (forward, LoRA training, decoding) on a checkpoint or a generated one
    Bench(BenchArgs),
    /// Serve base + adapters behind an OpenAI-compatible HTTP API
    Api(crate::cmd::api::Args),
    /// Chat in the terminal, or answer one prompt (--prompt) for scripts
    Chat(crate::cmd::chat::Args),
    /// Merge adapters into the base and write a complete checkpoint
    Export(crate::cmd::export::Args),
    /// Parity of a device (a GPU) with the reference fixtures and the CPU, as a PASS/FAIL table
    #[command(name = "gpu-check", hide = true)]
    GpuCheck(GpuCheckArgs),
}

#[derive(Args, Debug)]
pub struct GpuCheckArgs {
    /// cuda, cuda:N (or cpu, which checks the checks)
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// The repository's tests/fixtures (default: found from the build or the current folder)
    #[arg(long)]
    pub fixtures: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure: train, forward or decode; packing runs the training loop on the demo's robot data
    /// unpacked, with packing and with neat_packing (rows of at most --seq tokens) and compares tokens/s;
    /// config-fuzz: random values for every numeric config key through `data check` on the tiny fixture,
    /// counting Ok, errors and panics (exits non-zero on a panic)
    /// kernels: the machine's FMA and AMX peaks and read bandwidth beside the frozen-weight matrix products (f32,
    /// bf16 exact, bf16 products, int8 weights) at the --preset's MLP shape
    #[arg(value_parser = ["train", "forward", "decode", "packing", "config-fuzz", "kernels"])]
    pub what: String,
    /// Cases to run (config-fuzz)
    #[arg(long, default_value_t = 10_000)]
    pub cases: usize,
    /// Seed of the generated configs (config-fuzz)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Checkpoint folder; without it a random-init checkpoint of --preset is generated (and cached)
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    /// Size of the generated checkpoint: tiny (the test fixture), demo, 100m, 135m, 1b, or the family's real
    /// shapes and 248,320-row vocabulary: 0.8b, 2b, 4b (4b: 9.1 GB on disk in bf16)
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
    /// Measured iterations (after one warm-up); packing: optimizer steps of each run
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Compute threads (also RAYON_NUM_THREADS; default: one for a model of hidden size up to 256, else all)
    #[arg(long)]
    pub threads: Option<usize>,
    /// LoRA rank (train)
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Keep all activations instead of recomputing them per layer (train)
    #[arg(long)]
    pub no_checkpointing: bool,
    /// With checkpointing, keep the activations of this many last layers instead of recomputing them (train; what
    /// an activation budget decides in `train`)
    #[arg(long, default_value_t = 0)]
    pub keep_layers: usize,
    /// Tokens to generate (decode)
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Sequences decoded together as one batch, as the server batches its streams (decode; tokens/s counts
    /// every sequence's tokens)
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Random LoRA adapters of rank --rank on every decoder linear, served side by side: the batch's rows take
    /// them in turn, as a server's requests for several adapters do (decode; 0: the base alone)
    #[arg(long, default_value_t = 0)]
    pub adapters: usize,
    /// Same as --dtype bf16
    #[arg(long)]
    pub bf16: bool,
    /// Base weights' dtype: auto (bf16 on a GPU, f32 on the CPU), f32 or bf16 (LoRA weights and optimizer
    /// state are f32 either way)
    #[arg(long, default_value = "auto", value_parser = ["auto", "f32", "bf16"])]
    pub dtype: String,
    /// 8: quantize the frozen base matrices to per-row int8 at load, as `quantization_bit: 8` (CPU); the Python
    /// anchor then runs in bf16
    #[arg(long = "quantization_bit", alias = "quantization-bit", value_parser = clap::value_parser!(u32).range(8..=8))]
    pub quantization_bit: Option<u32>,
    /// cpu, cuda, cuda:N or auto (the first GPU when built with CUDA and one is usable)
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Also print the results as one JSON line
    #[arg(long)]
    pub json: bool,
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
    /// Also: --strict (samples whose images do not fit cutoff_len are errors, not dropped),
    /// --skip-bad-rows (train without the rows that have errors, listing them) and
    /// --device cpu|cuda|cuda:N (default: the first GPU when built with CUDA, unless use_cpu).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "CONFIG [KEY=VALUE]...")]
    pub args: Vec<String>,
}

/// A config-taking command's arguments, split into the config file, the overrides and ferrotune's switches.
pub struct ConfigInput {
    pub file: Option<std::path::PathBuf>,
    pub overrides: Vec<String>,
    pub strict: bool,
    pub skip_bad_rows: bool,
    /// `--device`, as given.
    pub device: Option<String>,
}

impl ConfigArgs {
    pub fn split(self) -> ConfigInput {
        let mut input =
            ConfigInput { file: None, overrides: Vec::new(), strict: false, skip_bad_rows: false, device: None };
        let mut args = self.args.into_iter();
        while let Some(a) = args.next() {
            match a.as_str() {
                "--strict" => input.strict = true,
                "--skip-bad-rows" => input.skip_bad_rows = true,
                // Not a LLaMA-Factory key: picks the GPU (or the CPU) this run uses.
                "--device" => input.device = Some(args.next().unwrap_or_default()),
                _ if a.starts_with("--device=") => input.device = Some(a["--device=".len()..].to_string()),
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
        let i = split(&["train.yaml", "--device", "cuda:1", "bf16=true"]);
        assert_eq!(i.device.as_deref(), Some("cuda:1"));
        assert_eq!(i.overrides, vec!["bf16=true"]);
        assert_eq!(split(&["--device=cpu", "x.yaml"]).device.as_deref(), Some("cpu"));
    }
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Folder for everything the demo writes
    #[arg(long, default_value = "ferrotune-demo")]
    pub out: std::path::PathBuf,
    /// Language of the robot descriptions: zh (as the reference run) or en
    #[arg(long, default_value = "zh")]
    pub lang: String,
    /// Training rows and held-out rows
    #[arg(long, default_value_t = 500)]
    pub train_rows: usize,
    #[arg(long, default_value_t = 50)]
    pub eval_rows: usize,
    /// Epochs of LoRA training
    #[arg(long, default_value_t = 10.0)]
    pub epochs: f64,
    /// Rebuild the embedded base model from scratch (pretraining on scene captions; several minutes) and write
    /// it to the source tree's assets/demo-base
    #[arg(long)]
    pub rebuild_base: bool,
    /// Use this base checkpoint instead of the embedded one
    #[arg(long)]
    pub base: Option<std::path::PathBuf>,
    /// 8: quantize the frozen base matrices to per-row int8 at load (CPU), as `quantization_bit: 8`, for training and both evaluations
    #[arg(long = "quantization_bit", alias = "quantization-bit", value_parser = clap::value_parser!(u32).range(8..=8))]
    pub quantization_bit: Option<u32>,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The base checkpoint
    #[arg(long = "model_name_or_path", alias = "model")]
    pub model: Option<std::path::PathBuf>,
    /// An adapter to compare with the base (repeat, or comma-separate, for several)
    #[arg(long = "adapter_name_or_path", alias = "adapter", value_delimiter = ',')]
    pub adapters: Vec<std::path::PathBuf>,
    /// A merged (exported) checkpoint to compare as well (repeatable)
    #[arg(long)]
    pub merged: Vec<std::path::PathBuf>,
    /// Held-out dataset name(s) in dataset_info.json (or a file path)
    #[arg(long)]
    pub dataset: Option<String>,
    #[arg(long = "dataset_dir", default_value = "data")]
    pub dataset_dir: std::path::PathBuf,
    /// Chat template (default: the one the adapter was trained with, else picked from the checkpoint)
    #[arg(long)]
    pub template: Option<String>,
    /// Evaluate at most this many rows
    #[arg(long = "max_samples")]
    pub max_samples: Option<usize>,
    #[arg(long = "max_new_tokens", default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Where report.md, the prediction files and the chart go
    #[arg(long = "output_dir", default_value = "eval")]
    pub output_dir: std::path::PathBuf,
    /// Examples shown in report.md
    #[arg(long, default_value_t = 8)]
    pub examples: usize,
    /// 8: quantize the frozen base matrices to per-row int8 at load (CPU), as `quantization_bit: 8`
    #[arg(long = "quantization_bit", alias = "quantization-bit", value_parser = clap::value_parser!(u32).range(8..=8))]
    pub quantization_bit: Option<u32>,

    /// Or: a training config (its eval_dataset, or its val_size split of dataset, is used)
    pub config: Option<std::path::PathBuf>,
}
