//! `neat_packing`: a packed micro-batch gives the same per-sample losses and the same LoRA gradients as its
//! samples run one by one (attention block-diagonal, Gated-DeltaNet states restarted, M-RoPE positions
//! restarted); plain `packing` is one sequence (the samples see each other). LLaMA-Factory's knapsack order.

use candle_core::{DType, Device, Tensor, Var};
use ferrotune_core::config::Plan;
use ferrotune_core::data::{prepare, Sample};
use ferrotune_core::image::ImageProcessorConfig;
use ferrotune_core::lora::{self, Init, LoraSpec, Targets};
use ferrotune_core::models::qwen3_5::Qwen3_5;
use ferrotune_core::train::batch::{label_tokens, micro_batch, MicroBatch};
use ferrotune_core::train::step::{forward_backward, forward_loss, GradAccum, StepOptions};
use serde_json::json;

use crate::common::{fixtures, plan, tiny_checkpoint};

fn recipe_plan(extra: &[(&str, serde_json::Value)]) -> Plan {
    let mut pairs = vec![
        ("dataset_dir", json!(fixtures().join("golden/recipes/data").display().to_string())),
        ("dataset", json!("recipe_rows")),
        ("template", json!("qwen3_5_nothink")),
        ("cutoff_len", json!(160)),
    ];
    pairs.extend(extra.iter().cloned());
    plan(&pairs)
}

fn lora_model(seed: u64) -> (Qwen3_5, Vec<Var>) {
    let mut model = Qwen3_5::load(&tiny_checkpoint(), DType::F32, &Device::Cpu).unwrap();
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        targets: Targets::Modules(lora::ALL_DECODER_LINEARS.iter().map(|s| s.to_string()).collect()),
    };
    // B random too (Init::Default leaves it zero), so every A and B gets a gradient.
    lora::attach(model.lora_candidates(false, false), &spec, &Init::Default { seed }, &Device::Cpu).unwrap();
    let mut vars = Vec::new();
    // Seeded: the checks below must not depend on the run.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed ^ 0x5eed);
    let normal = rand_distr::Normal::new(0f32, 0.02).unwrap();
    for (i, (_, lin)) in model.linears_mut().into_iter().enumerate() {
        if let Some(l) = &lin.lora {
            let values: Vec<f32> =
                (0..l.b.elem_count()).map(|_| rand_distr::Distribution::sample(&normal, &mut rng)).collect();
            let b = Tensor::from_vec(values, l.b.dims(), &Device::Cpu).unwrap();
            let b = (b + (i as f64) * 1e-4).unwrap();
            l.b.set(&b).unwrap();
            vars.push(l.a.clone());
            vars.push(l.b.clone());
        }
    }
    (model, vars)
}

