//! Generation equals transformers' greedy `generate` (with and without a PEFT adapter), and the cached decode
//! equals a full re-forward at every step. Fixtures: tools/golden/gen_generate.py.

use candle_core::{DType, Device};
use ferrotune_core::chat_template::RenderOptions;
use ferrotune_core::infer::{AdapterMode, Engine, GenerateRequest, SamplingParams};
use ferrotune_core::models::qwen3_5::Cache;

use crate::common::{fixtures, tiny_checkpoint};

fn cases() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(fixtures().join("golden/generate.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap().as_array().unwrap().clone()
}

fn images(c: &serde_json::Value) -> Vec<image::RgbImage> {
    c["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| ferrotune_core::image::load_image(&fixtures().join("golden/model").join(f.as_str().unwrap())).unwrap())
        .collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn engine(adapter: Option<AdapterMode>) -> Engine {
    let dir = fixtures().join("golden/peft/adapter");
    let adapters = if adapter.is_some() { vec![dir.as_path()] } else { vec![] };
    Engine::load(&tiny_checkpoint(), &adapters, adapter.unwrap_or(AdapterMode::Merge), DType::F32, &Device::Cpu)
        .unwrap()
}

fn greedy(rep: f64) -> GenerateRequest {
    GenerateRequest {
        sampling: SamplingParams { repetition_penalty: rep, ..Default::default() },
        max_tokens: 32,
        stop: vec![],
    }
}

#[test]
fn greedy_generation_equals_transformers() {
    let runs = [
        ("base", None, 1.0),
        ("base_rep", None, 1.3),
        ("adapter", Some(AdapterMode::Merge), 1.0),
        ("adapter", Some(AdapterMode::Separate), 1.0),
    ];
    for (key, mode, rep) in runs {
        let e = engine(mode);
        for c in cases() {
            let name = c["name"].as_str().unwrap();
            let opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
            let prompt = e.prompt(&c["messages"], &images(&c), &opts).unwrap();
            assert_eq!(prompt.ids, ids(&c["prompt_ids"]), "{name}: prompt ids");
            let mut streamed = String::new();
            let g = e
                .generate(&prompt, &greedy(rep), |t| {
                    streamed.push_str(t);
                    true
                })
                .unwrap();
            assert_eq!(g.token_ids, ids(&c[key]), "{name} / {key} / {mode:?}: generated tokens");
            assert_eq!(streamed, g.text, "{name}: streamed pieces add up to the text");
        }
    }
}

#[test]
fn cached_decode_equals_full_reforward_at_every_step() {
    let e = engine(Some(AdapterMode::Separate));
    for c in cases() {
        let opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
        let prompt = e.prompt(&c["messages"], &images(&c), &opts).unwrap();
        let mut cache = Cache::new(e.model.layers.len());
        let (mut logits, pos) = e.prefill(&prompt, &mut cache).unwrap();
        let mut seq = prompt.ids.clone();
        let mut worst = 0f32;
        for tok in ids(&c["adapter"]).into_iter().take(12) {
            seq.push(tok);
            let cached = e.step(tok, pos.delta, &mut cache).unwrap();
            let (h, _) = e.model.forward_sequence(&seq, prompt.images.as_ref(), false).unwrap();
            let full = e
                .model
                .logits(&h.narrow(1, seq.len() - 1, 1).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let d = cached.iter().zip(&full).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d <= 1e-4, "{}: step {} cached vs full logits differ by {d:e}", c["name"], seq.len());
            worst = worst.max(d);
            logits = cached;
        }
        assert!(!logits.is_empty());
        eprintln!("{}: cached decode vs re-forward, worst logit diff {worst:e}", c["name"]);
    }
}

/// Decoding across the attention cache's growth (it grows in blocks of 256 positions, keeping what it holds):
/// a text prompt of about 250 tokens, then tokens one at a time past 256, each step's logits against a full
/// forward over the whole sequence.
#[test]
fn cached_decode_across_the_cache_growth_equals_a_full_forward() {
    let e = engine(Some(AdapterMode::Merge));
    let words = "the robot has two arms and a round head ".repeat(40);
    let mut seq = e.prompt_from_text(&words, &[]).unwrap().ids;
    seq.truncate(250);
    assert_eq!(seq.len(), 250, "the prompt must reach the block boundary");
    let prompt = ferrotune_core::infer::Prompt { ids: seq.clone(), images: None };
    let mut cache = Cache::new(e.model.layers.len());
    let (_, pos) = e.prefill(&prompt, &mut cache).unwrap();
    let mut checked = 0;
    for step in 0..12u32 {
        let tok = 100 + step;
        seq.push(tok);
        let cached = e.step(tok, pos.delta, &mut cache).unwrap();
        if seq.len() < 255 {
            continue;
        }
        let (h, _) = e.model.forward_sequence(&seq, None, false).unwrap();
        let full = e.model.logits(&h.narrow(1, seq.len() - 1, 1).unwrap()).unwrap();
        let full = full.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d = cached.iter().zip(&full).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d <= 1e-4, "position {}: cached vs full logits differ by {d:e}", seq.len());
        checked += 1;
    }
    assert_eq!(checked, 8, "positions 255 to 262 compared, across 256");
}

#[test]
fn stop_strings_and_length_finish() {
    let e = engine(Some(AdapterMode::Merge));
    let c = &cases()[1];
    let opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
    let prompt = e.prompt(&c["messages"], &images(c), &opts).unwrap();
    let full = e.generate(&prompt, &greedy(1.0), |_| true).unwrap();
    assert_eq!(full.finish_reason.as_openai(), "length");
    // Stop at a string that occurs in the greedy output: the text ends right before it.
    let needle: String = full.text.chars().skip(4).take(2).collect();
    let req = GenerateRequest { stop: vec![needle.clone()], ..greedy(1.0) };
    let mut streamed = String::new();
    let g = e
        .generate(&prompt, &req, |t| {
            streamed.push_str(t);
            true
        })
        .unwrap();
    assert_eq!(g.finish_reason.as_openai(), "stop");
    assert!(full.text.starts_with(&g.text) && !g.text.contains(&needle), "{:?} / {:?}", g.text, needle);
    assert_eq!(g.text, full.text[..full.text.find(&needle).unwrap()], "cut right before the first occurrence");
    assert_eq!(streamed, g.text);
    // A longer stop string that first completes several tokens into the answer (it is looked for only in the text
    // each token changes).
    let needle: String = full.text.chars().skip(6).take(9).collect();
    let g = e.generate(&prompt, &GenerateRequest { stop: vec![needle.clone()], ..greedy(1.0) }, |_| true).unwrap();
    assert_eq!(g.finish_reason.as_openai(), "stop");
    assert_eq!(g.text, full.text[..full.text.find(&needle).unwrap()]);
}

#[test]
fn the_consumer_can_cancel_at_every_token() {
    // Returning false on the first call stops after one token, whether or not that token released text.
    let e = engine(Some(AdapterMode::Merge));
    let c = &cases()[0];
    let opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
    let prompt = e.prompt(&c["messages"], &images(c), &opts).unwrap();
    let mut calls = 0;
    let g = e
        .generate(&prompt, &greedy(1.0), |_| {
            calls += 1;
            false
        })
        .unwrap();
    assert_eq!((calls, g.token_ids.len()), (1, 1));
    assert_eq!(g.finish_reason, ferrotune_core::infer::FinishReason::Cancelled);
    // Without cancelling, the callback runs once per generated token (plus once for text held to the end).
    let mut calls = 0;
    let g = e
        .generate(&prompt, &greedy(1.0), |_| {
            calls += 1;
            true
        })
        .unwrap();
    assert!(
        calls == g.token_ids.len() || calls == g.token_ids.len() + 1,
        "{calls} calls, {} tokens",
        g.token_ids.len()
    );
}

/// A prompt fed in small chunks equals a full forward, and sequences stepped together as one batch give each
/// row the logits it gets alone, bit for bit (different prompts, with and without images, cache lengths apart,
/// the adapter as a separate branch).
#[test]
fn chunked_prefill_equals_a_full_forward_and_batched_rows_equal_each_row_alone() {
    let e = engine(Some(AdapterMode::Separate));
    let opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
    let prompts: Vec<_> = cases().iter().map(|c| e.prompt(&c["messages"], &images(c), &opts).unwrap()).collect();
    let text = e.prompt_from_text("a robot with four wheels and a long arm, seen from the left", &[]).unwrap();
    let prompts: Vec<_> = prompts.into_iter().chain([text]).collect();
    assert!(prompts.len() >= 3 && prompts.iter().any(|p| p.images.is_some()));
    // Chunks of 7 tokens (image runs cut across chunks) against one forward over the whole prompt.
    let mut states = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let mut cache = Cache::new(e.model.layers.len());
        let mut p = e.begin_prefill(prompt).unwrap();
        let mut calls = 0;
        let logits = loop {
            calls += 1;
            if let Some(l) = e.prefill_chunk(&mut p, &mut cache, 7).unwrap() {
                break l;
            }
        };
        assert_eq!(calls, prompt.ids.len().div_ceil(7), "prompt {i}: chunks of 7");
        let (h, _) = e.model.forward_sequence(&prompt.ids, prompt.images.as_ref(), false).unwrap();
        let full = e.model.logits(&h.narrow(1, prompt.ids.len() - 1, 1).unwrap()).unwrap();
        let full = full.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d = logits.iter().zip(&full).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d <= 1e-4, "prompt {i}: chunked prefill vs full forward logits differ by {d:e}");
        states.push((cache, p.pos.delta));
    }
    // Six steps: all rows together against each row alone on a clone of its cache.
    for step in 0..6u32 {
        let tokens: Vec<u32> = (0..states.len() as u32).map(|i| 200 + 17 * i + step).collect();
        let alone: Vec<Vec<f32>> = states
            .iter()
            .zip(&tokens)
            .map(|((cache, delta), &t)| e.step(t, *delta, &mut cache.clone()).unwrap())
            .collect();
        let deltas: Vec<i64> = states.iter().map(|s| s.1).collect();
        let mut caches: Vec<&mut Cache> = states.iter_mut().map(|s| &mut s.0).collect();
        let together = e.step_rows(&tokens, &deltas, &mut caches).unwrap();
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "step {step}: row {i} of the batch differs from the row alone");
        }
    }
}

