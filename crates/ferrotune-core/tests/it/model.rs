//! Qwen3.5 parity with transformers on the tiny checkpoint (fixtures from tools/golden/gen_model.py).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use ferrotune_core::models::qwen3_5::{Qwen3_5, VisionInput};

use crate::common::{assert_close, fixtures, tiny_checkpoint};

struct Case {
    name: String,
    t: HashMap<String, Tensor>,
}

fn cases() -> Vec<Case> {
    let dir = fixtures().join("golden/model");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    index
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap().to_string();
            let t = candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu).unwrap();
            Case { name, t }
        })
        .collect()
}

/// Pixel values as transformers computes them from uint8 levels: (k/255 − 0.5)/0.5 in f32.
fn pixel_values(levels: &Tensor) -> Tensor {
    let k = levels.to_dtype(DType::F32).unwrap();
    ((k * (1.0f64 / 255.0)).unwrap() - 0.5).unwrap().affine(2.0, 0.0).unwrap()
}

fn vision_input(c: &Case) -> Option<VisionInput> {
    let levels = c.t.get("pixel_levels")?;
    let grids: Vec<Vec<i64>> = c.t["image_grid_thw"].to_vec2().unwrap();
    let grids = grids.iter().map(|g| [g[0] as usize, g[1] as usize, g[2] as usize]).collect();
    Some(VisionInput { pixel_values: pixel_values(levels), grids })
}

fn ids(c: &Case) -> Vec<u32> {
    c.t["input_ids"].to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect()
}

#[test]
fn f32_forward_matches_transformers() {
    let model = Qwen3_5::load(&tiny_checkpoint(), DType::F32, &Device::Cpu).unwrap();
    for c in cases() {
        let ids = ids(&c);
        let images = vision_input(&c);
        // 3-D positions: exactly equal.
        let grids: Vec<[usize; 3]> = images.as_ref().map_or(vec![], |v| v.grids.clone());
        let pos = model.rope_index(&ids, &grids).unwrap();
        let want: Vec<Vec<i64>> = c.t["position_ids"].to_vec2().unwrap();
        for (a, (got, want)) in pos.axes.iter().zip(&want).enumerate() {
            assert_eq!(got, want, "{}: position axis {a}", c.name);
        }
        assert_eq!(pos.delta, c.t["rope_delta"].to_vec1::<i64>().unwrap()[0], "{}: rope delta", c.name);
        if let Some(v) = &images {
            let feats = model.image_features(v).unwrap();
            let d = assert_close(&feats, &c.t["image_embeds"], 1e-4, &format!("{}: image embeddings", c.name));
            eprintln!("{}: image embeddings max diff {d:e}", c.name);
        }
        let (hidden, layers) = model.forward_sequence(&ids, images.as_ref(), true).unwrap();
        for (i, h) in layers.iter().enumerate() {
            let d = assert_close(
                &h.squeeze(0).unwrap(),
                &c.t[&format!("hidden.{i}")],
                1e-4,
                &format!("{}: layer {i}", c.name),
            );
            eprintln!("{}: layer {i} max diff {d:e}", c.name);
        }
        assert_close(&hidden.squeeze(0).unwrap(), &c.t["final_hidden"], 1e-4, &format!("{}: final hidden", c.name));
        let want = &c.t["logits_tail"];
        let tail = want.dim(0).unwrap();
        let logits = model.logits(&hidden.squeeze(0).unwrap().narrow(0, ids.len() - tail, tail).unwrap()).unwrap();
        let d = assert_close(&logits, want, 1e-4, &format!("{}: logits", c.name));
        eprintln!("{}: logits max diff {d:e}", c.name);
    }
}

