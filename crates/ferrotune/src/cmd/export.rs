//! `ferrotune export`: adapters merged into the base, written as a complete checkpoint (see
//! `ferrotune_core::export`). Takes LLaMA-Factory's `examples/merge_lora/*.yaml` as they are.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use ferrotune_core::export::{export, parse_dtype, ExportOptions};
use ferrotune_core::gguf::{export_gguf, GgufOptions, Quant};

use super::serving::{adapter_dirs, layered, named_template, template_of_adapters};

#[derive(Parser, Clone, Debug, Default)]
#[command(args_override_self = true)]
pub struct Args {
    /// A YAML file with the same keys as the flags (LLaMA-Factory's merge_lora files work), and/or `key=value`.
    #[arg(value_name = "CONFIG.yaml | KEY=VALUE")]
    pub config: Vec<String>,
    /// The base checkpoint folder.
    #[arg(long = "model_name_or_path", alias = "model-name-or-path", value_name = "DIR")]
    pub model_name_or_path: Option<PathBuf>,
    /// Adapter folder(s) to merge, comma-separated.
    #[arg(long = "adapter_name_or_path", alias = "adapter-name-or-path", value_name = "DIR[,DIR..]")]
    pub adapter_name_or_path: Option<String>,
    /// LLaMA-Factory template to write as the export's chat template when the adapter does not carry the one it
    /// was trained with (its chat_template.jinja always wins). Unset: the base's.
    #[arg(long)]
    pub template: Option<String>,
    /// Where to write the merged checkpoint (a new or empty folder).
    #[arg(long = "export_dir", alias = "export-dir", value_name = "DIR")]
    pub export_dir: Option<PathBuf>,
    /// Largest shard in GB (10^9 bytes); default 5.
    #[arg(long = "export_size", alias = "export-size", value_name = "GB")]
    pub export_size: Option<f64>,
    /// auto (keep the stored dtypes), float32, bfloat16 or float16.
    #[arg(long = "infer_dtype", alias = "infer-dtype", value_name = "DTYPE")]
    pub infer_dtype: Option<String>,
    /// safetensors (a checkpoint for transformers, vLLM and ferrotune), gguf (llama.cpp / Ollama / LM Studio:
    /// `<name>-<QUANT>.gguf` with the adapters merged, `mmproj-<name>-F16.gguf` with the vision tower, and a
    /// Modelfile) or gguf-lora (the adapter alone, for llama.cpp's `--lora`).
    #[arg(long = "export_format", alias = "export-format", value_name = "FORMAT")]
    pub export_format: Option<String>,
    /// GGUF weight type: bf16 (default), f16, q8_0 or q4_k_m (llama-quantize's mix of Q4_K and Q6_K); gguf-lora:
    /// f32 (default), bf16, f16 or q8_0.
    #[arg(long = "export_quant", alias = "export-quant", value_name = "TYPE")]
    pub export_quant: Option<String>,
    /// Replace the checkpoint files of a non-empty export_dir.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub overwrite: Option<bool>,
    /// cpu or auto: merging always runs on the CPU here (it is I/O-bound).
    #[arg(long = "export_device", alias = "export-device", hide = true)]
    pub export_device: Option<String>,
    #[arg(long = "export_legacy_format", alias = "export-legacy-format", hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub export_legacy_format: Option<bool>,
    #[arg(long = "export_hub_model_id", alias = "export-hub-model-id", hide = true)]
    pub export_hub_model_id: Option<String>,
    #[arg(long = "export_quantization_bit", alias = "export-quantization-bit", hide = true)]
    pub export_quantization_bit: Option<u32>,
    #[arg(long = "finetuning_type", alias = "finetuning-type", hide = true)]
    pub finetuning_type: Option<String>,
    #[arg(long = "trust_remote_code", alias = "trust-remote-code", hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub trust_remote_code: Option<bool>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let args = layered::<Args>("export", &args.config, &[])?.unwrap_or(args);
    if args.export_legacy_format == Some(true) {
        bail!("export_legacy_format: true asks for .bin weights; ferrotune writes safetensors only (remove the key)");
    }
    if args.export_hub_model_id.is_some() {
        bail!("export_hub_model_id: ferrotune does not upload; export, then `huggingface-cli upload REPO DIR`");
    }
    if args.export_quantization_bit.is_some() {
        bail!("export_quantization_bit: a quantized safetensors export is not supported; for 8- or 4-bit weights use --export_format gguf --export_quant q8_0 (or q4_k_m)");
    }
    if let Some(t) = args.finetuning_type.as_deref().filter(|t| *t != "lora") {
        bail!("finetuning_type {t:?}: only LoRA adapters are merged by export");
    }
    if let Some(d) = args.export_device.as_deref().filter(|d| !matches!(*d, "cpu" | "auto")) {
        bail!("export_device {d:?}: expected cpu or auto");
    }
    let Some(model_dir) = args.model_name_or_path.clone() else {
        bail!("no base model: pass --model_name_or_path DIR (or `model_name_or_path:` in the YAML file)")
    };
    let Some(export_dir) = args.export_dir.clone() else { bail!("no output folder: pass --export_dir DIR") };
    let adapters = adapter_dirs(args.adapter_name_or_path.as_deref())?;
    let gb = args.export_size.unwrap_or(5.0);
    if !(gb > 0.0 && gb.is_finite()) {
        bail!("export_size must be a positive number of GB, got {gb}");
    }
    let chat_template = match (args.template.as_deref(), template_of_adapters(&adapters)) {
        (Some(name), Some(dir)) => {
            eprintln!(
                "note: template {name} is not used: {} holds the chat template the adapter was trained with",
                dir.display()
            );
            None
        }
        (Some(name), None) => Some(named_template(name)?),
        (None, _) => None,
    };
    let format = args.export_format.as_deref().unwrap_or("safetensors");
    match format {
        "safetensors" => {
            if let Some(q) = &args.export_quant {
                bail!("export_quant {q:?} applies to --export_format gguf or gguf-lora");
            }
        }
        "gguf" | "gguf-lora" => {
            let lora_only = format == "gguf-lora";
            if lora_only && adapters.is_empty() {
                bail!("--export_format gguf-lora writes an adapter: pass --adapter_name_or_path DIR");
            }
            let quant = Quant::parse(args.export_quant.as_deref().unwrap_or(if lora_only { "f32" } else { "bf16" }))?;
            let opts = GgufOptions {
                model_dir,
                adapters,
                export_dir: export_dir.clone(),
                quant,
                lora_only,
                overwrite: args.overwrite.unwrap_or(false),
                chat_template,
            };
            let t = std::time::Instant::now();
            let report = export_gguf(&opts, |line| eprintln!("{line}"))?;
            let types: Vec<String> = report.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
            eprintln!(
                "exported {} ({} merged modules; tensors: {}) to {} in {:.1}s",
                report
                    .files
                    .iter()
                    .map(|(f, b)| format!("{f} {:.1} MB", *b as f64 / 1e6))
                    .collect::<Vec<_>>()
                    .join(", "),
                report.merged_modules,
                types.join(", "),
                export_dir.display(),
                t.elapsed().as_secs_f64()
            );
            return Ok(ExitCode::SUCCESS);
        }
        other => bail!("export_format {other:?}: expected safetensors, gguf or gguf-lora"),
    }
    let opts = ExportOptions {
        model_dir,
        adapters,
        export_dir: export_dir.clone(),
        shard_bytes: ((gb * 1e9) as u64).max(1),
        dtype: parse_dtype(args.infer_dtype.as_deref().unwrap_or("auto"))?,
        overwrite: args.overwrite.unwrap_or(false),
        chat_template,
    };
    let t = std::time::Instant::now();
    let report = export(&opts, |line| eprintln!("{line}"))?;
    let total: u64 = report.shards.iter().map(|(_, b)| b).sum();
    eprintln!(
        "exported {} tensors ({} merged with {} adapter(s)), {:.1} MB in {} shard(s), dtype {}, to {} in {:.1}s",
        report.tensors,
        report.merged_modules,
        opts.adapters.len(),
        total as f64 / 1e6,
        report.shards.len(),
        report.dtype,
        export_dir.display(),
        t.elapsed().as_secs_f64()
    );
    eprintln!("files: {}", report.files.join(", "));
    if let Some(from) = &report.template_from {
        eprintln!("chat template from {from}");
    }
    Ok(ExitCode::SUCCESS)
}
