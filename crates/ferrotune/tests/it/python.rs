//! What the current binary writes, checked by the pinned Python stack (tools/golden/.venv: transformers, PEFT):
//! an export loads in transformers with PEFT's logits, and an adapter that `ferrotune train` just wrote loads in
//! PEFT without a warning and gives ferrotune's logits. Without the venv (`bash tools/golden/setup.sh`) each test
//! says on stderr, past the harness's capture, that it was skipped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use ferrotune_core::lora::Adapter;
use ferrotune_core::models::qwen3_5::{Qwen3_5, VisionInput};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The venv's Python, or None after saying loudly that `test` is skipped.
fn python(test: &str) -> Option<PathBuf> {
    let py = root().join("tools/golden/.venv/bin/python");
    if py.is_file() {
        return Some(py);
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: tools/golden/.venv is missing (`bash tools/golden/setup.sh` installs the pinned \
         transformers and PEFT)"
    );
    None
}

fn run_python(py: &Path, script: &str, args: &[&str]) {
    let out = Command::new(py).arg(root().join("tools/golden").join(script)).args(args).output().expect("run python");
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn export_loads_in_transformers() {
    let Some(py) = python("export_loads_in_transformers") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("check.json");
    run_python(&py, "check_export.py", &[env!("CARGO_BIN_EXE_ferrotune"), "--out", out.to_str().unwrap()]);
    let r = read_json(&out);
    let f32_diff = r["float32"]["max_abs_logit_diff"].as_f64().unwrap();
    assert!(f32_diff <= 1e-4, "transformers: exported f32 vs PEFT logits differ by {f32_diff}");
    let bf16_diff = r["auto"]["max_abs_logit_diff"].as_f64().unwrap();
    assert!(bf16_diff <= 1e-3, "transformers: exported bf16 vs PEFT merge rounded to bf16 differ by {bf16_diff}");
    assert_eq!(r["auto"]["config_dtype"], "bfloat16");
    for dtype in ["float32", "auto"] {
        let row = &r[dtype];
        assert_eq!(row["missing_keys"].as_array().unwrap().len(), 0, "{dtype}: {row}");
        // transformers sets aside the same unused tensors (mtp.*) as when it loads the base.
        assert_eq!(row["unexpected_keys"], row["base_unexpected_keys"], "{dtype}");
        assert_eq!(row["chat_template_equal"], true, "{dtype}");
        assert_eq!(row["processor_inputs_equal"], true, "{dtype}");
    }
    eprintln!(
        "transformers on the export: f32 max logit diff {f32_diff:e}, bf16 vs PEFT's merge in bf16 {bf16_diff:e}"
    );
}

#[test]
fn peft_loads_a_fresh_adapter() {
    let Some(py) = python("peft_loads_a_fresh_adapter") else { return };
    let fixtures = root().join("tests/fixtures");
    let tiny = fixtures.join("tiny-qwen3_5");
    let tmp = tempfile::tempdir().unwrap();
    let adapter_dir = tmp.path().join("adapter");
    let yaml = tmp.path().join("train.yaml");
    std::fs::write(
        &yaml,
        format!(
            "model_name_or_path: {}\ntemplate: qwen3_5_nothink\nstage: sft\ndo_train: true\nfinetuning_type: lora\n\
             lora_target: all\nlora_rank: 4\ndataset: recipe_rows\ndataset_dir: {}\ncutoff_len: 512\n\
             learning_rate: 5.0e-3\nmax_steps: 3\nper_device_train_batch_size: 2\nlogging_steps: 1\n\
             save_steps: 1000\noutput_dir: {}\nplot_loss: false\n",
            tiny.display(),
            fixtures.join("golden/recipes/data").display(),
            adapter_dir.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(["train", yaml.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "ferrotune train: {}", String::from_utf8_lossy(&out.stderr));

    let check = tmp.path().join("check");
    run_python(
        &py,
        "check_adapter.py",
        &["--adapter", adapter_dir.to_str().unwrap(), "--out", check.to_str().unwrap()],
    );
    let r = read_json(&check.join("check.json"));
    assert_eq!(r["warnings"].as_array().unwrap().len(), 0, "PEFT warned: {r}");
    assert_eq!(r["lora_tensors_loaded"], r["tensors_in_file"], "{r}");
    assert!(r["tensors_in_file"].as_u64().unwrap() > 0);

    // PEFT's logits with the adapter equal ferrotune's, merged and separate.
    let want = candle_core::safetensors::load(check.join("logits.safetensors"), &Device::Cpu).unwrap();
    let want = &want["logits_tail"];
    let case =
        candle_core::safetensors::load(fixtures.join("golden/model/one_image.safetensors"), &Device::Cpu).unwrap();
    let ids: Vec<u32> = case["input_ids"].to_vec1::<i64>().unwrap().iter().map(|&x| x as u32).collect();
    let k = case["pixel_levels"].to_dtype(DType::F32).unwrap();
    let pixel_values = ((k * (1.0f64 / 255.0)).unwrap() - 0.5).unwrap().affine(2.0, 0.0).unwrap();
    let g: Vec<Vec<i64>> = case["image_grid_thw"].to_vec2().unwrap();
    let images = VisionInput { pixel_values, grids: vec![[g[0][0] as usize, g[0][1] as usize, g[0][2] as usize]] };
    let adapter = Adapter::load(&adapter_dir, &Device::Cpu).unwrap();
    for merge in [true, false] {
        let mut model = Qwen3_5::load(&tiny, DType::F32, &Device::Cpu).unwrap();
        adapter.apply(model.linears_mut(), merge).unwrap();
        let (h, _) = model.forward_sequence(&ids, Some(&images), false).unwrap();
        let n = want.dim(0).unwrap();
        let logits = model.logits(&h.squeeze(0).unwrap().narrow(0, ids.len() - n, n).unwrap()).unwrap();
        let d = (logits - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        eprintln!("fresh adapter (merged {merge}) vs PEFT: max logit diff {d:e}");
        assert!(d <= 1e-4, "merged {merge}: ferrotune's logits differ from PEFT's by {d}");
    }
}

/// With tools/golden/.venv-gguf: llama.cpp's converter, llama-quantize and llama.cpp itself rerun on what the current
/// binary writes (tools/golden/check_gguf.py), and their results equal the committed fixtures that the library's
/// tests compare ferrotune with.
#[test]
fn llama_cpp_reruns_on_the_current_gguf_export() {
    let py = root().join("tools/golden/.venv-gguf/bin/python");
    if !py.is_file() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED llama_cpp_reruns_on_the_current_gguf_export: tools/golden/.venv-gguf is missing \
             (`bash tools/golden/setup_gguf.sh` builds the pinned llama-cpp-python)"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("check.json");
    run_python(&py, "check_gguf.py", &[env!("CARGO_BIN_EXE_ferrotune"), "--out", out.to_str().unwrap()]);
    let fixtures = root().join("tests/fixtures/golden/gguf");
    let (now, committed) = (read_json(&out), read_json(&fixtures.join("reference.json")));
    assert_eq!(now["greedy"], committed["greedy"], "llama.cpp's greedy tokens");
    if now.get("converter").is_some() {
        for key in ["converter", "llama_quantize_q4_k_m", "llama_quantize_base_q4_k_m"] {
            assert_eq!(now[key], committed[key], "{key}");
        }
    }
    for (file, bound) in [("logits.safetensors", 1e-5f32), ("quant.safetensors", 0.0)] {
        let now = candle_core::safetensors::load(format!("{}.{file}", out.display()), &Device::Cpu).unwrap();
        let committed = candle_core::safetensors::load(fixtures.join(file), &Device::Cpu).unwrap();
        assert_eq!(now.len(), committed.len(), "{file}");
        for (name, t) in &committed {
            let (a, b) = (t.to_dtype(DType::F32).unwrap(), now[name].to_dtype(DType::F32).unwrap());
            let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= bound, "{file} {name}: the rerun differs by {d}");
        }
    }
}

/// With the venv: the official `openai` client runs a two-turn tool conversation (tools/openai_tools_check.py)
/// against `ferrotune api` serving the tiny checkpoint trained on tool-calling rows: calls as `tool_calls`, whole
/// and streamed, then the answer from the tool's result.
#[test]
fn openai_client_runs_a_two_turn_tool_conversation() {
    let Some(py) = python("openai_client_runs_a_two_turn_tool_conversation") else { return };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    cmd.args(["api", "--model_name_or_path"])
        .arg(root().join("tests/fixtures/tiny-qwen3_5"))
        .arg("--adapter_name_or_path")
        .arg(crate::serve::tool_adapter());
    let server = crate::serve::spawn(cmd);
    let out = Command::new(py)
        .arg(root().join("tools/openai_tools_check.py"))
        .args(["--base-url", &format!("http://{}/v1", server.addr)])
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(out.status.success(), "openai_tools_check.py failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
}
