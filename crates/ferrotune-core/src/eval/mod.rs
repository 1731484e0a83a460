//! Evaluation pieces that do not depend on a model: LLaMA-Factory's text metrics ([`metrics`]), attribute
//! extraction and accuracy ([`attributes`]), and the side-by-side report ([`write_report`]).

pub mod attributes;
pub mod metrics;
pub mod runner;

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result};

/// One held-out example, with each model's answer in the order of [`Report::models`].
#[derive(Debug, Clone, Default)]
pub struct ReportExample {
    /// The image as the report should link it: relative to the output folder, or absolute (made relative to the
    /// output folder where both are absolute).
    pub image: Option<PathBuf>,
    pub prompt: String,
    pub reference: String,
    pub answers: Vec<String>,
}

/// What [`write_report`] writes.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    pub title: &'a str,
    pub models: &'a [String],
    /// One list of (metric name, value) per model, in the order of `models`. Metrics are shown in the order
    /// they first appear; one a model lacks is shown as `-`.
    pub metrics: &'a [Vec<(String, f64)>],
    pub examples: &'a [ReportExample],
    /// How many examples `report.md` shows (all are written to the prediction files).
    pub n_examples: usize,
}

/// One model's metrics in report order and with LLaMA-Factory's names where it has them: `eval_loss`,
/// `eval_perplexity` (exp of the loss), `bleu-4`, `rouge-1`, `rouge-2`, `rouge-l`, then `acc_<attribute>` in
/// percent for each labelled attribute.
pub fn metrics_row(
    eval_loss: Option<f64>,
    text: Option<&metrics::SampleScores>,
    attributes: &[attributes::AttributeAccuracy],
) -> Vec<(String, f64)> {
    let mut row = Vec::new();
    if let Some(loss) = eval_loss {
        row.push(("eval_loss".to_string(), loss));
        row.push(("eval_perplexity".to_string(), loss.exp()));
    }
    if let Some(t) = text {
        row.extend(t.named().iter().map(|(n, v)| (n.to_string(), *v)));
    }
    row.extend(attributes.iter().map(|a| (format!("acc_{}", a.key), a.percent())));
    row
}

/// Paths written and the terminal table.
#[derive(Debug, Clone)]
pub struct ReportFiles {
    pub report: PathBuf,
    /// `metrics.png`, and `attributes.png` when there are attribute accuracies besides other metrics.
    pub charts: Vec<PathBuf>,
    /// One `generated_predictions_<model>.jsonl` per model, in the order of `models`.
    pub predictions: Vec<PathBuf>,
    /// The metrics table aligned for a terminal.
    pub table: String,
}

