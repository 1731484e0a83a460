//! The training loop end to end on the tiny checkpoint: files in LLaMA-Factory's formats, exact resume,
//! evaluation during training, full fine-tuning, and the NaN guard.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use ferrotune_core::config::Plan;
use ferrotune_core::data::prepare;
use ferrotune_core::device::DeviceSpec;
use ferrotune_core::train::run::{run, Outcome, RunOptions};

use crate::common::{fixtures, scratch, tiny_checkpoint};

/// A dataset of 12 rows (8 with images, 4 text only) and a config for it; returns the config path.
fn setup(dir: &Path, model: &Path, extra: &str) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let imgs = ["img_a.png", "img_b.png", "img_c.png"];
    let mut rows = Vec::new();
    for i in 0..12 {
        let answer =
            format!("这是第{i}个样本。It has {} wheels and a {} head.", i % 4 + 1, ["round", "square", "dome"][i % 3]);
        let (content, images) = if i % 3 == 2 {
            (format!("Tell me something about number {i}."), vec![])
        } else {
            let p = fixtures().join("golden/model").join(imgs[i % 3]);
            ("<image>请识别并描述图片中的机器人及其特征".to_string(), vec![p.display().to_string()])
        };
        rows.push(serde_json::json!({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}], "images": images}));
    }
    std::fs::write(data.join("rows.json"), serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    std::fs::write(
        data.join("dataset_info.json"),
        r#"{"rows": {"file_name": "rows.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"}, "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}"#,
    )
    .unwrap();
    let cfg = format!(
        "model_name_or_path: {}\ntemplate: qwen3_5_nothink\nstage: sft\ndo_train: true\nfinetuning_type: lora\n\
         lora_target: all\nlora_rank: 4\ndataset: rows\ndataset_dir: {}\nlearning_rate: 5.0e-3\nnum_train_epochs: 2\n\
         per_device_train_batch_size: 1\ngradient_accumulation_steps: 2\nlr_scheduler_type: cosine\nwarmup_ratio: 0.1\n\
         logging_steps: 1\nsave_steps: 4\noutput_dir: {}\nplot_loss: true\nreport_to: none\n{extra}",
        model.display(),
        data.display(),
        dir.join("out").display()
    );
    let path = dir.join("train.yaml");
    std::fs::write(&path, cfg).unwrap();
    path
}

