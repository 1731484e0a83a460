//! The data stage's errors and reports: every problem names its place (file:line:column, dataset row) and the fix.

use std::path::{Path, PathBuf};

use ferrotune_core::config::Plan;
use ferrotune_core::data::{prepare, IssueKind, Prepared};
use ferrotune_core::image::{preresize, ImageProcessorConfig};
use serde_json::{json, Value};

use crate::common::{fixtures, golden, plan, scratch, tiny};

/// A dataset folder with one entry `d` (sharegpt, role/content tags, images) holding `rows`, and the images.
fn dataset(name: &str, rows: &Value) -> PathBuf {
    let dir = scratch(name);
    let info = json!({"d": {"file_name": "d.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}});
    std::fs::write(dir.join("dataset_info.json"), info.to_string()).unwrap();
    std::fs::write(dir.join("d.json"), serde_json::to_string_pretty(rows).unwrap()).unwrap();
    for img in ["robot_64x48.png", "robot_300x200.png"] {
        std::fs::copy(fixtures().join("data/images").join(img), dir.join(img)).unwrap();
    }
    dir
}

fn conv(user: &str, images: Value) -> Value {
    json!({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "A robot."}], "images": images})
}

fn run(dir: &Path, extra: &[(&str, Value)]) -> anyhow::Result<Prepared> {
    let mut pairs = vec![("dataset", json!("d")), ("dataset_dir", json!(dir.display().to_string()))];
    pairs.extend(extra.iter().cloned());
    prepare(&plan(&pairs), &|_, _| {})
}

fn only_issue(p: &Prepared) -> &ferrotune_core::data::RowIssue {
    assert_eq!(p.report.issues.len(), 1, "{}", p.report);
    &p.report.issues[0]
}

#[test]
fn bad_json_has_line_and_column() {
    let dir = scratch("bad-json");
    std::fs::write(dir.join("dataset_info.json"), r#"{"d": {"file_name": "d.json", "formatting": "sharegpt"}}"#)
        .unwrap();
    std::fs::write(dir.join("d.json"), "[\n  {\"conversations\": []},\n  {\"conversations\": [}\n]\n").unwrap();
    let err = format!("{:#}", run(&dir, &[]).err().unwrap());
    assert!(err.contains("d.json:3:22"), "{err}");
    assert!(err.contains("hint:"), "{err}");
    // dataset_info.json itself, with a trailing comma.
    std::fs::write(dir.join("dataset_info.json"), "{\"d\": {\"file_name\": \"d.json\",}\n}").unwrap();
    let err = format!("{:#}", run(&dir, &[]).err().unwrap());
    assert!(err.contains("dataset_info.json:1:30") && err.contains("trailing comma"), "{err}");
}

#[test]
fn unknown_dataset_suggests_a_name() {
    let pairs = [("dataset", json!("mllm_rcc"))];
    let err = format!("{:#}", prepare(&plan(&pairs), &|_, _| {}).err().unwrap());
    assert!(err.contains("`mllm_rcc` is not defined") && err.contains("did you mean `mllm_rc`?"), "{err}");
}

#[test]
fn a_file_path_is_accepted_as_dataset() {
    let path = fixtures().join("data/sharegpt_fv.json");
    let p = prepare(
        &plan(&[("dataset", json!(path.display().to_string())), ("template", json!("qwen3_5_nothink"))]),
        &|_, _| {},
    )
    .unwrap();
    assert_eq!(p.report.train_samples, 4, "{}", p.report);
}

#[test]
fn hub_datasets_are_a_clear_error() {
    let dir = scratch("hub");
    std::fs::write(dir.join("dataset_info.json"), r#"{"d": {"hf_hub_url": "org/robots"}}"#).unwrap();
    let err = format!("{:#}", run(&dir, &[]).err().unwrap());
    assert!(err.contains("hub") && err.contains("huggingface-cli download --repo-type dataset org/robots"), "{err}");
}

#[test]
fn image_count_mismatch_names_the_row() {
    let rows = json!([
        conv("<image>ok", json!(["robot_64x48.png"])),
        conv("<image> twice", json!(["robot_64x48.png", "robot_300x200.png"]))
    ]);
    let p = run(&dataset("mismatch", &rows), &[]).unwrap();
    let issue = only_issue(&p);
    assert_eq!((issue.at.row, issue.kind.clone()), (1, IssueKind::BadRow));
    assert!(issue.reason.contains("2 images but 1 `<image>` placeholder"), "{}", issue.reason);
    let text = p.report.to_string();
    assert!(text.contains("d.json row 1 (line"), "{text}");
    assert_eq!(p.report.errors(false), 1);
}

#[test]
fn missing_image_is_named() {
    let rows = json!([conv("<image>where", json!(["robot_404.png"]))]);
    let dir = dataset("missing", &rows);
    let p = run(&dir, &[]).unwrap();
    let issue = only_issue(&p);
    assert_eq!(issue.kind, IssueKind::Image { path: PathBuf::from("robot_404.png") });
    assert!(
        issue.reason.contains("not found") && issue.reason.contains(&dir.join("robot_404.png").display().to_string())
    );
    assert!(p.report.to_string().contains("images missing or unreadable (1)"));
}

#[test]
fn string_images_is_a_row_error() {
    let rows = json!([conv("<image>x", json!(["robot_64x48.png"])), conv("x", json!("robot_64x48.png"))]);
    let p = run(&dataset("string-images", &rows), &[]).unwrap();
    let issue = only_issue(&p);
    assert_eq!(issue.at.row, 1);
    assert!(issue.reason.contains("`images` is a string; it must be a list"), "{}", issue.reason);
}

#[test]
fn cutoff_inside_an_image_drops_the_row() {
    let rows = json!([
        conv("<image>What is it?", json!(["robot_300x200.png"])),
        json!({"messages": [
        {"role": "user", "content": "text only"}, {"role": "assistant", "content": "fine"}]})
    ]);
    let p = run(&dataset("cutoff", &rows), &[("cutoff_len", json!(40))]).unwrap();
    let issue = only_issue(&p);
    let IssueKind::ImageOverCutoff { needed } = issue.kind else { panic!("{issue:?}") };
    assert!(needed > 54, "the 300x200 image alone is 54 tokens");
    assert!(issue.reason.contains(&format!("needs {needed} tokens")) && issue.reason.contains("cutoff_len is 40"));
    // Dropped by default, an error with --strict.
    assert_eq!((p.report.errors(false), p.report.errors(true), p.report.train_samples), (0, 1, 1));
}

#[test]
fn unknown_template_lists_valid_names() {
    let err =
        format!("{:#}", Plan::from_raw(&crate::common::raw_config(&[("template", json!("qwen3.5"))])).unwrap_err());
    assert!(err.contains("unknown template `qwen3.5`") && err.contains("qwen3_5_nothink, qwen3_vl"), "{err}");
}

#[test]
fn template_is_picked_from_the_checkpoint() {
    let p = prepare(&plan(&[("dataset", json!("cot"))]), &|_, _| {}).unwrap();
    assert_eq!(p.template.template.name, "qwen3_5");
    assert!(p.template.auto);
    assert!(p.report.to_string().contains("picked from the checkpoint"));
}

#[test]
fn report_has_stats_and_steps() {
    let pairs = [
        ("dataset", json!("alpaca_text,sharegpt_fv,cot,mllm_rc,alpaca_img")),
        ("val_size", json!(0.2)),
        ("per_device_train_batch_size", json!(2)),
        ("gradient_accumulation_steps", json!(2)),
    ];
    let p = prepare(&plan(&pairs), &|_, _| {}).unwrap();
    let r = &p.report;
    // 15 rows, ceil(0.2 x 15) = 3 held out.
    assert_eq!((r.train_samples, r.eval_samples, r.errors(true)), (12, 3, 0));
    assert_eq!(r.image_tokens.max, 54 + 64 + 4); // 300x200 → 54 and 500x120 → 64 pads, plus two start/end pairs
    let steps = r.steps.as_ref().unwrap();
    assert_eq!((steps.steps_per_epoch, steps.total_steps), (3, 9));
    let text = r.to_string();
    assert!(text.contains("p95") && text.contains("9 optimizer steps"), "{text}");
}

#[test]
fn image_tokens_equal_llamafactory_and_hf_processor() {
    let processor = ImageProcessorConfig::from_dir(&tiny()).unwrap();
    for c in golden("image_tokens.json").as_array().unwrap() {
        let n = |k: &str| c[k].as_u64().unwrap();
        let (w, h) = preresize(n("width") as u32, n("height") as u32, n("image_max_pixels"), n("image_min_pixels"));
        assert_eq!(json!([w, h]), c["preresized"], "{c}");
        assert_eq!(processor.num_image_tokens(h as usize, w as usize).unwrap() as u64, n("tokens"), "{c}");
    }
}

#[test]
fn folder_datasets_max_samples_and_media_dir() {
    // A folder of JSON-lines files, images in a separate media_dir, and the first 3 rows only.
    let dir = scratch("folder");
    let media = scratch("folder-media");
    std::fs::copy(fixtures().join("data/images/robot_64x48.png"), media.join("r.png")).unwrap();
    std::fs::create_dir_all(dir.join("parts")).unwrap();
    let line = |q: &str| conv(&format!("<image>{q}"), json!(["r.png"])).to_string();
    std::fs::write(dir.join("parts/a.jsonl"), format!("{}\n{}\n", line("one"), line("two"))).unwrap();
    std::fs::write(dir.join("parts/b.jsonl"), format!("{}\n{}\n", line("three"), line("four"))).unwrap();
    let info = json!({"d": {"file_name": "parts", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"}}});
    std::fs::write(dir.join("dataset_info.json"), info.to_string()).unwrap();
    let p = run(&dir, &[("media_dir", json!(media.display().to_string())), ("max_samples", json!(3))]).unwrap();
    assert_eq!((p.report.train_samples, p.report.errors(true)), (3, 0), "{}", p.report);
    assert_eq!(p.train[2].source.file, dir.join("parts/b.jsonl"));
    assert_eq!(p.train[2].images, vec![media.join("r.png")]);
    assert_eq!((p.train[2].image_sizes.clone(), p.train[2].image_tokens.clone()), (vec![(64, 48)], vec![4]));
}

#[test]
fn openai_formatting_merges_tool_results() {
    let dir = scratch("openai");
    let rows = json!([{"messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Battery and temperature?"},
        {"role": "assistant", "content": "Checking."},
        {"role": "tool", "content": "{\"battery\": 87}"},
        {"role": "tool", "content": "{\"temp\": 31}"},
        {"role": "assistant", "content": "87 percent, 31 degrees."}]}]);
    std::fs::write(dir.join("d.json"), rows.to_string()).unwrap();
    let info = json!({"d": {"file_name": "d.json", "formatting": "openai", "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "observation_tag": "tool", "system_tag": "system"}}});
    std::fs::write(dir.join("dataset_info.json"), info.to_string()).unwrap();
    let p = run(&dir, &[("template", json!("qwen3_5_nothink"))]).unwrap();
    assert_eq!(p.report.train_samples, 1, "{}", p.report);
    let tok = ferrotune_core::tokenizer::Tokenizer::from_path(&tiny()).unwrap();
    let text = tok.decode(&p.train[0].input_ids, false).unwrap();
    // One observation turn holding both results; the system prompt is the row's own (no injected text).
    assert!(
        text.contains(
            "<tool_response>\n{\"battery\": 87}\n</tool_response>\n<tool_response>\n{\"temp\": 31}\n</tool_response>"
        ),
        "{text}"
    );
    assert!(text.starts_with("<|im_start|>system\nUse tools.<|im_end|>"), "{text}");
}

/// `val_size` holds out the rows datasets' `train_test_split` does: numpy's `default_rng(seed).permutation(n)`
/// (tests/fixtures/golden/recipes/numpy_permutation.json, written by numpy itself).
#[test]
fn held_out_rows_follow_numpys_permutation() {
    let path = crate::common::fixtures().join("golden/recipes/numpy_permutation.json");
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for c in cases {
        let (seed, n) = (c["seed"].as_u64().unwrap(), c["n"].as_u64().unwrap() as usize);
        let want: Vec<usize> =
            c["permutation"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(ferrotune_core::data::numpy_rng::permutation(seed, n), want, "seed {seed}, n {n}");
    }
}

/// Tool calls LLaMA-Factory stops on (invalid JSON, a call without `arguments`, text arguments for the qwen3_5
/// tool format, a `tools` column that is not JSON) are row errors that name the row and say how to write it.
#[test]
fn malformed_tool_calls_name_the_row_and_the_fix() {
    let dir = scratch("bad-tool-calls");
    let row = |call: &str, tools: &str| {
        json!({"conversations": [
            {"from": "human", "value": "Battery of R2?"},
            {"from": "function_call", "value": call},
            {"from": "observation", "value": "87"},
            {"from": "gpt", "value": "87 percent."}], "tools": tools})
    };
    let tools = r#"[{"name": "read_battery", "parameters": {"type": "object"}}]"#;
    let good = r#"{"name": "read_battery", "arguments": {"robot": "R2"}}"#;
    let text_args = r#"{"name": "read_battery", "arguments": "{\"robot\": \"R2\"}"}"#;
    let rows = json!([
        row(good, tools),
        row("read_battery(robot='R2')", tools),
        row(r#"{"name": "read_battery"}"#, tools),
        row(text_args, tools),
        row(good, "read_battery"),
    ]);
    std::fs::write(dir.join("d.json"), serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    let info = json!({"d": {"file_name": "d.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools"}}});
    std::fs::write(dir.join("dataset_info.json"), info.to_string()).unwrap();

    let p = run(&dir, &[("template", json!("qwen3_5_nothink"))]).unwrap();
    let issues: Vec<(usize, &str)> = p.report.issues.iter().map(|i| (i.at.row, i.reason.as_str())).collect();
    assert_eq!(issues.iter().map(|i| i.0).collect::<Vec<_>>(), [1, 2, 3, 4], "{}", p.report);
    assert!(p.report.issues.iter().all(|i| i.kind == IssueKind::BadRow));
    let fix = r#"{"name": "tool_name", "arguments": {...}}"#;
    assert!(issues[0].1.contains("is not valid JSON") && issues[0].1.contains(fix), "{}", issues[0].1);
    assert!(issues[1].1.contains("not an object with `name` and `arguments`") && issues[1].1.contains(fix));
    assert!(
        issues[2].1.contains("`arguments` must be a JSON object") && issues[2].1.contains("not its JSON text"),
        "{}",
        issues[2].1
    );
    assert!(issues[3].1.contains("`tools` is not valid JSON") && issues[3].1.contains("list of tool definitions"));
    let text = p.report.to_string();
    assert!(text.contains("d.json row 1 (line") && text.contains("answer 1 (a function_call turn)"), "{text}");

    // The qwen tool format writes text arguments as a JSON string, as LLaMA-Factory does.
    let p = run(&dir, &[("template", json!("qwen3_vl_nothink"))]).unwrap();
    let rows: Vec<usize> = p.report.issues.iter().map(|i| i.at.row).collect();
    assert_eq!(rows, [1, 2, 4], "{}", p.report);
}