/// bf16 weights and activations (as on a GPU). Both sides round every op to 8 mantissa bits in a different
/// order, so the bound is relative to transformers' own bf16 error: our bf16 logits may be at most twice as far
/// from transformers' bf16 logits as those are from its f32 logits. Measured on logits of magnitude 22–26:
/// transformers bf16 vs f32 0.18–0.83, ours vs transformers bf16 0.27–0.39.
#[test]
fn bf16_forward_matches_transformers_within_bf16_bound() {
    let model = Qwen3_5::load(&tiny_checkpoint(), DType::BF16, &Device::Cpu).unwrap();
    for c in cases() {
        let ids = ids(&c);
        let images = vision_input(&c);
        let (hidden, _) = model.forward_sequence(&ids, images.as_ref(), false).unwrap();
        let want = &c.t["logits_tail_bf16"];
        let tail = want.dim(0).unwrap();
        let logits = model.logits(&hidden.squeeze(0).unwrap().narrow(0, ids.len() - tail, tail).unwrap()).unwrap();
        let hf_own = crate::common::max_abs_diff(want, &c.t["logits_tail"], "hf bf16 vs f32");
        let d = assert_close(&logits, want, 2.0 * hf_own, &format!("{}: bf16 logits", c.name));
        eprintln!("{}: bf16 logits max diff {d:e} (transformers bf16 vs f32: {hf_own:e})", c.name);
    }
}

/// The CPU's compact base formats against transformers. bf16 weights kept as stored (training with `bf16: true`,
/// serving) widen exactly to f32, so they must meet the f32 bound. Per-row int8 (`quantization_bit: 8`) rounds
/// every weight to 1/254 of its row's range, about 2.5 times bf16's rounding on these rows: its logits may be at
/// most three times as far from transformers' f32 logits as transformers' own bf16 logits are. Measured (logits of
/// magnitude 22–26): int8 0.45 / 0.82 / 0.59 against bf16's 0.18 / 0.83 / 0.28; bf16 as stored 1.3e-5–4.1e-5.
/// bf16 products (activations rounded to bf16 before each frozen product, AMX tiles where the CPU has them)
/// round less than transformers' bf16, which rounds every op: at most twice its distance from f32.
#[test]
fn compact_cpu_weights_match_transformers() {
    use ferrotune_core::weights::FrozenFormat;
    let stored = Qwen3_5::load_as(&tiny_checkpoint(), DType::F32, &Device::Cpu, FrozenFormat::Stored).unwrap();
    assert_eq!(stored.embed_tokens.dtype(), DType::BF16, "the bf16 table stays bf16");
    let int8 = Qwen3_5::load_as(&tiny_checkpoint(), DType::F32, &Device::Cpu, FrozenFormat::Int8).unwrap();
    assert_eq!(int8.embed_tokens.dtype(), DType::U8, "the table is quantized");
    let bf16 = Qwen3_5::load_as(&tiny_checkpoint(), DType::F32, &Device::Cpu, FrozenFormat::Bf16).unwrap();
    assert!(bf16.head().bf16_products, "bf16 products on the head");
    for c in cases() {
        let ids = ids(&c);
        let images = vision_input(&c);
        let want = &c.t["logits_tail"];
        let tail = want.dim(0).unwrap();
        let logits = |m: &Qwen3_5| {
            let (hidden, _) = m.forward_sequence(&ids, images.as_ref(), false).unwrap();
            m.logits(&hidden.squeeze(0).unwrap().narrow(0, ids.len() - tail, tail).unwrap()).unwrap()
        };
        let d = assert_close(&logits(&stored), want, 1e-4, &format!("{}: bf16-as-stored logits", c.name));
        let hf_bf16 = crate::common::max_abs_diff(&c.t["logits_tail_bf16"], want, "hf bf16 vs f32");
        let q = assert_close(&logits(&int8), want, 3.0 * hf_bf16, &format!("{}: int8 logits", c.name));
        let b = assert_close(&logits(&bf16), want, 2.0 * hf_bf16, &format!("{}: bf16-product logits", c.name));
        assert!(b > d, "{}: bf16 products must differ from the exact path ({b:e} vs {d:e})", c.name);
        eprintln!(
            "{}: bf16-as-stored {d:e}, bf16 products {b:e}, int8 {q:e} (transformers bf16 vs f32: {hf_bf16:e})",
            c.name
        );
    }
}
