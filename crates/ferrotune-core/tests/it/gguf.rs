//! `export --export_format gguf` against llama.cpp (fixtures written by tools/golden/check_gguf.py with
//! llama-cpp-python 0.3.36): the bf16 files equal what llama.cpp's own converter writes for the same merged
//! checkpoint, tensor for tensor and key for key; llama.cpp running ferrotune's files (and the GGUF LoRA on the
//! base) gives ferrotune's logits; the quantizers write ggml's bytes; Q4_K_M picks llama-quantize's types.

use std::collections::HashMap;
use std::hash::Hasher;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ferrotune_core::gguf::format::{GgmlType, Gguf, Value};
use ferrotune_core::gguf::quant::quantize;
use ferrotune_core::gguf::{export_gguf, GgufOptions, Quant};
use ferrotune_core::infer::engine::{AdapterMode, Engine};

use crate::common::{fixtures, scratch, tiny_checkpoint};

fn adapter() -> PathBuf {
    fixtures().join("golden/peft/adapter")
}

fn reference() -> serde_json::Value {
    let p = fixtures().join("golden/gguf/reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn safetensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden/gguf").join(name), &Device::Cpu).unwrap()
}

fn export(dir: &Path, quant: Quant, adapters: Vec<PathBuf>, lora_only: bool) -> PathBuf {
    let opts = GgufOptions {
        model_dir: tiny_checkpoint(),
        adapters,
        export_dir: dir.to_path_buf(),
        quant,
        lora_only,
        overwrite: false,
        chat_template: None,
    };
    let report = export_gguf(&opts, |_| {}).unwrap();
    dir.join(&report.files[0].0)
}

/// FNV-1a 64, as the script hashes tensor data and long arrays.
fn fnv(bytes: &[u8]) -> String {
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    format!("{:016x}", h.finish())
}

/// gguf-py's type names and value of a key, as the script records them (long arrays: length and hash of the
/// elements joined by newlines).
fn describe(v: &Value) -> (Vec<String>, serde_json::Value) {
    fn scalar(v: &Value) -> (&'static str, serde_json::Value, String) {
        match v {
            Value::U8(x) => ("UINT8", (*x).into(), x.to_string()),
            Value::I8(x) => ("INT8", (*x).into(), x.to_string()),
            Value::U16(x) => ("UINT16", (*x).into(), x.to_string()),
            Value::I16(x) => ("INT16", (*x).into(), x.to_string()),
            Value::U32(x) => ("UINT32", (*x).into(), x.to_string()),
            Value::I32(x) => ("INT32", (*x).into(), x.to_string()),
            Value::U64(x) => ("UINT64", (*x).into(), x.to_string()),
            Value::I64(x) => ("INT64", (*x).into(), x.to_string()),
            Value::F32(x) => ("FLOAT32", (*x as f64).into(), x.to_string()),
            Value::F64(x) => ("FLOAT64", (*x).into(), x.to_string()),
            Value::Bool(x) => ("BOOL", (*x).into(), if *x { "True" } else { "False" }.into()),
            Value::Str(s) => ("STRING", s.clone().into(), s.clone()),
            Value::Array(_) => ("ARRAY", serde_json::Value::Null, String::new()),
        }
    }
    match v {
        Value::Array(items) => {
            let ty = items.first().map_or("INT32", |i| scalar(i).0);
            let value = if items.len() > 16 {
                let joined: Vec<String> = items.iter().map(|i| scalar(i).2).collect();
                serde_json::json!({"len": items.len(), "fnv1a64": fnv(joined.join("\n").as_bytes())})
            } else {
                serde_json::Value::Array(items.iter().map(|i| scalar(i).1).collect())
            };
            (vec!["ARRAY".into(), ty.into()], value)
        }
        v => {
            let (ty, value, _) = scalar(v);
            (vec![ty.into()], value)
        }
    }
}

/// Our file against the converter's listing: every tensor (name, dimensions, type, data) and every key but the
/// name and size label the converter makes up.
fn assert_same_as_converter(ours: &Gguf, want: &serde_json::Value, what: &str, keys: bool) {
    let tensors = want["tensors"].as_array().unwrap();
    assert_eq!(ours.tensors.len(), tensors.len(), "{what}: tensor count");
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let info = ours.tensors.iter().find(|i| i.name == name).unwrap_or_else(|| panic!("{what}: no {name}"));
        let ne: Vec<u64> = t["ne"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        assert_eq!(info.ne, ne, "{what}: {name} dimensions");
        let ty = GgmlType::from_id(info.type_id).unwrap().name();
        assert_eq!(ty, t["type"].as_str().unwrap(), "{what}: {name} type");
        assert_eq!(fnv(&ours.tensor_bytes(name).unwrap()), t["fnv1a64"].as_str().unwrap(), "{what}: {name} data");
    }
    for (key, v) in want["kv"].as_object().unwrap() {
        if !keys || ["general.name", "general.size_label"].contains(&key.as_str()) {
            continue;
        }
        let got = ours.get(key).unwrap_or_else(|| panic!("{what}: no key {key}"));
        let (types, value) = describe(got);
        assert_eq!(serde_json::json!(types), v[0], "{what}: {key} type");
        assert_eq!(value, v[1], "{what}: {key} value");
    }
}

