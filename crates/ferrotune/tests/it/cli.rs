//! The built binary as scripts run it: `chat --prompt` prints just the answer, YAML configs work like flags,
//! `export` takes LLaMA-Factory's merge_lora YAML, a small model computes on one thread.

use std::path::PathBuf;
use std::process::Command;

use candle_core::{DType, Device};
use ferrotune_core::chat_template::RenderOptions;
use ferrotune_core::infer::{AdapterMode, Engine, GenerateRequest, SamplingParams};

pub(crate) fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub(crate) fn tiny() -> PathBuf {
    fixtures().join("tiny-qwen3_5")
}

pub(crate) fn adapter() -> PathBuf {
    fixtures().join("golden/peft/adapter")
}

fn ferrotune(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(args).output().expect("run ferrotune")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// What the engine answers in-process, greedy, thinking off, with the checkpoint's chat template or a built-in one.
fn expected_answer(question: &str, image: &str, max_tokens: usize, template: Option<&str>) -> String {
    let mut e = Engine::load(&tiny(), &[adapter().as_path()], AdapterMode::Merge, DType::F32, &Device::Cpu).unwrap();
    if let Some(name) = template {
        let t = ferrotune_core::template::by_name(name).unwrap();
        let source = ferrotune_core::template::to_jinja(t, &Default::default());
        e.template = ferrotune_core::chat_template::ChatTemplate::new(source, name.into()).unwrap();
    }
    let messages =
        serde_json::json!([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]);
    let opts = RenderOptions { add_generation_prompt: true, enable_thinking: Some(false), ..Default::default() };
    let img = ferrotune_core::image::load_image(&fixtures().join("golden/model").join(image)).unwrap();
    let p = e.prompt(&messages, &[img], &opts).unwrap();
    let req = GenerateRequest { sampling: SamplingParams::default(), max_tokens, stop: vec![] };
    e.generate(&p, &req, |_| true).unwrap().text
}

#[test]
fn chat_one_shot_prints_just_the_answer() {
    let img = fixtures().join("golden/model/img_a.png");
    let out = ferrotune(&[
        "chat",
        "--model_name_or_path",
        tiny().to_str().unwrap(),
        "--adapter_name_or_path",
        adapter().to_str().unwrap(),
        "--prompt",
        "Describe the robot.",
        "--image",
        img.to_str().unwrap(),
        "--temperature",
        "0",
        "--max_new_tokens",
        "12",
        "--enable_thinking=false",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let want = expected_answer("Describe the robot.", "img_a.png", 12, None);
    assert!(!want.is_empty());
    assert_eq!(text(&out.stdout), format!("{want}\n"), "stdout holds the answer and nothing else");

    // A YAML file (LLaMA-Factory keys) plus key=value, with a typed flag overriding the file; the named template
    // renders the prompt (this adapter folder carries none of its own).
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("infer.yaml");
    std::fs::write(
        &yaml,
        format!(
            "model_name_or_path: {}\nadapter_name_or_path: {}\ntemplate: qwen3_5_nothink\ninfer_backend: huggingface\n\
             trust_remote_code: true\ntemperature: 0.9\nmax_new_tokens: 3\n",
            tiny().display(),
            adapter().display()
        ),
    )
    .unwrap();
    let out = ferrotune(&[
        "chat",
        yaml.to_str().unwrap(),
        "max_new_tokens=12",
        "--temperature",
        "0",
        "--prompt",
        "Describe the robot.",
        "--image",
        img.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let want = expected_answer("Describe the robot.", "img_a.png", 12, Some("qwen3_5_nothink"));
    assert_eq!(text(&out.stdout), format!("{want}\n"), "YAML + key=value + flags");
    assert!(text(&out.stderr).contains("built-in template `qwen3_5_nothink`"), "{}", text(&out.stderr));

    // A misspelt key is an error that suggests the right one.
    std::fs::write(&yaml, format!("model_name_or_pth: {}\n", tiny().display())).unwrap();
    let out = ferrotune(&["chat", yaml.to_str().unwrap(), "--prompt", "x"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("model_name_or_pth") && err.contains("did you mean `model_name_or_path`"), "{err}");

    // A missing image is named.
    let out =
        ferrotune(&["chat", "--model_name_or_path", tiny().to_str().unwrap(), "--prompt", "x", "--image", "/nope.png"]);
    assert!(!out.status.success() && text(&out.stderr).contains("/nope.png"), "{}", text(&out.stderr));
}

/// A model as small as the test checkpoint computes each sample on one CPU thread (samples side by side on the
/// cores), and says so, unless RAYON_NUM_THREADS chooses.
#[test]
fn small_models_compute_on_one_thread_unless_told() {
    let model = tiny();
    let args = ["chat", "--model_name_or_path", model.to_str().unwrap(), "--prompt", "x", "--max_new_tokens", "1"];
    let run = |threads: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
        c.args(args).env_remove("RAYON_NUM_THREADS");
        if let Some(t) = threads {
            c.env("RAYON_NUM_THREADS", t);
        }
        let out = c.output().expect("run ferrotune");
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stderr)
    };
    let auto = run(None);
    assert!(auto.contains("small model (hidden size 64): one CPU thread per sample"), "{auto}");
    let two = run(Some("2"));
    assert!(two.contains("loaded ") && !two.contains("CPU thread"), "{two}");
}

#[test]
fn export_takes_a_merge_lora_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("merged");
    let yaml = dir.path().join("merge.yaml");
    // As LLaMA-Factory's examples/merge_lora/*.yaml, with a tiny shard size.
    std::fs::write(
        &yaml,
        format!(
            "### model\nmodel_name_or_path: {}\nadapter_name_or_path: {}\ntemplate: qwen3_5\ntrust_remote_code: true\n\n\
             ### export\nexport_dir: {}\nexport_size: 0.0005\nexport_device: cpu\nexport_legacy_format: false\n",
            tiny().display(),
            adapter().display(),
            out_dir.display()
        ),
    )
    .unwrap();
    let out = ferrotune(&["export", yaml.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out_dir.join("model.safetensors.index.json").is_file());
    let shards = std::fs::read_dir(&out_dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("model-0000"))
        .count();
    assert!(shards >= 3, "{shards} shards of at most 0.5 MB for a 1.3 MB checkpoint");
    // The export loads and answers.
    let img = fixtures().join("golden/model/img_a.png");
    let out = ferrotune(&[
        "chat",
        "--model_name_or_path",
        out_dir.to_str().unwrap(),
        "--prompt",
        "Describe the robot.",
        "--image",
        img.to_str().unwrap(),
        "--temperature=0",
        "--max_new_tokens=6",
        "--enable_thinking=false",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).ends_with('\n'));
    // Running it again refuses to overwrite.
    let again = ferrotune(&["export", yaml.to_str().unwrap()]);
    assert!(!again.status.success() && text(&again.stderr).contains("--overwrite"), "{}", text(&again.stderr));
}
