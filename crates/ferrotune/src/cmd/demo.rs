//! `ferrotune demo`: the README's first command.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use base64::Engine as _;
use ferrotune_core::demo::base::{assets_dir, rebuild, BaseWeights, Recipe};
use ferrotune_core::demo::pipeline::{run as run_demo, DemoOptions};

use crate::cli::DemoArgs;

/// The pretrained demo base, when this build has it. Only the binary embeds it: the library's test binaries
/// would otherwise each carry the 8 MB of weights.
#[cfg(demo_base)]
pub const EMBEDDED_BASE: Option<BaseWeights> = Some(BaseWeights {
    config: include_bytes!("../../../ferrotune-core/assets/demo-base/config.json"),
    weights: include_bytes!("../../../ferrotune-core/assets/demo-base/model.safetensors"),
});
#[cfg(not(demo_base))]
pub const EMBEDDED_BASE: Option<BaseWeights> = None;

pub fn run(args: DemoArgs) -> Result<ExitCode> {
    static STOP: AtomicBool = AtomicBool::new(false);
    let progress = std::io::stderr().is_terminal();
    if args.rebuild_base {
        let out = assets_dir();
        let work = args.out.join("base-pretraining");
        let path = rebuild(&out, &work, &Recipe::default(), &STOP, progress)?;
        println!("wrote {}; rebuild ferrotune (cargo build --release) to embed it", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    // The recipe above keeps the default threads: its bit-for-bit rebuild holds for a given thread count.
    match &args.base {
        Some(dir) => super::threads_for_checkpoint(dir),
        None => super::threads_for_model(EMBEDDED_BASE.map(|b| b.config)),
    }
    let opts = DemoOptions {
        out: args.out.clone(),
        lang: args.lang.parse()?,
        n_train: args.train_rows,
        n_eval: args.eval_rows,
        epochs: args.epochs,
        progress,
        base: args.base.clone(),
        quantization_bit: args.quantization_bit,
        embedded: EMBEDDED_BASE,
        ..Default::default()
    };
    let r = run_demo(&opts, &STOP)?;
    println!("\nheld-out robots, before and after the LoRA ({} rows):\n", r.comparison.runs[0].predictions.len());
    print!("{}", r.comparison.files.table);
    let out = opts.out.canonicalize().unwrap_or(opts.out.clone());
    println!("\nreport:        {}", r.comparison.files.report.display());
    println!("loss curve:    {}", r.adapter.join("training_loss.png").display());
    println!("config:        {}", r.yaml.display());
    println!("adapter:       {}", r.adapter.display());
    println!("demo time:     {:.0} s", r.seconds);
    println!("\nServe it (OpenAI-compatible):\n");
    println!(
        "  ferrotune api --model_name_or_path {} --adapter_name_or_path {}\n",
        r.base.display(),
        r.adapter.display()
    );
    if let Some(img) = &r.example_image {
        let bytes = std::fs::read(img).with_context(|| format!("{}: cannot read", img.display()))?;
        let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes));
        let body = serde_json::json!({
            "model": "base",
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": r.example_prompt}
            ]}],
            "max_tokens": 96,
            "temperature": 0
        });
        let req = out.join("request.json");
        std::fs::write(&req, serde_json::to_string_pretty(&body)?)?;
        println!("and ask it about a held-out picture (the image is sent as a data URL; {}):\n", req.display());
        println!(
            "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d @{}",
            req.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
