//! Config keys, defaults and step arithmetic against LLaMA-Factory 0.9.5 / transformers 5.5.4, and the reference
//! run's config.

use std::path::Path;

use ferrotune_core::config::keys::{self, find, find_unimplemented};
use ferrotune_core::config::raw::same_as_default;
use ferrotune_core::config::{Plan, RawConfig, Resume, StepInputs, Steps};
use ferrotune_core::data::prepare;
use serde_json::Value;

use crate::common::{fixtures, golden, scratch, tiny};

#[test]
fn every_llamafactory_key_is_known_with_its_default() {
    let lf = golden("keys.json");
    let lf = lf.as_object().unwrap();
    let mut problems = Vec::new();
    for (name, default) in lf {
        let ours = find(name).map(|k| k.default).or_else(|| find_unimplemented(name).map(|(_, d)| d));
        match ours {
            None => problems.push(format!("{name}: missing from the key table")),
            Some(d) => {
                let ours: Value = serde_json::from_str(d).unwrap();
                let equal = match (&ours, default) {
                    (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
                    _ => &ours == default,
                };
                if !equal {
                    problems.push(format!("{name}: default {d}, LLaMA-Factory {default}"));
                }
            }
        }
    }
    for name in keys::all_names() {
        if !lf.contains_key(name) {
            problems.push(format!("{name}: not a LLaMA-Factory key"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn total_steps_equal_hf_trainer() {
    let cases = golden("steps.json");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 5);
    for c in cases {
        let f = |k: &str| c[k].as_f64().unwrap();
        let inputs = StepInputs {
            samples: c["samples"].as_u64().unwrap() as usize,
            per_device_batch: c["per_device_train_batch_size"].as_u64().unwrap() as usize,
            grad_accum: c["gradient_accumulation_steps"].as_u64().unwrap() as usize,
            epochs: f("num_train_epochs"),
            max_steps: c["max_steps"].as_i64().unwrap(),
            drop_last: c["dataloader_drop_last"].as_bool().unwrap(),
            warmup: f("warmup_steps"),
            logging_steps: f("logging_steps"),
            save_steps: f("save_steps"),
            eval_steps: None,
        };
        let s = Steps::compute(&inputs).unwrap();
        let e = &c["expected"];
        let n = |k: &str| e[k].as_u64().unwrap() as usize;
        let got = (s.batches_per_epoch, s.steps_per_epoch, s.epochs, s.total_steps, s.effective_batch);
        let want = (n("batches_per_epoch"), n("steps_per_epoch"), n("epochs"), n("total_steps"), n("effective_batch"));
        assert_eq!(got, want, "{inputs:?}");
        assert_eq!(
            (s.warmup_steps, s.logging_steps, s.save_steps),
            (n("warmup_steps"), n("logging_steps"), n("save_steps"))
        );
    }
    // The reference run: 450 samples x 5 epochs, batch 1, accumulation 16.
    assert_eq!(cases[0]["expected"]["total_steps"], 145);
}

#[test]
fn llamafactory_example_config_is_accepted() {
    // examples/train_lora/qwen3vl_lora_sft.yaml with a local model path.
    let yaml = format!(
        "model_name_or_path: {}\nimage_max_pixels: 262144\nvideo_max_pixels: 16384\ntrust_remote_code: true\n\
         stage: sft\ndo_train: true\nfinetuning_type: lora\nlora_rank: 8\nlora_target: all\n\
         dataset: mllm_demo,identity,alpaca_en_demo\ntemplate: qwen3_vl_nothink\ncutoff_len: 2048\nmax_samples: 1000\n\
         preprocessing_num_workers: 16\ndataloader_num_workers: 4\noutput_dir: saves/qwen3-vl-4b/lora/sft\n\
         logging_steps: 10\nsave_steps: 500\nplot_loss: true\noverwrite_output_dir: true\nsave_only_model: false\n\
         report_to: none\nper_device_train_batch_size: 1\ngradient_accumulation_steps: 8\nlearning_rate: 1.0e-4\n\
         num_train_epochs: 3.0\nlr_scheduler_type: cosine\nwarmup_ratio: 0.1\nbf16: true\nddp_timeout: 180000000\n\
         resume_from_checkpoint: null\n",
        tiny().display()
    );
    let raw = RawConfig::parse(&yaml, Path::new("qwen3vl_lora_sft.yaml"), false).unwrap();
    let plan = Plan::from_raw(&raw).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(plan.data.datasets, vec!["mllm_demo", "identity", "alpaca_en_demo"]);
    assert_eq!(plan.data.image_max_pixels, 262144);
    assert_eq!(plan.train.warmup, 0.1);
    assert_eq!(plan.data.max_samples, Some(1000));
    // Non-default inert keys are noted, not ignored silently.
    assert!(plan.notes.iter().any(|n| n.contains("preprocessing_num_workers")));
    assert!(plan.notes.iter().any(|n| n.contains("ddp_timeout")));
}

#[test]
fn reference_run_config() {
    let path = fixtures().join("data/reference_run/train_qwen.yaml");
    let plan = Plan::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(plan.data.template.as_deref(), Some("qwen"));
    assert_eq!(plan.train.learning_rate, 1e-4);
    assert_eq!(plan.lora.alpha, 16.0);
    assert_eq!(plan.train.resume, Resume::Fresh);
    let prepared = prepare(&plan, &|_, _| {}).unwrap_or_else(|e| panic!("{e:#}"));
    let report = &prepared.report;
    assert_eq!((report.train_samples, report.errors(true)), (2, 0), "{report}");
    let text = report.to_string();
    // The poor template match, the role/content reading and the added placeholders are each said once.
    assert!(text.contains("template `qwen` is a poor match") && text.contains("exact match is `qwen3_5`"), "{text}");
    assert!(text.contains("role/content"), "{text}");
    assert!(text.contains("no `<image>` placeholder"), "{text}");
    let steps = report.steps.as_ref().unwrap();
    assert_eq!((steps.steps_per_epoch, steps.total_steps, steps.effective_batch), (1, 5, 16));
    // `qwen` adds its default system prompt; the image is expanded from the checkpoint's processor.
    let tok = ferrotune_core::tokenizer::Tokenizer::from_path(&tiny()).unwrap();
    let first = tok.decode(&prepared.train[0].input_ids, false).unwrap();
    assert!(first.starts_with("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud."), "{first}");
    let pads = prepared.train[0].input_ids.iter().filter(|&&i| i == tok.token_id("<|image_pad|>").unwrap()).count();
    assert_eq!(pads, prepared.train[0].image_tokens[0]);
    assert_eq!(pads, 54); // 640x480 on the tiny processor (see image_tokens.json)
}

#[test]
fn unknown_key_in_a_file_has_place_and_suggestion() {
    let dir = scratch("unknown-key");
    let path = dir.join("train.yaml");
    std::fs::write(&path, format!("model_name_or_path: {}\nstage: sft\nlora_rnak: 16\n", tiny().display())).unwrap();
    let err = format!("{:#}", Plan::load(Some(&path), &[]).unwrap_err());
    assert!(err.contains("train.yaml:3:1") && err.contains("unknown key `lora_rnak`"), "{err}");
    assert!(err.contains("did you mean `lora_rank`?"), "{err}");
    // Overrides name the argument.
    let err = format!(
        "{:#}",
        Plan::load(Some(&path), &["lora_rank=16".into(), "--learning_rat".into(), "1e-4".into()]).unwrap_err()
    );
    assert!(err.contains("argument `--learning_rat 1e-4`") && err.contains("`learning_rate`"), "{err}");
}

#[test]
fn overrides_and_flags() {
    let dir = scratch("overrides");
    let path = dir.join("train.json");
    std::fs::write(
        &path,
        format!("{{\"model_name_or_path\": {:?}, \"learning_rate\": 1e-4}}", tiny().display().to_string()),
    )
    .unwrap();
    let args: Vec<String> =
        ["learning_rate=3e-4", "--lora_rank", "4", "--use_rslora"].iter().map(|s| s.to_string()).collect();
    let plan = Plan::load(Some(&path), &args).unwrap();
    assert_eq!((plan.train.learning_rate, plan.lora.rank, plan.lora.alpha), (3e-4, 4, 8.0));
    assert!(plan.lora.use_rslora);
    // Flags alone, without a file, as `llamafactory-cli train --key value ...`.
    let args: Vec<String> = ["--model_name_or_path", &tiny().display().to_string(), "--cutoff_len", "64"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(Plan::load(None, &args).unwrap().data.cutoff_len, 64);
}

#[test]
fn auto_resume_and_refusal() {
    let out = scratch("resume");
    let yaml = |overwrite: bool| {
        format!(
            "model_name_or_path: {}\ndo_train: true\ndataset: x\noutput_dir: {}\noverwrite_output_dir: {overwrite}\n",
            tiny().display(),
            out.display()
        )
    };
    let load = |overwrite| Plan::from_raw(&RawConfig::parse(&yaml(overwrite), Path::new("t.yaml"), false).unwrap());
    std::fs::create_dir_all(out.join("checkpoint-50")).unwrap();
    std::fs::create_dir_all(out.join("checkpoint-100")).unwrap();
    std::fs::create_dir_all(out.join("checkpoint-9")).unwrap();
    assert_eq!(load(false).unwrap().train.resume, Resume::Auto(out.join("checkpoint-100")));
    assert_eq!(load(true).unwrap().train.resume, Resume::Fresh);
    for c in ["checkpoint-50", "checkpoint-100", "checkpoint-9"] {
        std::fs::remove_dir_all(out.join(c)).unwrap();
    }
    std::fs::write(out.join("adapter_model.safetensors"), b"").unwrap();
    let err = load(false).unwrap_err().to_string();
    assert!(err.contains("overwrite_output_dir"), "{err}");
}

#[test]
fn known_but_unimplemented_keys_say_so() {
    for (k, v) in [("deepspeed", "ds_z3.json"), ("quantization_bit", "4"), ("use_dora", "true"), ("report_to", "wandb")]
    {
        let yaml = format!("model_name_or_path: {}\n{k}: {v}\n", tiny().display());
        let err =
            format!("{:#}", Plan::from_raw(&RawConfig::parse(&yaml, Path::new("t.yaml"), false).unwrap()).unwrap_err());
        assert!(err.contains("not implement"), "{k}: {err}");
        assert!(err.contains("t.yaml:2:1"), "{k}: {err}");
    }
    assert!(same_as_default(&Value::Null, "null"));
}

/// The plan's error for `pairs` on top of the tiny checkpoint, as `{:#}`.
fn plan_error(pairs: &[(&str, Value)]) -> String {
    match Plan::from_raw(&crate::common::raw_config(pairs)) {
        Ok(_) => panic!("{pairs:?} was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn zero_intervals_are_errors_at_plan_time() {
    use serde_json::json;
    let eval = [("dataset", json!("mllm_rc")), ("val_size", json!(0.1)), ("eval_strategy", json!("steps"))];
    // logging_steps 0 with eval steps (eval_steps falls back to it): HF "requires non-zero --eval_steps or
    // --logging_steps". Before, this passed and divided by zero in the training loop.
    let mut pairs = eval.to_vec();
    pairs.extend([("logging_steps", json!(0)), ("logging_strategy", json!("no"))]);
    let err = plan_error(&pairs);
    assert!(err.contains("`logging_steps`") && err.contains("non-zero `eval_steps` or `logging_steps`"), "{err}");
    pairs.push(("eval_steps", json!(0)));
    let err = plan_error(&pairs);
    assert!(err.contains("`eval_steps`") && err.contains("hint:"), "{err}");
    // With the default logging_strategy (steps) logging_steps 0 is refused on its own, as in HF.
    let err = plan_error(&[("logging_steps", json!(0))]);
    assert!(err.contains("`logging_steps` is 0") && err.contains("logging_strategy: no"), "{err}");
    // save_steps 0 saves never in HF (silently); here it is an error that says how to ask for that.
    let err = plan_error(&[("save_steps", json!(0))]);
    assert!(err.contains("`save_steps` is 0") && err.contains("save_strategy: no"), "{err}");
    // The same keys with their strategy off, or an eval_steps of its own, are fine.
    crate::common::plan(&[("save_steps", json!(0)), ("save_strategy", json!("no"))]);
    let mut pairs = eval.to_vec();
    pairs.extend([("logging_steps", json!(0)), ("logging_strategy", json!("no")), ("eval_steps", json!(5))]);
    let p = crate::common::plan(&pairs);
    assert_eq!(p.train.steps(10).unwrap().eval_steps, Some(5));
    // A place is named when the key came from a file.
    let yaml = format!("model_name_or_path: {}\nsave_steps: 0\n", tiny().display());
    let err =
        format!("{:#}", Plan::from_raw(&RawConfig::parse(&yaml, Path::new("t.yaml"), false).unwrap()).unwrap_err());
    assert!(err.contains("t.yaml:2:1: `save_steps`"), "{err}");
}

#[test]
fn batch_products_that_overflow_are_errors() {
    use serde_json::json;
    let err =
        plan_error(&[("per_device_train_batch_size", json!(i64::MAX)), ("gradient_accumulation_steps", json!(4))]);
    assert!(err.contains("`gradient_accumulation_steps`") && err.contains("hint:"), "{err}");
    // lora_alpha defaults to 2 x rank, in floating point.
    let p = crate::common::plan(&[("lora_rank", json!(i64::MAX))]);
    assert_eq!(p.lora.alpha, i64::MAX as f64 * 2.0);
}

/// Random values for the numeric keys (one or several at once) through `data check`'s code: Ok or an error,
/// never a panic. `ferrotune bench config-fuzz --cases 10000` runs more.
#[test]
fn numeric_keys_never_panic() {
    use ferrotune_core::data::fuzz::{fuzz, numeric_keys, FuzzSetup};
    assert!(numeric_keys().len() >= 30, "{:?}", numeric_keys());
    let setup = FuzzSetup {
        checkpoint: tiny(),
        dataset_dir: fixtures().join("data"),
        output_dir: scratch("fuzz").join("out-never-created"),
    };
    let cases = 300;
    let report = fuzz(&setup, cases, 20240611);
    eprintln!(
        "config fuzz: {} cases, {} ok, {} errors, {} panics in {:.1} s",
        report.cases,
        report.ok,
        report.err,
        report.panics.len(),
        report.seconds
    );
    let panics: Vec<String> =
        report.panics.iter().map(|p| format!("{}\n--- panicked: {}", p.yaml, p.message)).collect();
    assert!(panics.is_empty(), "{} panic(s):\n{}", panics.len(), panics.join("\n\n"));
    // Both outcomes occur: the base config is valid, and the edge values are refused.
    assert!(report.ok > cases / 10 && report.err > cases / 10, "{report:?}");
    assert!(!setup.output_dir.exists(), "data check wrote nothing");
}
