//! Attribute extraction on free text, and the model-agnostic report writer.

use ferrotune_core::eval::attributes::{accuracy, extract, Attributes};
use ferrotune_core::eval::metrics::SampleScores;
use ferrotune_core::eval::{metrics_row, prediction_line, terminal_table, write_report, Report, ReportExample};
use serde_json::Value;

#[test]
fn extraction_reads_free_text_and_marks_the_unrecognised() {
    let a = extract("我看到一个蓝色的机器人，头是三角形的，有双臂和四条腿，没有屏幕。");
    assert_eq!(a.colour.as_deref(), Some("blue"));
    assert_eq!(a.head.as_deref(), Some("triangular"));
    assert_eq!(a.arms, Some(2));
    assert_eq!(a.locomotion.as_deref(), Some("four_legs"));
    assert_eq!(a.screen, Some(false));
    assert_eq!(a.antenna, None);

    let a = extract("A Purple robot with a dome-shaped head, three robotic arms with claws and tracks. No display.");
    assert_eq!(a.colour.as_deref(), Some("purple"));
    assert_eq!(a.head.as_deref(), Some("dome"));
    assert_eq!(a.arms, Some(3));
    assert_eq!(a.grippers, Some(true));
    assert_eq!(a.locomotion.as_deref(), Some("tracks"));
    assert_eq!(a.screen, Some(false));

    // "background" holds "round" but is not the word round; no arms means no grippers.
    let a = extract("An armless robot on two legs in front of a grey background.");
    assert_eq!(a.head, None);
    assert_eq!(a.arms, Some(0));
    assert_eq!(a.grippers, Some(false));
    assert_eq!(a.locomotion.as_deref(), Some("two_legs"));
    assert_eq!(a.colour, None, "grey is not a palette colour");

    let none = extract("这张图片很有意思。");
    assert_eq!(none, Attributes::default());
    assert_eq!(none.get_or_none("colour"), "none");
}

#[test]
fn accuracy_counts_unrecognised_as_wrong_and_skips_unlabelled() {
    let label = |c: &str, arms: u32| Attributes { colour: Some(c.into()), arms: Some(arms), ..Default::default() };
    let labels =
        vec![label("red", 2), label("blue", 0), Attributes { colour: Some("white".into()), ..Default::default() }];
    let preds = vec![extract("红色的机器人，两只机械臂"), extract("a blue robot with one arm"), extract("???")];
    let acc = accuracy(&preds, &labels);
    assert_eq!(acc.len(), 2, "only labelled keys: {acc:?}");
    assert_eq!((acc[0].key, acc[0].correct, acc[0].total), ("colour", 2, 3));
    assert_eq!((acc[1].key, acc[1].correct, acc[1].total), ("arms", 1, 2));
    assert!((acc[0].percent() - 200.0 / 3.0).abs() < 1e-9);
}

#[test]
fn report_writes_markdown_predictions_chart_and_table() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("eval");
    let img = dir.path().join("data/robots/robot_eval_0001.png");
    std::fs::create_dir_all(img.parent().unwrap()).unwrap();
    let models = vec!["base".to_string(), "saves/lora adapter".to_string()];
    let metrics = vec![
        vec![("eval_loss".to_string(), 2.5), ("bleu-4".to_string(), 3.25), ("acc_colour".to_string(), 12.5)],
        vec![("eval_loss".to_string(), 0.31), ("bleu-4".to_string(), 88.0), ("acc_colour".to_string(), 100.0)],
    ];
    let examples = vec![
        ReportExample {
            image: Some(img.clone()),
            prompt: "<image>请识别并描述图片中的机器人及其特征".into(),
            reference: "这是一个白色的服务机器人。".into(),
            answers: vec!["一个 | 竖线\n换行".into(), "这是一个白色的服务机器人。".into()],
        },
        ReportExample {
            image: None,
            prompt: "p2".into(),
            reference: "r2".into(),
            answers: vec!["a".into(), "b\"q\"".into()],
        },
    ];
    let files = write_report(
        &out,
        &Report { title: "before / after", models: &models, metrics: &metrics, examples: &examples, n_examples: 1 },
    )
    .unwrap();

    let md = std::fs::read_to_string(&files.report).unwrap();
    assert!(md.contains("| metric | base | saves/lora adapter |"), "{md}");
    assert!(md.contains("| eval_loss | 2.5000 | 0.3100 |"), "{md}");
    assert!(md.contains("| bleu-4 | 3.25 | 88.00 |"), "{md}");
    assert!(md.contains("![example 1](../data/robots/robot_eval_0001.png)"), "{md}");
    assert!(md.contains("一个 \\| 竖线<br>换行"), "cells escape pipes and newlines: {md}");
    assert!(!md.contains("r2"), "only n_examples examples are shown");
    assert!(md.contains("Prompt: &lt;image&gt;请识别并描述图片中的机器人及其特征"), "{md}");
    assert_eq!(files.charts.len(), 2, "text metrics and attribute accuracies apart");
    for chart in &files.charts {
        assert!(image::open(chart).is_ok());
    }
    assert!(md.contains("![metrics](metrics.png)") && md.contains("![attributes](attributes.png)"), "{md}");

    assert_eq!(files.predictions.len(), 2);
    assert!(files.predictions[1].ends_with("generated_predictions_saves_lora_adapter.jsonl"));
    let text = std::fs::read_to_string(&files.predictions[1]).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "every example, not only the shown ones");
    assert_eq!(
        lines[0],
        r#"{"prompt": "<image>请识别并描述图片中的机器人及其特征", "predict": "这是一个白色的服务机器人。", "label": "这是一个白色的服务机器人。"}"#
    );
    let v: Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(v["predict"], "b\"q\"");

    let table = &files.table;
    assert_eq!(table, &terminal_table(&models, &metrics));
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 2 + 3, "header, rule, one row per metric:\n{table}");
    assert!(rows[2].starts_with("eval_loss") && rows[2].ends_with("0.3100"), "{table}");
    // Right-aligned columns: every row ends at the same column.
    let width = rows[0].chars().count();
    assert!(rows.iter().all(|r| r.chars().count() == width), "{table}");
}

#[test]
fn prediction_lines_match_python_json_dumps() {
    // json.dumps({"prompt": p, "predict": q, "label": l}, ensure_ascii=False)
    assert_eq!(
        prediction_line("a\nb\t\u{1}", "中文", "\\"),
        "{\"prompt\": \"a\\nb\\t\\u0001\", \"predict\": \"中文\", \"label\": \"\\\\\"}"
    );
}

#[test]
fn metrics_rows_use_llamafactory_names() {
    let text = SampleScores { bleu4: 1.0, rouge1: 2.0, rouge2: 3.0, rouge_l: 4.0 };
    let labels = vec![Attributes { colour: Some("red".into()), ..Default::default() }];
    let acc = accuracy(&[extract("红色")], &labels);
    let row = metrics_row(Some(0.0), Some(&text), &acc);
    let names: Vec<&str> = row.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["eval_loss", "eval_perplexity", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "acc_colour"]);
    assert_eq!(row[1].1, 1.0);
    assert_eq!(row[6].1, 100.0);
}
