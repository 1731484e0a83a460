//! `ferrotune bench train|forward|decode`: speed and peak memory on a checkpoint (or a generated one), with
//! the Python anchor run in the same invocation when asked.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use ferrotune_core::bench::{self, BenchReport, TrainBench};
use ferrotune_core::models::qwen3_5::init::{write_random_checkpoint, Sizes};
use ferrotune_core::sys;

use crate::cli::BenchArgs;

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    if args.what == "config-fuzz" {
        return config_fuzz(&args);
    }
    if let Some(t) = args.threads {
        // Both candle's matmul and our rayon loops read this before their pools start.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    if args.what == "packing" {
        return packing(&args);
    }
    if args.what == "kernels" {
        return kernels(&args);
    }
    // The device first: no point generating a checkpoint for a GPU that is not there.
    let dev = ferrotune_core::device::parse_device(&args.device)?;
    let model = checkpoint(&args)?;
    if args.threads.is_none() {
        // The thread count train and serve would pick for this model.
        super::threads_for_checkpoint(&model);
    }
    // bf16 base weights on a GPU (as training with `bf16: true`), f32 on the CPU unless asked.
    let dtype = match (args.dtype.as_str(), args.bf16) {
        (_, true) | ("bf16", _) => DType::BF16,
        ("f32", _) => DType::F32,
        _ if dev.is_cpu() => DType::F32,
        _ => DType::BF16,
    };
    let base = bench::Base { dtype, int8: args.quantization_bit == Some(8) };
    let report = match args.what.as_str() {
        "train" => {
            let opts = TrainBench {
                seq_len: args.seq,
                image_side: args.image,
                steps: args.steps,
                warmup: 1,
                rank: args.rank,
                targets: ferrotune_core::lora::ALL_DECODER_LINEARS.iter().map(|s| s.to_string()).collect(),
                checkpointing: !args.no_checkpointing,
                keep_layers: args.keep_layers,
            };
            bench::train(&model, &opts, base, &dev)?
        }
        "forward" => bench::forward(&model, args.seq, args.image, args.steps, base, &dev)?,
        "decode" => {
            let lora = (args.adapters > 0).then_some((args.adapters, args.rank));
            bench::decode(&model, args.seq, args.new_tokens, args.batch.max(1), lora, base, &dev)?
        }
        other => bail!("unknown benchmark {other}"),
    };
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!("model: {} ({:.1}M parameters), threads: {threads}", model.display(), report.params as f64 / 1e6);
    println!("device: {}, base weights in {}", report.device, report.dtype_label());
    print_row("ferrotune", &args, &report);
    let mut json =
        serde_json::json!({"bench": args.what, "model": model.display().to_string(), "ferrotune": report.to_json()});
    if args.json && args.python.is_some() {
        // Ours now, in case the anchor does not finish; the line after it adds the anchor's numbers.
        println!("{json}");
    }
    // A failing anchor is reported, not fatal: ferrotune's own numbers above stand.
    let anchor = args
        .python
        .as_ref()
        .map(|py| python_anchor(py, &model, &args, &dev, if base.int8 { DType::BF16 } else { dtype }))
        .transpose();
    let anchor = anchor.unwrap_or_else(|e| {
        eprintln!("the Python anchor did not run: {e:#}");
        None
    });
    if let Some(anchor) = anchor {
        print_row(anchor_name(&args.what), &args, &anchor);
        if dev.is_cpu() {
            println!(
                "ratio (ferrotune / python): CPU time {:.2}x, peak RSS {:.2}x",
                report.cpu_per_sample / anchor.cpu_per_sample,
                report.peak_rss.unwrap_or(0) as f64 / anchor.peak_rss.unwrap_or(1).max(1) as f64
            );
        } else {
            println!(
                "ratio (ferrotune / python): wall time {:.2}x, peak GPU memory {:.2}x",
                report.wall_per_sample / anchor.wall_per_sample,
                report.peak_gpu.unwrap_or(0) as f64 / anchor.peak_gpu.unwrap_or(1).max(1) as f64
            );
        }
        json["python"] = anchor.to_json();
    }
    if args.json {
        println!("{json}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `bench kernels`: the machine's FMA peak and read bandwidth beside the frozen-weight products at the MLP shape
/// of `--preset` (hidden → intermediate), with `--seq` rows (training, prefill) and one row (decoding).
fn kernels(args: &BenchArgs) -> Result<ExitCode> {
    let sizes = Sizes::preset(&args.preset).with_context(|| format!("unknown preset {:?}", args.preset))?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!(
        "kernels at the {} MLP shape (hidden {}, intermediate {}), threads: {threads}",
        args.preset, sizes.hidden_size, sizes.intermediate_size
    );
    let rows = bench::kernels(sizes.hidden_size, sizes.intermediate_size, args.seq, args.steps.max(1))?;
    let find = |prefix: &str| rows.iter().find(|r| r.name.starts_with(prefix));
    let peak = find("f32 FMA peak").and_then(|r| r.gflops).unwrap_or(f64::NAN);
    // Products on the tile units are measured against the tiles' own peak.
    let amx_peak = find("AMX bf16 peak").and_then(|r| r.gflops).unwrap_or(f64::NAN);
    let dp_peak = find("AVX512-BF16 peak").and_then(|r| r.gflops).unwrap_or(f64::NAN);
    let bw = find("read bandwidth").map_or(f64::NAN, |r| r.gbytes);
    println!("\n| kernel | ms | GFLOP/s | % of peak (FMA; AMX or AVX512-BF16 for their rows) | weight GB/s | % of read bandwidth |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let (g, gp) = match r.gflops {
            Some(g) => {
                let p = if r.name.contains("AMX") {
                    amx_peak
                } else if r.name.contains("AVX512-BF16") {
                    dp_peak
                } else {
                    peak
                };
                (format!("{g:.1}"), format!("{:.0}%", 100.0 * g / p))
            }
            None => ("–".into(), "–".into()),
        };
        let (b, bp) = if r.gbytes > 0.0 {
            (format!("{:.1}", r.gbytes), format!("{:.0}%", 100.0 * r.gbytes / bw))
        } else {
            ("–".into(), "–".into())
        };
        println!("| {} | {:.2} | {g} | {gp} | {b} | {bp} |", r.name, r.seconds * 1e3);
    }
    Ok(ExitCode::SUCCESS)
}

/// `bench packing`: the real training loop for `--steps` optimizer steps on the demo's robot data, unpacked,
/// with `packing` and with `neat_packing` (rows of at most `--seq` tokens), on the demo's base (`--preset demo`)
/// or a checkpoint; tokens per second counts the samples' tokens, padding excluded.
fn packing(args: &BenchArgs) -> Result<ExitCode> {
    use ferrotune_core::demo::pipeline::{train_yaml, DemoOptions};
    use ferrotune_core::demo::robots::{generate, RobotOptions};
    let work = args.cache.join("packing-bench");
    let base = if args.model.is_none() && args.preset == "demo" {
        let b = work.join("demo-base");
        if !b.join("config.json").exists() {
            ferrotune_core::demo::base::write_embedded(&b, super::demo::EMBEDDED_BASE)?;
        }
        b
    } else {
        checkpoint(args)?
    };
    if args.threads.is_none() {
        super::threads_for_checkpoint(&base);
    }
    let data = work.join("data");
    let opts = DemoOptions { out: work.clone(), ..DemoOptions::default() };
    if !data.join("dataset_info.json").exists() {
        generate(&data, &RobotOptions { n_train: 200, n_eval: 10, seed: opts.seed, lang: opts.lang })?;
    }
    let yaml = work.join("train.yaml");
    std::fs::write(&yaml, train_yaml(&base, &data, &work.join("out"), &opts))?;
    println!("model: {}, data: {} (demo robots), rows of at most {} tokens", base.display(), data.display(), args.seq);
    let mut results = Vec::new();
    for (name, packing, neat) in [("unpacked", false, false), ("packing", true, false), ("neat_packing", true, true)] {
        let overrides: Vec<String> = [
            format!("packing={packing}"),
            format!("neat_packing={neat}"),
            format!("cutoff_len={}", args.seq),
            format!("max_steps={}", args.steps),
            "val_size=0".into(),
            "do_eval=false".into(),
            "eval_strategy=no".into(),
            "save_steps=1000000".into(),
            format!("logging_steps={}", args.steps),
            "plot_loss=false".into(),
            format!("output_dir={}", work.join(format!("out-{name}")).display()),
            "overwrite_output_dir=true".into(),
        ]
        .into();
        let plan = ferrotune_core::config::Plan::load(Some(&yaml), &overrides)?;
        let prepared = ferrotune_core::data::prepare(&plan, &|_, _| {})?;
        let rows = prepared.train.len();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let t0 = std::time::Instant::now();
        let cpu0 = sys::cpu_seconds();
        let outcome = ferrotune_core::train::run::run(
            &plan,
            &prepared,
            &ferrotune_core::train::run::RunOptions {
                stop: &stop,
                progress: false,
                halt_after_step: None,
                device: None,
                workers: None,
            },
        )?;
        let (wall, cpu) = (t0.elapsed().as_secs_f64(), sys::cpu_seconds() - cpu0);
        results.push((name, rows, outcome.global_step, outcome.tokens_seen, wall, cpu));
    }
    println!("\n| run | training rows | steps | tokens | wall s | tokens/s | CPU-s per 1k tokens |");
    println!("|---|---|---|---|---|---|---|");
    for (name, rows, steps, tokens, wall, cpu) in &results {
        println!(
            "| {name} | {rows} | {steps} | {tokens} | {wall:.1} | {:.1} | {:.2} |",
            *tokens as f64 / wall,
            cpu / (*tokens as f64 / 1000.0)
        );
    }
    if let Some(rss) = sys::peak_rss_bytes() {
        println!("peak RSS of the whole run: {:.0} MB", rss as f64 / 1e6);
    }
    Ok(ExitCode::SUCCESS)
}

/// `bench config-fuzz`: seeded random configs through `data check`'s code on the tiny fixture; every case must
/// end in Ok or an error. Prints the counts and the config of every panic; a panic makes the exit status 1.
/// Run it from a debug build (`cargo run -p ferrotune -- bench config-fuzz`): only there does an integer
/// overflow panic instead of wrapping silently.
fn config_fuzz(args: &BenchArgs) -> Result<ExitCode> {
    use ferrotune_core::data::fuzz::{fuzz, FuzzSetup};
    let scratch = std::env::temp_dir().join(format!("ferrotune-config-fuzz-{}", std::process::id()));
    let setup = FuzzSetup {
        checkpoint: repo_file("tests/fixtures/tiny-qwen3_5")?,
        dataset_dir: repo_file("tests/fixtures/data")?,
        output_dir: scratch.join("out-never-created"),
    };
    // Each panic's message and place go to stderr (the default hook); its config is printed here.
    let report = fuzz(&setup, args.cases, args.seed);
    for p in &report.panics {
        println!("--- panicked ({}) on this config:\n{}", p.message, p.yaml);
    }
    println!(
        "config-fuzz: {} cases (seed {}), {} ok, {} errors, {} panics, {:.1} s",
        report.cases,
        args.seed,
        report.ok,
        report.err,
        report.panics.len(),
        report.seconds
    );
    if setup.output_dir.exists() {
        bail!("{}: data check wrote into output_dir", setup.output_dir.display());
    }
    Ok(if report.panics.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn anchor_name(what: &str) -> &'static str {
    if what == "train" {
        "pytorch+peft"
    } else {
        "transformers"
    }
}

fn print_row(name: &str, args: &BenchArgs, r: &BenchReport) {
    let unit = if args.what == "decode" { "token" } else { "sample" };
    let rss = r.peak_rss.map(|b| format!("{:.0} MB", b as f64 / 1e6)).unwrap_or_else(|| "?".into());
    let gpu = r.peak_gpu.map(|b| format!(", peak GPU memory {:.2} GiB", b as f64 / (1u64 << 30) as f64));
    let ttft = r.ttft.map(|t| format!(", time to first token {:.3} s", t)).unwrap_or_default();
    let load = r.load_s.map(|t| format!(", load {t:.1} s")).unwrap_or_default();
    println!(
        "{name:>14}: {:.4} s/{unit} wall, {:.4} CPU-s/{unit}, {:.2} {unit}s/s, {:.1} tokens/s, peak RSS {rss}{}{ttft}{load}",
        r.wall_per_sample,
        r.cpu_per_sample,
        1.0 / r.wall_per_sample,
        r.tokens_per_second(),
        gpu.unwrap_or_default()
    );
}

/// The given checkpoint, or a generated random-init one of the preset (written once, then reused).
fn checkpoint(args: &BenchArgs) -> Result<PathBuf> {
    if let Some(m) = &args.model {
        return Ok(m.clone());
    }
    let template = repo_file("tests/fixtures/tiny-qwen3_5")?;
    if args.preset == "tiny" {
        return Ok(template);
    }
    let sizes = Sizes::preset(&args.preset)
        .with_context(|| format!("unknown preset {:?} (tiny, demo, 100m, 135m, 1b, 0.8b, 2b, 4b)", args.preset))?;
    let dir = args.cache.join(format!("qwen3_5-{}", args.preset));
    if !dir.join("model.safetensors").exists() {
        eprintln!("generating a random-init {} checkpoint in {}", args.preset, dir.display());
        write_random_checkpoint(&sizes, &template, &dir, DType::BF16, 0)?;
    }
    Ok(dir)
}

/// A file of the repository: where it was built, or under the current folder (a binary carried to another
/// machine runs from the repository root there).
fn repo_file(rel: &str) -> Result<PathBuf> {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel);
    if built.exists() {
        return Ok(built);
    }
    let here = PathBuf::from(rel);
    if here.exists() {
        return Ok(here);
    }
    bail!("{rel} not found (run from the repository root, or pass --model)")
}

fn python_anchor(py: &Path, model: &Path, args: &BenchArgs, dev: &Device, dtype: DType) -> Result<BenchReport> {
    let script = repo_file("tools/bench/anchor.py")?;
    let mut cmd = std::process::Command::new(py);
    cmd.arg(&script)
        .arg(&args.what)
        .arg(model)
        .args(["--seq", &args.seq.to_string(), "--steps", &args.steps.to_string()])
        .args(["--rank", &args.rank.to_string(), "--new-tokens", &args.new_tokens.to_string()])
        .args(["--batch", &args.batch.max(1).to_string()])
        .args(["--adapters", &args.adapters.to_string()]);
    if let Some(t) = args.threads {
        cmd.args(["--threads", &t.to_string()]).env("OMP_NUM_THREADS", t.to_string());
    }
    if !args.no_checkpointing {
        cmd.arg("--checkpointing");
    }
    if args.image > 0 {
        cmd.args(["--image", &args.image.to_string()]);
    }
    if !dev.is_cpu() {
        cmd.args(["--device", "cuda"]);
    }
    if dtype == DType::BF16 {
        cmd.arg("--bf16");
    }
    let out = cmd.output().with_context(|| format!("running {}", py.display()))?;
    if !out.status.success() {
        bail!("the Python anchor failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("anchor output: {line}"))?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(BenchReport {
        device: v["device"].as_str().unwrap_or("?").to_string(),
        dtype,
        int8: false,
        params: 0,
        trainable: 0,
        tokens_per_sample: if args.what == "decode" { 1 } else { args.seq },
        wall_per_sample: f("wall_per_sample"),
        cpu_per_sample: f("cpu_per_sample"),
        peak_rss: v["peak_rss"].as_u64(),
        peak_gpu: v["peak_gpu"].as_u64(),
        ttft: v["ttft"].as_f64(),
        load_s: v["load_s"].as_f64(),
    })
}
