//! The README's workflow, run as a user runs it: the reference run's YAML and dataset (paths pointed at the
//! tiny checkpoint), `data check`, `train`, `eval`, `export`, `env`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn run(dir: &Path, args: &[&str]) -> (bool, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_ferrotune")).current_dir(dir).args(args).output().expect("run ferrotune");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// A copy of the reference run's folder (train_qwen.yaml + data/) with the model path made absolute.
fn reference_run(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrotune-readme-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let src = fixtures().join("data/reference_run");
    for e in std::fs::read_dir(src.join("data")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join("data").join(p.file_name().unwrap())).unwrap();
    }
    let yaml = std::fs::read_to_string(src.join("train_qwen.yaml")).unwrap();
    let yaml = yaml.replace("../../tiny-qwen3_5", &fixtures().join("tiny-qwen3_5").display().to_string());
    std::fs::write(dir.join("train_qwen.yaml"), yaml).unwrap();
    dir
}

#[test]
fn env_prints_the_environment() {
    let (ok, out) = run(&std::env::temp_dir(), &["env"]);
    assert!(ok, "{out}");
    assert!(out.contains("ferrotune version") && out.contains("cuda"), "{out}");
}

#[test]
fn reference_run_checks_trains_evaluates_and_exports() {
    let dir = reference_run("workflow");
    // The reference YAML unchanged apart from paths: pre-flight check.
    let (ok, out) = run(&dir, &["data", "check", "train_qwen.yaml"]);
    assert!(ok, "{out}");
    assert!(out.contains("2 kept") && out.contains("optimizer steps"), "{out}");
    // Train (one epoch to keep the test short), LLaMA-Factory's output files.
    let (ok, out) = run(&dir, &["train", "train_qwen.yaml", "num_train_epochs=1", "plot_loss=true"]);
    assert!(ok, "{out}");
    assert!(out.contains("Total optimization steps") && out.contains("train_loss"), "{out}");
    let adapter = dir.join("saves/tiny-qwen3_5/lora");
    for f in ["adapter_model.safetensors", "adapter_config.json", "trainer_log.jsonl", "training_loss.png"] {
        assert!(adapter.join(f).exists(), "{f} missing after train");
    }
    // Evaluate base vs base+adapter on the rows, as the README does.
    let model = fixtures().join("tiny-qwen3_5").display().to_string();
    let a = adapter.display().to_string();
    let (ok, out) = run(
        &dir,
        &[
            "eval",
            "--model_name_or_path",
            &model,
            "--adapter_name_or_path",
            &a,
            "--dataset",
            "mllm_robot",
            "--dataset_dir",
            "data",
            "--max_new_tokens",
            "8",
            "--output_dir",
            "eval",
        ],
    );
    assert!(ok, "{out}");
    assert!(dir.join("eval/report.md").exists() && out.contains("bleu-4"), "{out}");
    // With no --template, the prompts are those the adapter was trained with (the YAML's `template: qwen`), not
    // the checkpoint's own format.
    assert!(out.contains(&format!("template: `qwen` (the one {a} was trained with)")), "{out}");
    // Export the merged model.
    let (ok, out) =
        run(&dir, &["export", "--model_name_or_path", &model, "--adapter_name_or_path", &a, "--export_dir", "merged"]);
    assert!(ok, "{out}");
    assert!(dir.join("merged/config.json").exists() && dir.join("merged/tokenizer.json").exists(), "{out}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = reference_run("errors");
    let (ok, out) = run(&dir, &["train", "train_qwen.yaml", "learning_rat=1e-4"]);
    assert!(!ok && out.contains("learning_rate"), "unknown key with a suggestion: {out}");
    std::fs::write(dir.join("data/mllm_robot.json"), "[{\"messages\": [}]").unwrap();
    let (ok, out) = run(&dir, &["data", "check", "train_qwen.yaml"]);
    assert!(!ok && out.contains("mllm_robot.json:1:"), "JSON error with line and column: {out}");
}
