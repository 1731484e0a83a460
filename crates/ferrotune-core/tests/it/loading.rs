//! Checkpoint loading: errors name the tensor, the shape or the model type; tied and untied heads.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ferrotune_core::models::qwen3_5::Qwen3_5;

use crate::common::{assert_close, tiny_checkpoint};

/// A copy of the tiny checkpoint as one shard (no index), after `edit` changed its tensors.
fn edited_copy(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let src = tiny_checkpoint();
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = HashMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".safetensors") {
            tensors.extend(candle_core::safetensors::load(&p, &Device::Cpu).unwrap());
        } else if name != "model.safetensors.index.json" {
            std::fs::copy(&p, dir.path().join(&name)).unwrap();
        }
    }
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match Qwen3_5::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn missing_tensor_is_named() {
    let name = "model.language_model.layers.3.self_attn.k_proj.weight";
    let dir = edited_copy(|t| {
        t.remove(name);
    });
    let err = load_err(dir.path());
    assert!(err.contains(name), "{err}");
    assert!(err.contains("decoder layer 3"), "{err}");
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let name = "model.language_model.layers.0.linear_attn.in_proj_z.weight";
    let dir = edited_copy(|t| {
        t.insert(name.into(), Tensor::zeros((60, 64), DType::BF16, &Device::Cpu).unwrap());
    });
    let err = load_err(dir.path());
    assert!(err.contains(name) && err.contains("[60, 64]") && err.contains("[64, 64]"), "{err}");
}

#[test]
fn unknown_model_type_lists_supported() {
    let dir = edited_copy(|_| {});
    let cfg = dir.path().join("config.json");
    let text =
        std::fs::read_to_string(&cfg).unwrap().replace("\"model_type\": \"qwen3_5\",", "\"model_type\": \"llama\",");
    std::fs::write(&cfg, text).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("llama") && err.contains("qwen3_5"), "{err}");
    let err = ferrotune_core::models::model_type(dir.path()).unwrap_err().to_string();
    assert!(err.contains("\"llama\" is not supported") && err.contains("qwen3_5"), "{err}");
}

#[test]
fn single_shard_without_index_and_untied_head() {
    // One file, no index; an explicit lm_head equal to the embedding must give the same logits as tied.
    let dir = edited_copy(|t| {
        let e = t["model.language_model.embed_tokens.weight"].clone();
        t.insert("lm_head.weight".into(), e);
    });
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false");
    std::fs::write(&cfg, text).unwrap();
    let untied = Qwen3_5::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert!(untied.lm_head.is_some());
    let tied = Qwen3_5::load(&tiny_checkpoint(), DType::F32, &Device::Cpu).unwrap();
    assert!(tied.lm_head.is_none());
    let ids = [2001u32, 84, 82, 328, 198, 300, 400];
    let (a, _) = tied.forward_sequence(&ids, None, false).unwrap();
    let (b, _) = untied.forward_sequence(&ids, None, false).unwrap();
    assert_close(&tied.logits(&a).unwrap(), &untied.logits(&b).unwrap(), 0.0, "tied vs untied logits");
}

#[test]
fn missing_untied_head_is_an_error() {
    let dir = edited_copy(|_| {});
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false");
    std::fs::write(&cfg, text).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("lm_head.weight"), "{err}");
}

#[test]
fn tensors_used_in_place_equal_the_files_and_outlive_the_checkpoint() {
    use ferrotune_core::weights::Checkpoint;
    let dir = tiny_checkpoint();
    let mut reference = HashMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            reference.extend(candle_core::safetensors::load(&p, &Device::Cpu).unwrap());
        }
    }
    let ckpt = Checkpoint::open(&dir).unwrap();
    let names: Vec<String> = ckpt.names().into_iter().map(str::to_owned).collect();
    assert_eq!(names.len(), reference.len());
    let first: Vec<Tensor> = names.iter().map(|n| ckpt.load(n, &Device::Cpu).unwrap()).collect();
    assert_eq!(ckpt.used_in_place(), names.len(), "every tensor of the fixture is aligned and used in place");
    // A second load of a name gets its own buffer with the same values.
    let again = ckpt.load(&names[0], &Device::Cpu).unwrap();
    drop(ckpt);
    // The mapping stays alive while any tensor uses it.
    for (name, t) in names.iter().zip(&first) {
        let want = &reference[name];
        assert_eq!(t.dtype(), want.dtype(), "{name}");
        let d = t.to_dtype(DType::F64).unwrap().sub(&want.to_dtype(DType::F64).unwrap()).unwrap();
        assert_eq!(d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap(), 0.0, "{name}");
    }
    assert_close(&again.to_dtype(DType::F32).unwrap(), &first[0].to_dtype(DType::F32).unwrap(), 0.0, &names[0]);
    drop(first);
    assert_close(
        &again.to_dtype(DType::F32).unwrap(),
        &reference[&names[0]].to_dtype(DType::F32).unwrap(),
        0.0,
        "copy",
    );
}