fn train(cfg: &Path, overrides: &[&str], halt: Option<usize>) -> anyhow::Result<Outcome> {
    let args: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let plan = Plan::load(Some(cfg), &args)?;
    let data = prepare(&plan, &|_, _| {})?;
    let stop = AtomicBool::new(false);
    run(
        &plan,
        &data,
        &RunOptions {
            stop: &stop,
            progress: false,
            halt_after_step: halt,
            device: Some(DeviceSpec::Cpu),
            workers: None,
        },
    )
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn writes_llamafactory_files_and_resumes_exactly() {
    let a = scratch("resume-a");
    let cfg_a = setup(&a, &tiny_checkpoint(), "overwrite_output_dir: true\n");
    let full = train(&cfg_a, &[], None).unwrap();
    assert_eq!(full.total_steps, 12, "12 samples, accumulation 2, 2 epochs");
    assert_eq!(full.global_step, 12);
    let out = a.join("out");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "trainer_log.jsonl",
        "trainer_state.json",
        "train_results.json",
        "all_results.json",
        "training_loss.png",
        "tokenizer.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "checkpoint-4/adapter_model.safetensors",
        "checkpoint-8/optimizer.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let state: serde_json::Value = serde_json::from_slice(&read(&out.join("trainer_state.json"))).unwrap();
    let logs: Vec<&serde_json::Value> =
        state["log_history"].as_array().unwrap().iter().filter(|e| e.get("loss").is_some()).collect();
    assert_eq!(logs.len(), 12);
    for e in &logs {
        for k in ["loss", "grad_norm", "learning_rate", "epoch", "step"] {
            assert!(e.get(k).is_some(), "log_history entry lacks {k}: {e}");
        }
    }
    let first = full.step_losses[0].1;
    let last = full.step_losses.last().unwrap().1;
    assert!(last < first, "training must lower the loss: {first} -> {last}");
    let cfg_json: serde_json::Value = serde_json::from_slice(&read(&out.join("adapter_config.json"))).unwrap();
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["r"], 4);
    assert_eq!(cfg_json["lora_alpha"], 8);
    let st = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(st.keys().all(|k| k.starts_with("base_model.model.model.language_model.layers.")), "PEFT key names");
    assert_eq!(
        st.len(),
        2 * (3 * 8 + 7),
        "every decoder linear of both layer kinds (3 GDN layers x 8 + 1 attention layer x 7)"
    );

    // Killed after step 6 (checkpoint-6 written by the halt), then resumed by running again.
    let b = scratch("resume-b");
    let cfg_b = setup(&b, &tiny_checkpoint(), "overwrite_output_dir: false\n");
    let part = train(&cfg_b, &[], Some(6)).unwrap();
    assert!(part.interrupted && part.global_step == 6);
    assert!(!b.join("out/adapter_model.safetensors").exists(), "no final weights after an interrupted run");
    let rest = train(&cfg_b, &[], None).unwrap();
    assert_eq!(rest.global_step, 12);
    assert_eq!(rest.step_losses.first().map(|s| s.0), Some(7), "resumed at step 7");
    for ((sa, la), (sb, lb)) in full.step_losses[6..].iter().zip(&rest.step_losses) {
        assert_eq!(sa, sb);
        assert_eq!(la.to_bits(), lb.to_bits(), "step {sa}: loss {la} vs resumed {lb}");
    }
    assert_eq!(
        read(&out.join("adapter_model.safetensors")),
        read(&b.join("out/adapter_model.safetensors")),
        "the resumed run's final adapter must be byte-identical"
    );
    let log_b = String::from_utf8(read(&b.join("out/trainer_log.jsonl"))).unwrap();
    let log_a = String::from_utf8(read(&out.join("trainer_log.jsonl"))).unwrap();
    // Lines without a loss (evaluations, the closing summary line) are left out.
    let losses = |s: &str| -> Vec<f64> {
        s.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64()).collect()
    };
    assert_eq!(losses(&log_a), losses(&log_b), "trainer_log.jsonl losses of the resumed run");
}

#[test]
fn evaluates_during_training_and_full_fine_tuning_saves_a_loadable_model() {
    let d = scratch("eval-full");
    let cfg = setup(
        &d,
        &tiny_checkpoint(),
        "overwrite_output_dir: true\nval_size: 0.25\neval_strategy: steps\neval_steps: 3\n",
    );
    let o = train(&cfg, &["finetuning_type=full", "learning_rate=1e-4"], None).unwrap();
    let out = d.join("out");
    let state: serde_json::Value = serde_json::from_slice(&read(&out.join("trainer_state.json"))).unwrap();
    let evals = state["log_history"].as_array().unwrap().iter().filter(|e| e.get("eval_loss").is_some()).count();
    assert!(evals >= 2, "eval_loss logged every 3 steps ({} steps)", o.total_steps);
    assert!(out.join("training_eval_loss.png").exists());
    let all: serde_json::Value = serde_json::from_slice(&read(&out.join("all_results.json"))).unwrap();
    assert!(all["eval_loss"].as_f64().is_some());
    let m = ferrotune_core::models::qwen3_5::Qwen3_5::load(&out, candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    assert_eq!(m.layers.len(), 4);
}

#[test]
fn a_nan_loss_stops_and_names_the_step_and_row() {
    let d = scratch("nan");
    let model = d.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(tiny_checkpoint()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, model.join(p.file_name().unwrap())).unwrap();
    }
    // Poison the final norm: every logit becomes NaN.
    let shard = model.join("model-00001-of-00002.safetensors");
    let mut t = candle_core::safetensors::load(&shard, &candle_core::Device::Cpu).unwrap();
    let w = t["model.language_model.norm.weight"].clone();
    t.insert("model.language_model.norm.weight".into(), (w * f64::NAN).unwrap());
    candle_core::safetensors::save(&t, &shard).unwrap();
    let cfg = setup(&d, &model, "overwrite_output_dir: true\n");
    let err = format!("{:#}", train(&cfg, &[], None).unwrap_err());
    assert!(err.contains("NaN") && err.contains("step 1") && err.contains("rows.json row"), "{err}");
}