fn batch(model: &Qwen3_5, samples: &[&Sample]) -> MicroBatch {
    let processor = ImageProcessorConfig::from_dir(&tiny_checkpoint()).unwrap();
    micro_batch(model, &processor, samples, 2000, None).unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

#[test]
fn neat_packing_equals_the_samples_one_by_one() {
    let alone = prepare(&recipe_plan(&[]), &|_, _| {}).unwrap().train;
    let packed = prepare(&recipe_plan(&[("neat_packing", json!(true))]), &|_, _| {}).unwrap().train;
    assert_eq!(alone.len(), 10);
    assert!(packed.len() < alone.len() && packed.len() >= 2, "{} rows packed into {}", alone.len(), packed.len());
    // Every packed row is a concatenation of whole samples, each sample in exactly one row.
    let mut used = vec![false; alone.len()];
    let mut members: Vec<Vec<usize>> = Vec::new();
    for row in &packed {
        assert!(row.input_ids.len() < 160, "cutoff_len 160 leaves 159 tokens a row");
        assert_eq!(row.segments.iter().sum::<usize>(), row.input_ids.len());
        let mut start = 0;
        let mut m = Vec::new();
        for &n in &row.segments {
            let ids = &row.input_ids[start..start + n];
            let i = (0..alone.len())
                .find(|&i| !used[i] && alone[i].input_ids == ids)
                .unwrap_or_else(|| panic!("a packed segment of {n} tokens is no sample"));
            used[i] = true;
            m.push(i);
            start += n;
        }
        members.push(m);
    }
    assert!(used.iter().all(|&u| u), "every sample packed");
    assert!(members.iter().any(|m| m.len() >= 3), "some row holds three samples: {members:?}");

    let (model, params) = lora_model(7);
    let rows: Vec<&Sample> = packed.iter().take(2).collect();
    let mb = batch(&model, &rows);
    assert!(mb.segments.is_some());

    // Per-sample losses inside the packed forward (labels kept for one sample at a time) vs alone.
    let mut worst_loss = 0f64;
    for (r, row) in rows.iter().enumerate() {
        let mut start = 0;
        for (j, &n) in row.segments.iter().enumerate() {
            let mut labels = vec![vec![-100i64; mb.labels[0].len()]; rows.len()];
            labels[r][start..start + n].copy_from_slice(&mb.labels[r][start..start + n]);
            let one = MicroBatch { labels, ..clone_batch(&mb) };
            let (l, _) = forward_loss(&model, &one, false, false, 0).unwrap();
            let packed_loss = l.to_scalar::<f32>().unwrap() as f64;
            let i = members[r][j];
            let (want, _) = forward_loss(&model, &batch(&model, &[&alone[i]]), false, false, 0).unwrap();
            let want = want.to_scalar::<f32>().unwrap() as f64;
            let e = rel(packed_loss, want);
            assert!(e < 1e-5, "row {r} sample {j}: packed loss {packed_loss} vs alone {want} (rel {e:e})");
            worst_loss = worst_loss.max(e);
            start += n;
        }
    }

    // Gradients of the packed micro-batch's mean loss vs Σ (tokens_i / tokens) · gradient of sample i alone.
    let total: usize = rows.iter().map(|r| label_tokens(r)).sum();
    let mut want_acc = GradAccum::default();
    for m in members.iter().take(2) {
        for &i in m {
            let w = label_tokens(&alone[i]) as f64 / total as f64;
            let o =
                StepOptions { scale: w, checkpointing: false, keep_last: 0, train_embeddings: false, dropout_seed: 0 };
            forward_backward(&model, &batch(&model, &[&alone[i]]), &params, &mut want_acc, o).unwrap();
        }
    }
    let want = want_acc.take(&params);
    let mut worst_grad = 0f64;
    for checkpointing in [false, true] {
        let mut acc = GradAccum::default();
        let o = StepOptions { scale: 1.0, checkpointing, keep_last: 0, train_embeddings: false, dropout_seed: 0 };
        forward_backward(&model, &mb, &params, &mut acc, o).unwrap();
        let got = acc.take(&params);
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            let (g, w) = (g.as_ref().expect("packed gradient"), w.as_ref().expect("gradient alone"));
            let d = (g - w).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
            let n = w.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
            assert!(n > 0.0, "tensor {k}: zero reference gradient");
            let e = d / n;
            assert!(e < 1e-5, "checkpointing {checkpointing}: LoRA tensor {k} gradient rel err {e:e}");
            worst_grad = worst_grad.max(e);
        }
    }
    eprintln!(
        "neat packing: {} samples in {} rows; worst per-sample loss rel err {worst_loss:.1e}, worst LoRA gradient \
         rel err {worst_grad:.1e} over {} tensors",
        alone.len(),
        packed.len(),
        params.len()
    );

    // Without the boundaries (plain packing: one sequence) the later samples see the earlier ones.
    let plain = prepare(&recipe_plan(&[("packing", json!(true))]), &|_, _| {}).unwrap().train;
    assert_eq!(plain.len(), packed.len(), "plain packing packs the same rows");
    assert!(plain.iter().all(|r| r.segments.is_empty()));
    let pmb = batch(&model, &[&plain[0]]);
    let nmb = batch(&model, &[&packed[0]]);
    let (pl, _) = forward_loss(&model, &pmb, false, false, 0).unwrap();
    let (nl, _) = forward_loss(&model, &nmb, false, false, 0).unwrap();
    let (pl, nl) = (pl.to_scalar::<f32>().unwrap() as f64, nl.to_scalar::<f32>().unwrap() as f64);
    eprintln!("plain packing loss {pl} vs neat {nl} (rel {:.1e})", rel(pl, nl));
    assert!(rel(pl, nl) > 1e-4, "plain packing {pl} vs neat {nl}: the samples should see each other");
}

fn clone_batch(mb: &MicroBatch) -> MicroBatch {
    MicroBatch {
        input_ids: mb.input_ids.clone(),
        labels: mb.labels.clone(),
        rope: mb.rope.clone(),
        images: mb.images.clone(),
        image_features: mb.image_features.clone(),
        segments: mb.segments.clone(),
    }
}

/// The rows equal what LLaMA-Factory's own loader packs the dataset into (tools/golden/gen_recipes.py,
/// `neat_packing: true`, cutoff_len 160): the same samples in the same order, the same labels, the same
/// boundaries (its attention mask numbers the samples 1, 2, … and pads with 0).
#[test]
fn packing_equals_llamafactory_rows() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("golden/recipes/packed.json")).unwrap()).unwrap();
    let packed = prepare(&recipe_plan(&[("neat_packing", json!(true))]), &|_, _| {}).unwrap();
    let want = golden["rows"].as_array().unwrap();
    assert_eq!(packed.train.len(), want.len(), "rows");
    for (k, (got, w)) in packed.train.iter().zip(want).enumerate() {
        let mask: Vec<u64> = w["attention_mask"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        let n = mask.iter().filter(|&&m| m > 0).count();
        let ids: Vec<u32> =
            w["input_ids"].as_array().unwrap()[..n].iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let labels: Vec<i64> = w["labels"].as_array().unwrap()[..n].iter().map(|x| x.as_i64().unwrap()).collect();
        let segments: Vec<usize> =
            (1..=mask.iter().copied().max().unwrap()).map(|id| mask.iter().filter(|&&m| m == id).count()).collect();
        assert_eq!(got.input_ids, ids, "row {k}: input_ids");
        assert_eq!(got.labels, labels, "row {k}: labels");
        assert_eq!(got.segments, segments, "row {k}: sample boundaries");
        assert_eq!(got.images.len() as u64, w["images"].as_u64().unwrap(), "row {k}: images");
    }
    let report = packed.report.to_string();
    assert!(report.contains(&format!("packing: 10 samples packed into {} rows", want.len())), "{report}");
}

#[test]
fn packing_needs_room_for_its_token() {
    // A cutoff_len of 1 leaves no room once packing takes its token.
    let e = Plan::from_raw(&crate::common::raw_config(&[("neat_packing", json!(true)), ("cutoff_len", json!(1))]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cutoff_len"), "{e}");
}