#[test]
fn adapters_served_by_name_equal_peft_and_share_one_batch() {
    use ferrotune_core::nn::with_row_adapters;
    let e = engine(None);
    let peft = e.add_adapter(e.load_adapter("peft", &fixtures().join("golden/peft/adapter")).unwrap()).unwrap();
    let ours_dir = fixtures().join("golden/ferrotune_adapter");
    let ours = e.add_adapter(e.load_adapter("ours", &ours_dir).unwrap()).unwrap();
    assert!(peft.bytes > 0 && peft.rank > 0);
    let dup = e.load_adapter("peft", &ours_dir).unwrap();
    assert!(format!("{:#}", e.add_adapter(dup).unwrap_err()).contains("already loaded"));
    assert_eq!(e.adapters().iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["ours", "peft"]);
    // The second adapter's reference: the engine with it as the only branch.
    let single =
        Engine::load(&tiny_checkpoint(), &[ours_dir.as_path()], AdapterMode::Separate, DType::F32, &Device::Cpu)
            .unwrap();
    let opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
    let mut differs = false;
    for c in cases() {
        let name = c["name"].as_str().unwrap();
        let prompt = e.prompt(&c["messages"], &images(&c), &opts).unwrap();
        // transformers' greedy tokens without and with the PEFT adapter.
        let base = e.generate_with(&prompt, &greedy(1.0), None, |_| true).unwrap();
        assert_eq!(base.token_ids, ids(&c["base"]), "{name}: the base beside named adapters");
        let with_peft = e.generate_with(&prompt, &greedy(1.0), Some(&peft), |_| true).unwrap();
        assert_eq!(with_peft.token_ids, ids(&c["adapter"]), "{name}: the `peft` adapter served by name");
        let with_ours = e.generate_with(&prompt, &greedy(1.0), Some(&ours), |_| true).unwrap();
        let reference = single.generate(&prompt, &greedy(1.0), |_| true).unwrap();
        assert_eq!(with_ours.token_ids, reference.token_ids, "{name}: the `ours` adapter served by name");
        differs |= with_ours.token_ids != with_peft.token_ids && with_peft.token_ids != base.token_ids;
    }
    assert!(differs, "the adapters change the answers (else this test shows nothing)");
    // Rows of the base and of both adapters in one batch: each row's logits bit-equal to the row alone.
    let prompts: Vec<_> = cases().iter().map(|c| e.prompt(&c["messages"], &images(c), &opts).unwrap()).collect();
    let choice = [None, Some(&peft), Some(&ours), Some(&peft)];
    let mut states = Vec::new();
    for (i, a) in choice.iter().enumerate() {
        let prompt = &prompts[i % prompts.len()];
        let mut cache = Cache::new(e.model.layers.len());
        let rows = a.map(|a| vec![a.rows(None)]).unwrap_or_default();
        let (_, pos) = with_row_adapters(rows, || e.prefill(prompt, &mut cache)).unwrap();
        states.push((cache, pos.delta));
    }
    for step in 0..4u32 {
        let tokens: Vec<u32> = (0..states.len() as u32).map(|i| 300 + 13 * i + step).collect();
        let alone: Vec<Vec<f32>> = states
            .iter()
            .zip(&tokens)
            .zip(&choice)
            .map(|(((cache, delta), &t), a)| {
                let rows = a.map(|a| vec![a.rows(None)]).unwrap_or_default();
                with_row_adapters(rows, || e.step(t, *delta, &mut cache.clone())).unwrap()
            })
            .collect();
        let groups = vec![peft.rows(Some(vec![1, 3])), ours.rows(Some(vec![2]))];
        let deltas: Vec<i64> = states.iter().map(|s| s.1).collect();
        let mut caches: Vec<&mut Cache> = states.iter_mut().map(|s| &mut s.0).collect();
        let together = with_row_adapters(groups, || e.step_rows(&tokens, &deltas, &mut caches)).unwrap();
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "step {step}: row {i} ({:?}) of the batch differs from the row alone",
                choice[i].map(|a| &a.name)
            );
        }
    }
}

#[test]
fn an_adapter_for_another_model_is_refused_by_name() {
    let e = engine(None);
    let dir = crate::common::scratch("adapter-other-model");
    std::fs::copy(fixtures().join("golden/peft/adapter/adapter_config.json"), dir.join("adapter_config.json")).unwrap();
    let a = candle_core::Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap();
    let b = candle_core::Tensor::zeros((64, 4), DType::F32, &Device::Cpu).unwrap();
    let key = "base_model.model.model.language_model.layers.99.mlp.up_proj";
    let tensors =
        std::collections::HashMap::from([(format!("{key}.lora_A.weight"), a), (format!("{key}.lora_B.weight"), b)]);
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    let err = format!("{:#}", e.load_adapter("x", &dir).err().unwrap());
    assert!(err.contains("layers.99.mlp.up_proj") && err.contains("does not have"), "{err}");
    assert!(e.adapters().is_empty());
}