#[test]
fn gguf_files_equal_what_llama_cpps_converter_writes() {
    let r = reference();
    let dir = scratch("gguf-converter").join("tiny");
    let model = export(&dir, Quant::Bf16, vec![adapter()], false);
    assert_same_as_converter(&Gguf::open(&model).unwrap(), &r["converter"]["model"], "model", true);
    let mmproj = dir.join("mmproj-tiny-BF16.gguf");
    assert_same_as_converter(&Gguf::open(&mmproj).unwrap(), &r["converter"]["mmproj"], "mmproj", true);
    assert!(std::fs::read_to_string(dir.join("Modelfile")).unwrap().contains("FROM ./tiny-BF16.gguf"));
    // The base (stored in bf16, so both sides quantize the same values): Q8_0 as the converter writes it, Q4_K_M
    // as llama-quantize writes it from the converter's bf16 file, byte for byte.
    let q8 = export(&scratch("gguf-base-q8").join("tiny"), Quant::Q8_0, vec![], false);
    assert_same_as_converter(&Gguf::open(&q8).unwrap(), &r["converter"]["base_q8_0"], "base q8_0", true);
    let q4 = export(&scratch("gguf-base-q4").join("tiny"), Quant::Q4KM, vec![], false);
    assert_same_as_converter(&Gguf::open(&q4).unwrap(), &r["llama_quantize_base_q4_k_m"], "base q4_k_m", false);
    // With the adapter: the type llama-quantize gives each tensor of the converter's bf16 file of the merge.
    let q = export(&scratch("gguf-q4km").join("tiny"), Quant::Q4KM, vec![adapter()], false);
    let q = Gguf::open(&q).unwrap();
    for t in r["llama_quantize_q4_k_m"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let info = q.tensors.iter().find(|i| i.name == name).unwrap_or_else(|| panic!("q4_k_m: no {name}"));
        assert_eq!(GgmlType::from_id(info.type_id).unwrap().name(), t["type"].as_str().unwrap(), "q4_k_m: {name}");
    }
}

/// ferrotune's f32 logits at the prompt's last position, its greedy continuation and the margin between the
/// top two logits at each of its steps, base + adapter.
fn ferrotune_runs(prompts: &[Vec<u32>], steps: usize) -> Vec<(Vec<f32>, Vec<u32>, Vec<f32>)> {
    let e = Engine::load(&tiny_checkpoint(), &[adapter().as_path()], AdapterMode::Separate, DType::F32, &Device::Cpu)
        .unwrap();
    prompts
        .iter()
        .map(|p| {
            let mut ids = p.clone();
            let (mut first, mut margins) = (None, Vec::new());
            for _ in 0..steps {
                let (h, _) = e.model.forward_sequence(&ids, None, false).unwrap();
                let l = e.model.logits(&h.narrow(1, ids.len() - 1, 1).unwrap()).unwrap();
                let l: Vec<f32> = l.flatten_all().unwrap().to_vec1().unwrap();
                let next = l.iter().enumerate().fold(0, |b, (i, v)| if *v > l[b] { i } else { b });
                let second = l.iter().enumerate().filter(|(i, _)| *i != next).fold(f32::MIN, |m, (_, v)| m.max(*v));
                margins.push(l[next] - second);
                first.get_or_insert(l);
                ids.push(next as u32);
            }
            (first.unwrap(), ids[p.len()..].to_vec(), margins)
        })
        .collect()
}

