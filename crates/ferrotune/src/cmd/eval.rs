//! `ferrotune eval`: base vs fine-tunes on a held-out split, side by side.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use ferrotune_core::config::Plan;
use ferrotune_core::eval::runner::{compare, items, Candidate, CompareOptions};
use ferrotune_core::weights::FrozenFormat;

use crate::cli::EvalArgs;

pub fn run(args: EvalArgs) -> Result<ExitCode> {
    // A plan gives the template, cutoff and image settings exactly as training used them.
    let mut overrides: Vec<String> = vec!["do_train=false".into()];
    if let Some(b) = args.quantization_bit {
        overrides.push(format!("quantization_bit={b}"));
    }
    let mut plan = match &args.config {
        Some(cfg) => {
            let mut p = Plan::load(Some(cfg), &overrides)?;
            if p.data.eval_datasets.is_empty() && p.data.val_size == ferrotune_core::config::ValSize::None {
                bail!("{}: set eval_dataset or val_size to say which rows are held out", cfg.display());
            }
            if let Some(m) = &args.model {
                p.model_name_or_path = m.clone();
            }
            p
        }
        None => {
            let model = args.model.as_ref().context("give --model_name_or_path (or a training config)")?;
            let dataset = args.dataset.as_ref().context("give --dataset, the held-out rows (or a training config)")?;
            overrides.push(format!("model_name_or_path={}", model.display()));
            overrides.push(format!("eval_dataset={dataset}"));
            overrides.push(format!("dataset_dir={}", args.dataset_dir.display()));
            if let Some(t) = &args.template {
                overrides.push(format!("template={t}"));
            }
            if let Some(n) = args.max_samples {
                overrides.push(format!("max_samples={n}"));
            }
            Plan::load(None, &overrides)?
        }
    };
    super::threads_for_checkpoint(&plan.model_name_or_path);
    let adapters = if args.adapters.is_empty() { plan.adapter_name_or_path.clone() } else { args.adapters.clone() };
    if plan.data.template.is_none() {
        plan.data.template = trained_template(&plan, &adapters);
    }
    let prepared = ferrotune_core::data::prepare(&plan, &|_, _| {})?;
    if prepared.eval.is_empty() {
        bail!("no held-out rows to evaluate");
    }
    let base = plan.model_name_or_path.clone();
    let format = if plan.quantization_bit == Some(8) { FrozenFormat::Int8 } else { FrozenFormat::Compute };
    let mut candidates = vec![Candidate { name: "base".into(), model_dir: base.clone(), adapters: vec![], format }];
    for a in &adapters {
        let name = a.file_name().and_then(|n| n.to_str()).unwrap_or("adapter").to_string();
        let adapters = vec![a.clone()];
        candidates.push(Candidate { name: format!("base+{name}"), model_dir: base.clone(), adapters, format });
    }
    for m in &args.merged {
        let name = m.file_name().and_then(|n| n.to_str()).unwrap_or("merged").to_string();
        candidates.push(Candidate { name, model_dir: m.clone(), adapters: vec![], format });
    }
    let eval_items = items(&prepared.eval, &ferrotune_core::tokenizer::Tokenizer::from_path(&base)?)?;
    let opts = CompareOptions {
        max_new_tokens: args.max_new_tokens,
        report_examples: args.examples,
        progress: std::io::stderr().is_terminal(),
        title: format!("evaluation on {} held-out rows", eval_items.len()),
    };
    let c = compare(&candidates, &eval_items, &opts, &args.output_dir)?;
    print!("{}", c.files.table);
    println!("\nreport: {}", c.files.report.display());
    for chart in &c.files.charts {
        println!("chart:  {}", chart.display());
    }
    for p in &c.files.predictions {
        println!("predictions: {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// With no template named, the one the (last) adapter was trained with, read from the `chat_template.jinja`
/// training wrote beside it, so that every model is asked with the prompts the adapter learned; `None` (the
/// checkpoint's own format is picked) when no adapter carries a built-in one.
fn trained_template(plan: &Plan, adapters: &[std::path::PathBuf]) -> Option<String> {
    let dir = super::serving::template_of_adapters(adapters)?;
    let jinja = std::fs::read_to_string(dir.join("chat_template.jinja")).ok()?;
    let (t, same) = ferrotune_core::template::rendered_from(&jinja, &plan.data.render_options())?;
    let differs =
        if same { "" } else { "; it was trained with other template options (default_system, enable_thinking)" };
    eprintln!("template: `{}` (the one {} was trained with{differs})", t.name, dir.display());
    Some(t.name.to_string())
}
