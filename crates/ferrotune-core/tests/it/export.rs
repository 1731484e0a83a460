//! Export: the merged checkpoint computes what base + adapter computes, holds every tensor and file of the base,
//! shards as asked, and loads in transformers (tools/golden/check_export.py; its result is a fixture).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ferrotune_core::chat_template::RenderOptions;
use ferrotune_core::export::{export, ExportOptions};
use ferrotune_core::infer::{AdapterMode, Engine};
use ferrotune_core::lora::Adapter;
use ferrotune_core::weights::Checkpoint;

use crate::common::{assert_close, fixtures, tiny_checkpoint};

fn adapter() -> PathBuf {
    fixtures().join("golden/peft/adapter")
}

fn opts(out: &Path, dtype: Option<DType>, shard_bytes: u64) -> ExportOptions {
    ExportOptions {
        model_dir: tiny_checkpoint(),
        adapters: vec![adapter()],
        export_dir: out.to_path_buf(),
        shard_bytes,
        dtype,
        overwrite: false,
        chat_template: None,
    }
}

/// Full-sequence logits of a prompt with two images.
fn logits(e: &Engine) -> Tensor {
    let img = |f: &str| ferrotune_core::image::load_image(&fixtures().join("golden/model").join(f)).unwrap();
    let messages = serde_json::json!([{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Describe the robot."}]}]);
    let opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
    let p = e.prompt(&messages, &[img("img_a.png"), img("img_b.png")], &opts).unwrap();
    let (h, _) = e.model.forward_sequence(&p.ids, p.images.as_ref(), false).unwrap();
    e.model.logits(&h).unwrap()
}

fn load(dir: &Path, adapters: &[&Path], mode: AdapterMode) -> Engine {
    Engine::load(dir, adapters, mode, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn merged_f32_export_equals_base_plus_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let report = export(&opts(&out, Some(DType::F32), 5_000_000_000), |_| {}).unwrap();
    assert_eq!(report.merged_modules, Adapter::load(&adapter(), &Device::Cpu).unwrap().weights.len());
    assert_eq!(report.shards.len(), 1);
    assert!(out.join("model.safetensors").is_file() && !out.join("model.safetensors.index.json").exists());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "float32");

    let reference = logits(&load(&tiny_checkpoint(), &[&adapter()], AdapterMode::Separate));
    let merged = logits(&load(&out, &[], AdapterMode::Merge));
    let d = assert_close(&merged, &reference, 1e-4, "exported (f32) vs base + separate adapter logits");
    eprintln!("export f32: max |logit diff| vs base + adapter = {d:e}");
    // The adapter changes the logits by far more than that, so the test would see a missing merge.
    let base = logits(&load(&tiny_checkpoint(), &[], AdapterMode::Merge));
    assert!(crate::common::max_abs_diff(&base, &reference, "base vs adapter") > 1e-2);
}

#[test]
fn every_tensor_and_file_carried_over_in_the_stored_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    // ~0.3 MB shards: the tiny checkpoint (1.3 MB) is split into several.
    let report = export(&opts(&out, None, 300_000), |_| {}).unwrap();
    let n = report.shards.len();
    assert!(n >= 4, "{n} shards");
    for (i, (name, bytes)) in report.shards.iter().enumerate() {
        assert_eq!(name, &format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        assert!(*bytes <= 300_000, "{name}: {bytes} bytes");
    }
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap()).unwrap();

    let base = Checkpoint::open(&tiny_checkpoint()).unwrap();
    let merged = Checkpoint::open(&out).unwrap();
    assert_eq!(base.names(), merged.names(), "same tensor names");
    assert!(merged.contains("mtp.fc.weight"), "unused base tensors are carried over");
    assert_eq!(index["weight_map"].as_object().unwrap().len(), base.names().len());
    let lora = Adapter::load(&adapter(), &Device::Cpu).unwrap();
    let scale = lora.spec.scale();
    for name in base.names() {
        let (shape, dtype) = base.info(name).unwrap();
        assert_eq!(merged.info(name).unwrap(), (shape, dtype), "{name}: shape and stored dtype kept");
        let b = base.load(name, &Device::Cpu).unwrap();
        let m = merged.load(name, &Device::Cpu).unwrap();
        let want = match name.strip_suffix(".weight").and_then(|module| lora.weights.get(module)) {
            // W + scale·B·A in f32, rounded once to the stored dtype.
            Some((a, bm)) => (b.to_dtype(DType::F32).unwrap() + (bm.matmul(a).unwrap() * scale).unwrap())
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
            None => b,
        };
        let (w, m) = (want.to_dtype(DType::F32).unwrap(), m.to_dtype(DType::F32).unwrap());
        assert_eq!(crate::common::max_abs_diff(&w, &m, name), 0.0, "{name}: bit-exact");
    }
    let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&cfg).unwrap()["dtype"], "bfloat16");
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    for f in ["generation_config.json", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(tiny_checkpoint().join(f)).unwrap(), "{f}");
    }
    // It loads in ferrotune; its logits move from the f32 base + adapter by what rounding the merged weights to
    // bf16 moves them, as transformers measures on the same prompt with PEFT's merge (tools/golden/check_export.py;
    // both sides compute in f32, so the two shifts agree to the f32 logits bound, twice over).
    let e = load(&out, &[], AdapterMode::Merge);
    let reference = logits(&load(&tiny_checkpoint(), &[&adapter()], AdapterMode::Separate));
    let d = crate::common::max_abs_diff(&logits(&e), &reference, "bf16 export");
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("golden/export_reference.json")).unwrap())
            .unwrap();
    let want = t["bf16_rounding_effect"].as_f64().unwrap();
    eprintln!("export bf16 (auto): max |logit diff| vs base + adapter in f32 = {d:e}; transformers: {want:e}");
    assert!(
        (d as f64 - want).abs() <= 2e-4,
        "bf16 export shifts the logits by {d}, transformers' bf16 merge by {want}"
    );
    // No staging folder is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}