#[test]
fn llama_cpp_runs_the_gguf_files_as_ferrotune_runs_the_checkpoint() {
    let r = reference();
    let prompts: Vec<Vec<u32>> = serde_json::from_value(r["prompts"].clone()).unwrap();
    let steps = r["greedy"]["f32"][0].as_array().unwrap().len();
    let ours = ferrotune_runs(&prompts, steps);
    let logits = safetensors("logits.safetensors");
    // Bounds: llama.cpp computes with an f16 KV cache and, for 16-bit weights, 16-bit activations in the products.
    for (quant, bound) in [("f32", 0.01f32), ("bf16", 0.25), ("f16", 0.1), ("bf16+lora", 0.25), ("q8_0", 1.2)] {
        let mut compared = 0;
        for (i, (mine, greedy, margins)) in ours.iter().enumerate() {
            let theirs: Vec<f32> = logits[&format!("{quant}.{i}")].to_vec1().unwrap();
            let d = mine.iter().zip(&theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let span = mine.iter().fold(f32::MIN, |m, v| m.max(*v)) - mine.iter().fold(f32::MAX, |m, v| m.min(*v));
            eprintln!("llama.cpp {quant} prompt {i}: max |logit diff| {d:.4} (logits span {span:.1})");
            assert!(d <= bound, "{quant} prompt {i}: llama.cpp's logits differ from ferrotune's by {d} > {bound}");
            // Greedy tokens: all equal; with 8-bit weights, up to the first step where ferrotune's top two logits
            // are closer than the logits bound (the random-init model has such near-ties; past one, the
            // continuations may part).
            let want: Vec<u32> = serde_json::from_value(r["greedy"][quant][i].clone()).unwrap();
            let tie = if quant == "q8_0" { bound } else { 0.0 };
            let n = margins.iter().position(|m| *m < tie).unwrap_or(steps);
            assert_eq!(want[..n], greedy[..n], "{quant} prompt {i}: greedy tokens");
            compared += n;
        }
        eprintln!("llama.cpp {quant}: {compared} of {} greedy tokens compared, all equal", steps * ours.len());
    }
    // Q4_K_M (on the tiny model mostly Q5_0 and Q8_0: its rows are not multiples of 256; llama.cpp also rounds the
    // activations to 8 bits in these products): logits that correlate (measured: cosine 0.96 or more).
    for (i, (mine, _, _)) in ours.iter().enumerate() {
        let theirs: Vec<f32> = logits[&format!("q4_k_m.{i}")].to_vec1().unwrap();
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum::<f64>();
        let cos = dot(mine, &theirs) / (dot(mine, mine).sqrt() * dot(&theirs, &theirs).sqrt());
        eprintln!("llama.cpp q4_k_m prompt {i}: cosine {cos:.5}");
        assert!(cos >= 0.9, "q4_k_m prompt {i}: cosine {cos}");
    }
}

/// The chat prompt with a picture through llama.cpp's multimodal library (the f32 and bf16 model + projector
/// files): the same token ids around the picture, as many image tokens, and ferrotune's logits.
#[test]
fn llama_cpp_reads_a_picture_through_the_projector_as_ferrotune_does() {
    let r = reference();
    let e = Engine::load(&tiny_checkpoint(), &[adapter().as_path()], AdapterMode::Separate, DType::F32, &Device::Cpu)
        .unwrap();
    let picture = ferrotune_core::image::load_image(&fixtures().join("golden/gguf/image.png")).unwrap();
    let text = format!(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n<think>\n",
        r["image"]["text"].as_str().unwrap()
    );
    let prompt = e.prompt_from_text(&text, &[picture]).unwrap();
    let pad = e.tokenizer.token_id("<|image_pad|>").unwrap();
    let logits = safetensors("logits.safetensors");
    let (mine, _) = e.prefill(&prompt, &mut ferrotune_core::models::qwen3_5::Cache::new(e.model.layers.len())).unwrap();
    // bf16: the merged weights and the projector's rounded to bf16, and llama.cpp's products in bf16.
    for (quant, bound) in [("f32", 0.01f32), ("bf16", 0.4)] {
        let mut ids = Vec::new();
        for part in r[format!("image_prompt_{quant}")].as_array().unwrap() {
            match part.get("image_tokens") {
                Some(n) => ids.extend(std::iter::repeat_n(pad, n.as_u64().unwrap() as usize)),
                None => ids.extend(part.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32)),
            }
        }
        assert_eq!(ids, prompt.ids, "{quant}: llama.cpp's tokens of the prompt with the picture");
        let theirs: Vec<f32> = logits[&format!("{quant}.image")].to_vec1().unwrap();
        let d = mine.iter().zip(&theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("llama.cpp {quant} with a picture: max |logit diff| {d:.4}");
        assert!(d <= bound, "{quant}: with the picture, llama.cpp's logits differ from ferrotune's by {d} > {bound}");
    }
}

#[test]
fn the_gguf_lora_holds_the_adapter_in_llama_cpps_layout() {
    let dir = scratch("gguf-lora").join("lora");
    let path = export(&dir, Quant::F32, vec![adapter()], true);
    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.get("general.type"), Some(&Value::Str("adapter".into())));
    assert_eq!(g.get("adapter.type"), Some(&Value::Str("lora".into())));
    let a = ferrotune_core::lora::Adapter::load(&adapter(), &Device::Cpu).unwrap();
    assert_eq!(g.tensors.len(), 2 * a.weights.len());
    let alpha = match g.get("adapter.lora.alpha") {
        Some(Value::F32(v)) => *v as f64,
        other => panic!("adapter.lora.alpha: {other:?}"),
    };
    assert!((alpha / a.spec.r as f64 - a.spec.scale()).abs() < 1e-6, "llama.cpp's alpha / r is PEFT's scale");
    // Every tensor pairs with a base tensor of the model file, in llama.cpp's orientation (A: r × in, B: out × r).
    let base = Gguf::open(&export(&scratch("gguf-lora-base").join("base"), Quant::Bf16, vec![], false)).unwrap();
    for t in &g.tensors {
        let (stem, which) = t.name.rsplit_once('.').unwrap();
        let b = base.tensors.iter().find(|b| b.name == stem).unwrap_or_else(|| panic!("{stem} not in the model"));
        match which {
            "lora_a" => assert_eq!(t.ne[0], b.ne[0], "{}", t.name),
            "lora_b" => assert_eq!(t.ne[1], b.ne[1], "{}", t.name),
            other => panic!("{other}"),
        }
    }
}

