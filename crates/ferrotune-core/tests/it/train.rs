//! LoRA training equals PEFT + HF Trainer on the tiny checkpoint (fixtures from tools/golden/gen_peft.py).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use ferrotune_core::lora::{self, Init, LoraSpec, Targets};
use ferrotune_core::models::qwen3_5::{Qwen3_5, VisionInput};
use ferrotune_core::train::batch::MicroBatch;
use ferrotune_core::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use ferrotune_core::train::schedule::{Kind, Schedule};
use ferrotune_core::train::step::{forward_backward, GradAccum, StepOptions};

use crate::common::{fixtures, tiny_checkpoint};

fn golden(name: &str) -> std::path::PathBuf {
    fixtures().join("golden/peft").join(name)
}

fn load_st(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(golden(name), &Device::Cpu).unwrap()
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden(name)).unwrap()).unwrap()
}

/// Relative L2 error ‖a − b‖ / ‖b‖.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
    let n = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
    d / n.max(1e-30)
}

struct Samples {
    t: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

impl Samples {
    fn load() -> Self {
        Self { t: load_st("samples.safetensors"), meta: json("samples.json") }
    }

    fn micro_batch(&self, model: &Qwen3_5, i: usize) -> MicroBatch {
        let ids: Vec<u32> =
            self.t[&format!("input_ids.{i}")].to_vec1::<i64>().unwrap().iter().map(|&x| x as u32).collect();
        let labels: Vec<i64> = self.t[&format!("labels.{i}")].to_vec1().unwrap();
        let pool: Vec<usize> =
            self.meta[i]["images"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let images = if pool.is_empty() {
            None
        } else {
            let levels: Vec<Tensor> = pool.iter().map(|k| self.t[&format!("pool_levels.{k}")].clone()).collect();
            let k = Tensor::cat(&levels, 0).unwrap().to_dtype(DType::F32).unwrap();
            let pixel_values = ((k * (1.0f64 / 255.0)).unwrap() - 0.5).unwrap().affine(2.0, 0.0).unwrap();
            let grids = pool
                .iter()
                .map(|k| {
                    let g: Vec<i64> = self.t[&format!("pool_grid.{k}")].to_vec1().unwrap();
                    [g[0] as usize, g[1] as usize, g[2] as usize]
                })
                .collect();
            Some(VisionInput { pixel_values, grids })
        };
        let grids = images.as_ref().map_or(vec![], |v| v.grids.clone());
        let pos = model.rope_index(&ids, &grids).unwrap();
        let rope = model.rope(&[&pos]).unwrap();
        let n = ids.len();
        MicroBatch {
            input_ids: Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap(),
            labels: vec![labels],
            rope,
            images,
            image_features: None,
            segments: None,
        }
    }
}

fn spec(targets: &[&str]) -> LoraSpec {
    let g = json("grads.json");
    LoraSpec {
        r: g["rank"].as_u64().unwrap() as usize,
        alpha: g["alpha"].as_f64().unwrap(),
        dropout: 0.0,
        use_rslora: false,
        targets: Targets::Modules(targets.iter().map(|s| s.to_string()).collect()),
    }
}

/// Model with the fixture's fixed LoRA init; returns the trainable vars with their PEFT names.
fn lora_model(set: &str, targets: &[&str]) -> (Qwen3_5, Vec<(String, Var)>) {
    let mut model = Qwen3_5::load(&tiny_checkpoint(), DType::F32, &Device::Cpu).unwrap();
    let init = load_st(&format!("init_{set}.safetensors"));
    let spec = spec(targets);
    let adapted = lora::attach(model.lora_candidates(false, false), &spec, &Init::From(&init), &Device::Cpu).unwrap();
    assert_eq!(adapted.len() * 2, init.len(), "{set}: every module of the PEFT init must be adapted");
    let vars = lora::trainable_vars(model.linears_mut());
    (model, vars)
}

fn targets(set: &str) -> Vec<String> {
    json("grads.json")["targets"][set].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

#[test]
fn loss_and_every_lora_gradient_equal_peft() {
    let samples = Samples::load();
    for set in ["qkvo", "all"] {
        let t = targets(set);
        let t: Vec<&str> = t.iter().map(String::as_str).collect();
        let (model, vars) = lora_model(set, &t);
        let want_grads = load_st(&format!("grads_{set}.safetensors"));
        let want_loss = json("grads.json")["loss"][set].as_f64().unwrap();
        let mb = samples.micro_batch(&model, 0);
        assert!(mb.images.is_some(), "sample 0 has an image");
        let params: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        // Every layer kept, every layer recomputed, and a budget's split (the last two kept).
        for (checkpointing, keep_last) in [(false, 0), (true, 0), (true, 2)] {
            let mut acc = GradAccum::default();
            let opts = StepOptions { scale: 1.0, checkpointing, keep_last, train_embeddings: false, dropout_seed: 0 };
            let stats = forward_backward(&model, &mb, &params, &mut acc, opts).unwrap();
            let rel_loss = (stats.loss - want_loss).abs() / want_loss;
            assert!(rel_loss < 1e-5, "{set}: loss {} vs PEFT {want_loss} (rel {rel_loss:e})", stats.loss);
            let grads = acc.take(&params);
            let mut worst = 0f64;
            for ((name, _), g) in vars.iter().zip(&grads) {
                let g = g.as_ref().unwrap_or_else(|| panic!("{set}: {name} received no gradient"));
                let want = &want_grads[name];
                let norm = want.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(norm > 0.0, "{set}: PEFT's gradient of {name} is zero; the fixture cannot test it");
                let r = rel(g, want);
                assert!(
                    r < 1e-4,
                    "{set} (checkpointing {checkpointing}, {keep_last} kept): {name} gradient rel err {r:e}"
                );
                worst = worst.max(r);
            }
            eprintln!("{set} checkpointing={checkpointing} kept={keep_last}: loss rel err {rel_loss:e}, worst gradient rel err {worst:e} over {} tensors", vars.len());
        }
    }
}

#[test]
fn twenty_steps_match_hf_trainer() {
    let samples = Samples::load();
    let run = json("train.json");
    let t = targets("all");
    let t: Vec<&str> = t.iter().map(String::as_str).collect();
    let (model, vars) = lora_model("all", &t);
    let params: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut opt =
        AdamW::new(AdamWConfig::default(), vars.iter().map(|(n, v)| (n.clone(), v.clone(), true)).collect()).unwrap();
    let order: Vec<usize> = run["order"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let accum = run["accumulation"].as_u64().unwrap() as usize;
    let steps = run["steps"].as_array().unwrap();
    let total = steps.len();
    let sched = Schedule { kind: Kind::Cosine, peak: run["lr"].as_f64().unwrap(), warmup: 2, total };
    let batches: Vec<MicroBatch> = (0..8).map(|i| samples.micro_batch(&model, i)).collect();
    let mut acc = GradAccum::default();
    let mut worst = (0f64, 0f64);
    for (k, want) in steps.iter().enumerate() {
        let window = &order[k * accum..(k + 1) * accum];
        let mut loss = 0.0;
        for (j, &i) in window.iter().enumerate() {
            let opts = StepOptions {
                scale: 1.0 / accum as f64,
                checkpointing: j % 2 == 0,
                keep_last: 0,
                train_embeddings: false,
                dropout_seed: 0,
            };
            loss += forward_backward(&model, &batches[i], &params, &mut acc, opts).unwrap().loss / accum as f64;
        }
        let mut grads = acc.take(&params);
        let norm = clip_grad_norm(&mut grads, run["max_grad_norm"].as_f64().unwrap()).unwrap();
        let lr = sched.lr(k);
        opt.step(&grads, lr).unwrap();
        let (wl, wlr, wn) = (
            want["loss"].as_f64().unwrap(),
            want["learning_rate"].as_f64().unwrap(),
            want["grad_norm"].as_f64().unwrap(),
        );
        let rl = (loss - wl).abs() / wl;
        assert!(rl < 1e-4, "step {}: loss {loss} vs {wl} (rel {rl:e})", k + 1);
        assert!((lr - wlr).abs() <= 1e-12 + 1e-9 * wlr, "step {}: lr {lr} vs {wlr}", k + 1);
        let rn = (norm - wn).abs() / wn;
        assert!(rn < 1e-4, "step {}: grad norm {norm} vs {wn}", k + 1);
        worst = (worst.0.max(rl), worst.1.max(rn));
    }
    let final_want = load_st("train_final.safetensors");
    let mut worst_t = 0f64;
    for (name, v) in &vars {
        let r = rel(v.as_tensor(), &final_want[name]);
        worst_t = worst_t.max(r);
        assert!(r < 1e-4, "final {name}: rel err {r:e}");
    }
    eprintln!(
        "20 steps: worst loss rel err {:e}, grad-norm rel err {:e}, final adapter rel err {worst_t:e}",
        worst.0, worst.1
    );
}

#[test]
fn full_fine_tuning_gradients_equal_transformers() {
    let samples = Samples::load();
    let want = json("full_grads.json");
    let mut model = Qwen3_5::load(&tiny_checkpoint(), DType::F32, &Device::Cpu).unwrap();
    let vars = model.make_trainable(|_| true).unwrap();
    let params: Vec<Var> = vars.iter().map(|(_, v, _)| v.clone()).collect();
    let mb = samples.micro_batch(&model, 0);
    for checkpointing in [false, true] {
        let mut acc = GradAccum::default();
        let opts = StepOptions { scale: 1.0, checkpointing, keep_last: 0, train_embeddings: true, dropout_seed: 0 };
        let stats = forward_backward(&model, &mb, &params, &mut acc, opts).unwrap();
        let wl = want["loss"].as_f64().unwrap();
        assert!((stats.loss - wl).abs() / wl < 1e-5, "loss {} vs {wl}", stats.loss);
        let grads = acc.take(&params);
        let norms = want["grad_norms"].as_object().unwrap();
        assert_eq!(norms.len(), vars.len(), "every parameter of the reference has a gradient and exists here");
        let mut worst = 0f64;
        for ((name, _, _), g) in vars.iter().zip(&grads) {
            let g = g.as_ref().unwrap_or_else(|| panic!("{name}: no gradient"));
            let n = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
            let w = norms[name].as_f64().unwrap_or_else(|| panic!("{name} missing in the reference"));
            let r = (n - w).abs() / w.max(1e-12);
            assert!(r < 1e-4, "checkpointing {checkpointing}: {name} gradient norm {n} vs {w}");
            worst = worst.max(r);
        }
        eprintln!(
            "full fine-tuning (checkpointing {checkpointing}): {} tensors, worst gradient-norm rel err {worst:e}",
            vars.len()
        );
    }
}

#[test]
fn state_dict_round_trips_the_checkpoint() {
    let mut model = Qwen3_5::load(&tiny_checkpoint(), DType::F32, &Device::Cpu).unwrap();
    let sd = model.state_dict(DType::BF16).unwrap();
    let ckpt = ferrotune_core::weights::Checkpoint::open(&tiny_checkpoint()).unwrap();
    let names: Vec<&str> = ckpt.names().into_iter().filter(|n| !n.starts_with("mtp.")).collect();
    assert_eq!(sd.len(), names.len());
    for n in names {
        let want = ckpt.load(n, &Device::Cpu).unwrap();
        let got = &sd[n];
        assert_eq!(got.dtype(), want.dtype(), "{n}: dtype");
        crate::common::assert_close(got, &want, 0.0, n);
    }
}

/// ferrotune's logits with an adapter that `ferrotune train` wrote equal PEFT's with it, merged or separate
/// (tools/golden/check_adapter.py; the binary's test `peft_loads_a_fresh_adapter` does the same on an adapter the
/// current code writes).
#[test]
fn peft_agrees_on_an_adapter_we_wrote() {
    let want =
        candle_core::safetensors::load(fixtures().join("golden/ferrotune_adapter_logits.safetensors"), &Device::Cpu)
            .unwrap()
            .remove("logits_tail")
            .unwrap();
    let case =
        candle_core::safetensors::load(fixtures().join("golden/model/one_image.safetensors"), &Device::Cpu).unwrap();
    let ids: Vec<u32> = case["input_ids"].to_vec1::<i64>().unwrap().iter().map(|&x| x as u32).collect();
    let k = case["pixel_levels"].to_dtype(DType::F32).unwrap();
    let pixel_values = ((k * (1.0f64 / 255.0)).unwrap() - 0.5).unwrap().affine(2.0, 0.0).unwrap();
    let g: Vec<Vec<i64>> = case["image_grid_thw"].to_vec2().unwrap();
    let images = VisionInput { pixel_values, grids: vec![[g[0][0] as usize, g[0][1] as usize, g[0][2] as usize]] };
    let adapter = lora::Adapter::load(&fixtures().join("golden/ferrotune_adapter"), &Device::Cpu).unwrap();
    for merge in [true, false] {
        let mut model = Qwen3_5::load(&tiny_checkpoint(), DType::F32, &Device::Cpu).unwrap();
        adapter.apply(model.linears_mut(), merge).unwrap();
        let (h, _) = model.forward_sequence(&ids, Some(&images), false).unwrap();
        let n = want.dim(0).unwrap();
        let logits = model.logits(&h.squeeze(0).unwrap().narrow(0, ids.len() - n, n).unwrap()).unwrap();
        let d = crate::common::assert_close(&logits, &want, 1e-4, "logits vs PEFT with our adapter");
        eprintln!("our adapter (merged {merge}) vs PEFT: max logit diff {d:e}");
    }
}