#[test]
fn adapter_template_wins_and_existing_output_is_protected() {
    let tmp = tempfile::tempdir().unwrap();
    // An adapter folder as training writes it: the adapter plus the template it trained with.
    let ad = tmp.path().join("adapter");
    std::fs::create_dir(&ad).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter().join(f), ad.join(f)).unwrap();
    }
    let template = "{%- for m in messages %}{{ m.role }}: {{ m.content }}\n{%- endfor %}TRAINED";
    std::fs::write(ad.join("chat_template.jinja"), template).unwrap();
    let out = tmp.path().join("out");
    let mut o = opts(&out, None, 5_000_000_000);
    o.adapters = vec![ad.clone()];
    let report = export(&o, |_| {}).unwrap();
    assert_eq!(report.template_from, Some(ad.display().to_string()));
    assert_eq!(std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(), template);
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(tc.get("chat_template").is_none());

    // A template named by the caller is written when no adapter carries one, and loses to the adapter's.
    let named = ("{{ messages[0].content }}NAMED".to_string(), "built-in template `x`".to_string());
    let out2 = tmp.path().join("out2");
    let mut o2 = opts(&out2, None, 5_000_000_000);
    o2.chat_template = Some(named.clone());
    assert_eq!(export(&o2, |_| {}).unwrap().template_from.as_deref(), Some(named.1.as_str()));
    assert_eq!(std::fs::read_to_string(out2.join("chat_template.jinja")).unwrap(), named.0);
    let out3 = tmp.path().join("out3");
    let mut o3 = o.clone();
    o3.export_dir = out3.clone();
    o3.chat_template = Some(named);
    export(&o3, |_| {}).unwrap();
    assert_eq!(std::fs::read_to_string(out3.join("chat_template.jinja")).unwrap(), template);

    // A non-empty target is refused without overwrite...
    let err = export(&o, |_| {}).unwrap_err().to_string();
    assert!(err.contains("not empty") && err.contains("--overwrite"), "{err}");
    // ...and with it, the old checkpoint's files (here: a one-file checkpoint) are replaced by the new shards,
    // while unrelated files stay.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    o.overwrite = true;
    o.shard_bytes = 400_000;
    let report = export(&o, |_| {}).unwrap();
    assert!(report.shards.len() > 1);
    assert!(!out.join("model.safetensors").exists(), "stale single-file weights removed");
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
    assert_eq!(
        Checkpoint::open(&out).unwrap().names().len(),
        Checkpoint::open(&tiny_checkpoint()).unwrap().names().len()
    );

    // Exporting onto an input folder is refused.
    let mut o2 = opts(&tiny_checkpoint(), None, 1);
    o2.overwrite = true;
    assert!(export(&o2, |_| {}).unwrap_err().to_string().contains("input folder"));
}

#[test]
fn two_adapters_sum() {
    // The same adapter twice doubles the delta: W + 2·scale·B·A.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut o = opts(&out, Some(DType::F32), 5_000_000_000);
    o.adapters = vec![adapter(), adapter()];
    export(&o, |_| {}).unwrap();
    let a = Adapter::load(&adapter(), &Device::Cpu).unwrap();
    let (module, (la, lb)) = a.weights.iter().next().unwrap();
    let key = format!("{module}.weight");
    let base =
        Checkpoint::open(&tiny_checkpoint()).unwrap().load(&key, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let got = Checkpoint::open(&out).unwrap().load(&key, &Device::Cpu).unwrap();
    let want = (base + (lb.matmul(la).unwrap() * (2.0 * a.spec.scale())).unwrap()).unwrap();
    assert_close(&got, &want, 1e-6, &key);
}