/// Writes into `out_dir` (created if needed): `report.md` (metrics table, then the first `n_examples` examples
/// with the image, the reference and every model's answer side by side), bar charts of the metrics on a 0–100
/// scale (all but losses and perplexities: `metrics.png`, with the `acc_*` attribute accuracies in
/// `attributes.png` when both kinds are present, so that each chart's labels stay legible), and per model
/// `generated_predictions_<model>.jsonl` in LLaMA-Factory's format. Returns the paths and the terminal table.
pub fn write_report(out_dir: &Path, report: &Report) -> Result<ReportFiles> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let names = metric_names(report.metrics);
    let value =
        |m: usize, name: &str| report.metrics.get(m).and_then(|v| v.iter().find(|(n, _)| n == name)).map(|x| x.1);

    // Prediction files.
    let mut predictions = Vec::new();
    let mut used = Vec::<String>::new();
    for (m, model) in report.models.iter().enumerate() {
        let mut stem = file_safe(model);
        if used.contains(&stem) {
            stem = format!("{stem}_{}", m + 1);
        }
        used.push(stem.clone());
        let path = out_dir.join(format!("generated_predictions_{stem}.jsonl"));
        let mut text = String::new();
        for ex in report.examples {
            let answer = ex.answers.get(m).map(String::as_str).unwrap_or("");
            text.push_str(&prediction_line(&ex.prompt, answer, &ex.reference));
            text.push('\n');
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        predictions.push(path);
    }

    // Charts of the percentage-scale metrics.
    let charted: Vec<String> = names
        .iter()
        .filter(|n| !(n.contains("loss") || n.contains("perplexity")))
        .filter(|n| (0..report.models.len()).all(|m| value(m, n).is_none_or(|v| (0.0..=100.0).contains(&v))))
        .cloned()
        .collect();
    let (acc, other): (Vec<String>, Vec<String>) = charted.into_iter().partition(|n| n.starts_with("acc_"));
    let groups: Vec<(&str, String, Vec<String>)> = if acc.is_empty() || other.is_empty() {
        vec![("metrics.png", report.title.to_string(), [other, acc].concat())]
    } else {
        vec![
            ("metrics.png", report.title.to_string(), other),
            ("attributes.png", format!("{}: attribute accuracy (%)", report.title), acc),
        ]
    };
    let mut charts = Vec::new();
    for (file, title, names) in &groups {
        let path = out_dir.join(file);
        let values: Vec<Vec<f64>> =
            (0..report.models.len()).map(|m| names.iter().map(|n| value(m, n).unwrap_or(0.0)).collect()).collect();
        let labels: Vec<String> = names.iter().map(|n| n.strip_prefix("acc_").unwrap_or(n).to_string()).collect();
        crate::plot::bar_chart(&path, title, &labels, report.models, &values)?;
        charts.push(path);
    }

    // report.md
    let mut md = String::new();
    let _ = writeln!(md, "# {}\n", report.title);
    let _ = writeln!(md, "| metric | {} |", report.models.iter().map(|m| md_cell(m)).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(md, "|---|{}", "---:|".repeat(report.models.len()));
    for n in &names {
        let cells: Vec<String> = (0..report.models.len()).map(|m| fmt_value(n, value(m, n))).collect();
        let _ = writeln!(md, "| {} | {} |", md_cell(n), cells.join(" | "));
    }
    md.push('\n');
    for (file, _, _) in &groups {
        let _ = writeln!(md, "![{}]({file})\n", file.trim_end_matches(".png"));
    }
    let shown = report.n_examples.min(report.examples.len());
    if shown > 0 {
        let examples = &report.examples[..shown];
        // One prompt for all (the robot task) is said once; varied prompts get a column.
        let shared = examples.iter().all(|e| e.prompt == examples[0].prompt);
        let _ = writeln!(md, "## Examples ({shown} of {})\n", report.examples.len());
        if shared {
            let _ = writeln!(md, "Prompt: {}\n", md_cell(&examples[0].prompt));
        }
        let models: Vec<String> = report.models.iter().map(|m| md_cell(m)).collect();
        let prompt_col = if shared { "" } else { " prompt |" };
        let _ = writeln!(md, "| # | image |{prompt_col} reference | {} |", models.join(" | "));
        let _ = writeln!(md, "|---|---|{}---|{}", if shared { "" } else { "---|" }, "---|".repeat(report.models.len()));
        for (i, ex) in examples.iter().enumerate() {
            let image = match &ex.image {
                Some(p) => format!("![example {}]({})", i + 1, md_link(&relative_to(p, out_dir))),
                None => String::new(),
            };
            let prompt = if shared { String::new() } else { format!(" {} |", md_cell(&ex.prompt)) };
            let answers: Vec<String> = (0..report.models.len())
                .map(|m| md_cell(ex.answers.get(m).map(String::as_str).unwrap_or("")))
                .collect();
            let _ =
                writeln!(md, "| {} | {image} |{prompt} {} | {} |", i + 1, md_cell(&ex.reference), answers.join(" | "));
        }
    }
    let report_path = out_dir.join("report.md");
    std::fs::write(&report_path, &md).with_context(|| format!("writing {}", report_path.display()))?;

    Ok(ReportFiles { report: report_path, charts, predictions, table: terminal_table(report.models, report.metrics) })
}

/// The metrics as an aligned text table: one row per metric, one column per model.
pub fn terminal_table(models: &[String], metrics: &[Vec<(String, f64)>]) -> String {
    let names = metric_names(metrics);
    let mut rows: Vec<Vec<String>> =
        vec![std::iter::once("metric".to_string()).chain(models.iter().cloned()).collect()];
    for n in &names {
        let mut row = vec![n.clone()];
        for m in 0..models.len() {
            let v = metrics.get(m).and_then(|v| v.iter().find(|(k, _)| k == n)).map(|x| x.1);
            row.push(fmt_value(n, v));
        }
        rows.push(row);
    }
    let cols = models.len() + 1;
    let widths: Vec<usize> = (0..cols).map(|c| rows.iter().map(|r| display_width(&r[c])).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let pad = " ".repeat(widths[c] - display_width(cell));
            if c == 0 {
                line.push_str(cell);
                line.push_str(&pad);
            } else {
                line.push_str("  ");
                line.push_str(&pad);
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * (cols - 1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out
}

/// One line of LLaMA-Factory's `generated_predictions.jsonl`, formatted as Python's
/// `json.dumps({...}, ensure_ascii=False)` writes it.
pub fn prediction_line(prompt: &str, predict: &str, label: &str) -> String {
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    format!("{{\"prompt\": {}, \"predict\": {}, \"label\": {}}}", q(prompt), q(predict), q(label))
}

fn metric_names(metrics: &[Vec<(String, f64)>]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (n, _) in metrics.iter().flatten() {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

fn fmt_value(name: &str, v: Option<f64>) -> String {
    match v {
        None => "-".to_string(),
        Some(v) if name.contains("loss") => format!("{v:.4}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// A model name as a file-name part: letters, digits, `.`, `_` and `-` kept, anything else `_`.
fn file_safe(name: &str) -> String {
    let s: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        "model".to_string()
    } else {
        s
    }
}

/// Text safe inside a markdown table cell: tags such as `<image>` or `<think>` shown, not parsed as HTML.
fn md_cell(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace("\r\n", "<br>")
        .replace('\n', "<br>")
}

fn md_link(p: &Path) -> String {
    p.to_string_lossy().replace('\\', "/").replace(' ', "%20").replace('(', "%28").replace(')', "%29")
}

/// `path` relative to `base` when both are absolute (`../` as needed); otherwise `path` as given.
fn relative_to(path: &Path, base: &Path) -> PathBuf {
    if !(path.is_absolute() && base.is_absolute()) {
        return path.to_path_buf();
    }
    let p: Vec<Component> = path.components().collect();
    let b: Vec<Component> = base.components().collect();
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c.as_os_str());
    }
    out
}

/// Terminal columns of `s`: East Asian wide characters count two.
fn display_width(s: &str) -> usize {
    s.chars()
        .map(|c| {
            let u = c as u32;
            let wide = (0x1100..=0x115F).contains(&u)
                || (0x2E80..=0xA4CF).contains(&u)
                || (0xAC00..=0xD7A3).contains(&u)
                || (0xF900..=0xFAFF).contains(&u)
                || (0xFE30..=0xFE4F).contains(&u)
                || (0xFF00..=0xFF60).contains(&u)
                || (0xFFE0..=0xFFE6).contains(&u)
                || (0x1F300..=0x1FAFF).contains(&u)
                || (0x20000..=0x3FFFD).contains(&u);
            if wide {
                2
            } else {
                1
            }
        })
        .sum()
}