/// `lora_target: all` as LLaMA-Factory expands it for qwen3_5: decoder linears; plus the vision blocks' linears
/// when the tower is not frozen; plus the merger's when the projector is not frozen either. And adapters on the
/// vision side must train (their B starts at zero, so a nonzero B proves gradients reached them).
#[test]
fn lora_all_adapts_and_trains_the_vision_tower_and_merger_when_unfrozen() {
    let d = scratch("lora-vision");
    let cfg = setup(&d, &tiny_checkpoint(), "overwrite_output_dir: true\n");
    let cases = [
        ("freeze_vision_tower=true", "freeze_multi_modal_projector=true", false, false),
        ("freeze_vision_tower=true", "freeze_multi_modal_projector=false", false, false),
        ("freeze_vision_tower=false", "freeze_multi_modal_projector=true", true, false),
        ("freeze_vision_tower=false", "freeze_multi_modal_projector=false", true, true),
    ];
    for (tower, projector, want_tower, want_merger) in cases {
        train(&cfg, &[tower, projector, "num_train_epochs=1"], None).unwrap();
        let out = d.join("out");
        let weights =
            candle_core::safetensors::load(out.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
        let config: serde_json::Value = serde_json::from_slice(&read(&out.join("adapter_config.json"))).unwrap();
        let modules: Vec<String> =
            config["target_modules"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect();
        let blocks: Vec<&String> = modules.iter().filter(|m| m.starts_with("model.visual.blocks.")).collect();
        let merger: Vec<&String> = modules.iter().filter(|m| m.starts_with("model.visual.merger.")).collect();
        assert!(modules.iter().any(|m| m.ends_with("self_attn.q_proj")), "{tower} {projector}: {modules:?}");
        assert!(!modules.iter().any(|m| m.contains("patch_embed") || m == "lm_head"), "{modules:?}");
        if want_tower {
            // Every vision block: attn.qkv, attn.proj, mlp.linear_fc1, mlp.linear_fc2.
            let n_blocks = modules.iter().filter(|m| m.ends_with(".attn.qkv")).count();
            assert!(n_blocks > 0 && blocks.len() == 4 * n_blocks, "{tower} {projector}: {blocks:?}");
        } else {
            assert!(blocks.is_empty(), "{tower} {projector}: {blocks:?}");
        }
        assert_eq!(merger.len(), if want_merger { 2 } else { 0 }, "{tower} {projector}: {merger:?}");
        for m in blocks.iter().chain(&merger) {
            let b = &weights[&format!("base_model.model.{m}.lora_B.weight")];
            let max = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(max > 0.0, "{m}: lora_B is still zero after training (no gradient reached it)");
        }
    }
}

/// LoRA gradients of one accumulation window (two micro-batches of four rows: different lengths, images and a
/// text-only row in each), summed over its units.
fn window_grads(
    cfg: &Path,
    split: bool,
    workers: &ferrotune_core::parallel::Workers,
    cached: bool,
    checkpointing: bool,
) -> (Vec<Vec<f32>>, Vec<f64>) {
    use candle_core::{Device, Tensor};
    use ferrotune_core::image::ImageProcessorConfig;
    use ferrotune_core::lora::{self, Init};
    use ferrotune_core::models::qwen3_5::Qwen3_5;
    use ferrotune_core::train::batch::{label_tokens, micro_batch, FeatureCache};
    use ferrotune_core::train::step::{window_backward, window_units, GradAccum, StepOptions};

    let plan = Plan::load(Some(cfg), &[]).unwrap();
    let data = prepare(&plan, &|_, _| {}).unwrap();
    let dev = Device::Cpu;
    let mut model = Qwen3_5::load(&plan.model_name_or_path, candle_core::DType::F32, &dev).unwrap();
    let spec = ferrotune_core::train::run::lora_spec(&plan);
    lora::attach(model.lora_candidates(false, false), &spec, &Init::Default { seed: 7 }, &dev).unwrap();
    let mut params = Vec::new();
    for (i, (_, lin)) in model.linears_mut().into_iter().enumerate() {
        if let Some(l) = &lin.lora {
            // B starts at zero (no gradient reaches A then): give it values so that both matrices are checked.
            let n = l.b.elem_count();
            let v: Vec<f32> = (0..n).map(|k| 0.02 * ((k as f32 * 0.37 + i as f32).sin())).collect();
            l.b.set(&Tensor::from_vec(v, l.b.shape(), &dev).unwrap()).unwrap();
            params.extend([l.a.clone(), l.b.clone()]);
        }
    }
    let processor = ImageProcessorConfig::from_dir(&plan.model_name_or_path).unwrap();
    let cache = cached.then(|| FeatureCache::new(1 << 30));
    let train = &data.train;
    let build = |m: &Qwen3_5, idx: &[usize]| {
        let samples: Vec<_> = idx.iter().map(|&i| &train[i]).collect();
        micro_batch(m, &processor, &samples, 0, cache.as_ref())
    };
    let batches: [&[usize]; 2] = [&[0, 1, 2, 3], &[4, 5, 6, 7]];
    let units = window_units(&batches, |i| label_tokens(&train[i]), split, |j| j as u64);
    assert_eq!(units.len(), if split { 8 } else { 2 });
    let mut acc = GradAccum::default();
    let so = StepOptions { scale: 1.0, checkpointing, keep_last: 0, train_embeddings: false, dropout_seed: 0 };
    let stop = AtomicBool::new(false);
    let losses = window_backward(&model, &units, 2, &build, &params, &mut acc, so, workers, &stop).unwrap().unwrap();
    let grads = acc
        .take(&params)
        .into_iter()
        .map(|g| g.expect("every LoRA matrix gets a gradient").flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    (grads, losses)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>().sqrt();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    d / n.max(1e-30)
}

#[test]
fn samples_computed_apart_and_side_by_side_give_the_batch_gradient() {
    use ferrotune_core::parallel::Workers;
    let dir = scratch("side-by-side");
    let cfg = setup(&dir, &tiny_checkpoint(), "");
    let one = Workers::new(1).unwrap();
    let two = Workers::new(2).unwrap();
    // The reference: each micro-batch as one padded batch, on one thread.
    let (want, want_loss) = window_grads(&cfg, false, &one, false, true);
    let (apart, apart_loss) = window_grads(&cfg, true, &one, false, true);
    let (side, side_loss) = window_grads(&cfg, true, &two, true, false);
    assert!(want.iter().all(|g| g.iter().any(|x| *x != 0.0)), "every LoRA matrix must get a non-zero gradient");
    let worst = want.iter().zip(&apart).map(|(w, a)| rel_l2(a, w)).fold(0.0, f64::max);
    eprintln!("samples apart vs padded batch: worst relative L2 over {} LoRA tensors {worst:e}", want.len());
    for (k, w) in want.iter().enumerate() {
        let e = rel_l2(&apart[k], w);
        assert!(e < 2e-5, "LoRA tensor {k}: samples apart differ from the padded batch by {e:e} (relative L2)");
        // Two workers, cached image features and no recomputation: the same numbers, bit for bit.
        assert_eq!(side[k], apart[k], "LoRA tensor {k}: two workers (cached features, no checkpointing) differ");
    }
    for (a, b) in apart_loss.iter().zip(&want_loss) {
        assert!((a - b).abs() < 1e-6 * b.abs(), "micro-batch loss {a} against {b}");
    }
    assert_eq!(side_loss, apart_loss);
}

#[test]
fn two_sample_workers_train_the_same_adapter_as_one() {
    use ferrotune_core::parallel::Workers;
    let mut outs = Vec::new();
    for n in [1, 2] {
        let dir = scratch(&format!("workers-{n}"));
        let cfg = setup(&dir, &tiny_checkpoint(), "overwrite_output_dir: true\n");
        let plan = Plan::load(Some(&cfg), &["per_device_train_batch_size=3".to_string()]).unwrap();
        let data = prepare(&plan, &|_, _| {}).unwrap();
        let stop = AtomicBool::new(false);
        let workers = Workers::new(n).unwrap();
        let o = run(
            &plan,
            &data,
            &RunOptions {
                stop: &stop,
                progress: false,
                halt_after_step: None,
                device: Some(DeviceSpec::Cpu),
                workers: Some(&workers),
            },
        )
        .unwrap();
        outs.push((o.step_losses, read(&dir.join("out/adapter_model.safetensors"))));
    }
    assert_eq!(outs[0].0.len(), 4, "12 rows, batch 3, accumulation 2, 2 epochs");
    assert_eq!(outs[0].0, outs[1].0, "losses per step");
    assert!(outs[0].1 == outs[1].1, "the adapters differ");
}

#[test]
fn an_activation_budget_keeps_the_last_layers_that_fit_and_recomputes_the_rest() {
    use ferrotune_core::models::qwen3_5::config::Config;
    use ferrotune_core::train::run::{activation_bytes, checkpointing_choice, layer_activation_bytes};
    let json = ferrotune_core::weights::read_config_json(&tiny_checkpoint()).unwrap();
    let cfg = Config::from_json(&json).unwrap().text;
    let kinds = cfg.layer_types.clone();
    assert_eq!(kinds.len(), 4);
    let tokens = 300;
    let layer = |i: usize| layer_activation_bytes(&cfg, kinds[i], tokens);
    // The full-attention layer (the last) also keeps its scores: more than a linear-attention layer.
    assert!(layer(3) > layer(2));
    assert_eq!(activation_bytes(&cfg, tokens), (0..4).map(layer).sum::<u64>());

    let all = checkpointing_choice(None, &cfg, tokens, activation_bytes(&cfg, tokens));
    assert!(!all.checkpointing, "everything fits: nothing is recomputed ({})", all.why);
    let two = checkpointing_choice(None, &cfg, tokens, layer(3) + layer(2));
    assert_eq!((two.checkpointing, two.keep_last), (true, 2), "{}", two.why);
    assert!(two.why.contains("layers 0–1 recomputed, 2–3 keep theirs"), "{}", two.why);
    let one = checkpointing_choice(None, &cfg, tokens, layer(3) + layer(2) - 1);
    assert_eq!((one.checkpointing, one.keep_last), (true, 1), "{}", one.why);
    let none = checkpointing_choice(None, &cfg, tokens, layer(3) - 1);
    assert_eq!((none.checkpointing, none.keep_last), (true, 0), "{}", none.why);
    assert!(none.why.contains("every layer recomputed"), "{}", none.why);
    // A config that says what to do is obeyed whatever the budget.
    let on = checkpointing_choice(Some(true), &cfg, tokens, u64::MAX);
    assert_eq!((on.checkpointing, on.keep_last), (true, 0));
    assert!(!checkpointing_choice(Some(false), &cfg, tokens, 0).checkpointing);
}