#[test]
fn quantizers_write_ggmls_bytes() {
    let q = safetensors("quant.safetensors");
    let x = &q["input"];
    let (rows, n) = x.dims2().unwrap();
    let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    for (name, ty) in
        [("Q8_0", GgmlType::Q8_0), ("Q5_0", GgmlType::Q5_0), ("Q4_K", GgmlType::Q4K), ("Q6_K", GgmlType::Q6K)]
    {
        let want: Vec<u8> = q[name].to_vec1().unwrap();
        let got = quantize(ty, &x, n);
        assert_eq!(got.len(), want.len(), "{name}: size for {rows} rows of {n}");
        let size = ty.block().1;
        let differ = got.chunks(size).zip(want.chunks(size)).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{name}: {differ} of {} blocks differ from ggml's", got.len() / size);
    }
}

/// What llama.cpp would not load, or what the format cannot carry, is refused before a file is written.
#[test]
fn unloadable_exports_are_refused_before_writing() {
    let tmp = scratch("gguf-refused");
    // Another model family.
    let other = tmp.join("other");
    std::fs::create_dir_all(&other).unwrap();
    for entry in std::fs::read_dir(tiny_checkpoint()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), other.join(entry.file_name())).unwrap();
    }
    let cfg = std::fs::read_to_string(other.join("config.json")).unwrap().replace("\"qwen3_5\"", "\"llama\"");
    std::fs::write(other.join("config.json"), cfg).unwrap();
    let mut opts = GgufOptions {
        model_dir: other,
        adapters: vec![],
        export_dir: tmp.join("out"),
        quant: Quant::Bf16,
        lora_only: false,
        overwrite: false,
        chat_template: None,
    };
    let err = format!("{:#}", export_gguf(&opts, |_| {}).unwrap_err());
    assert!(err.contains("model_type") && err.contains("llama"), "{err}");
    // A GGUF LoRA holds one adapter, in a 16/32-bit or 8-bit type.
    opts.model_dir = tiny_checkpoint();
    opts.lora_only = true;
    opts.adapters = vec![adapter(), adapter()];
    let err = format!("{:#}", export_gguf(&opts, |_| {}).unwrap_err());
    assert!(err.contains("one adapter"), "{err}");
    opts.adapters = vec![adapter()];
    opts.quant = Quant::Q4KM;
    let err = format!("{:#}", export_gguf(&opts, |_| {}).unwrap_err());
    assert!(err.contains("q4_k_m"), "{err}");
    assert!(!tmp.join("out").exists(), "nothing written");
    // An existing file is kept unless --overwrite.
    opts.lora_only = false;
    opts.quant = Quant::Bf16;
    export_gguf(&opts, |_| {}).unwrap();
    let err = format!("{:#}", export_gguf(&opts, |_| {}).unwrap_err());
    assert!(err.contains("--overwrite"), "{err}");
    opts.overwrite = true;
    export_gguf(&opts, |_| {}).unwrap();
    let names: Vec<String> =
        std::fs::read_dir(tmp.join("out")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(names.len(), 3, "model, projector and Modelfile, no temporary files left: {names:?}");
}
