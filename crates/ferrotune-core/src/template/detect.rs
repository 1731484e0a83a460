//! Picking the template from the checkpoint, and saying when the user's choice differs from it.
//!
//! LLaMA-Factory reverse-engineers slots from the tokenizer's jinja when `template` is absent; the Qwen family
//! is known, so here the exact match follows from `model_type` and whether the checkpoint's chat template
//! renders think blocks (Qwen3.5, Qwen3-VL-Thinking and Qwen3 do; Qwen3-VL-Instruct and Qwen3-2507-Instruct
//! do not). Qwen3.5 maps to `qwen3_5`, as LLaMA-Factory's model registry does.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{by_name, Template, TEMPLATES};

/// What the checkpoint says about its chat format.
#[derive(Clone, Debug)]
pub struct CheckpointInfo {
    pub dir: PathBuf,
    pub model_type: String,
    /// The checkpoint has a vision tower (`vision_config` in config.json).
    pub has_vision: bool,
    /// The jinja chat template (chat_template.jinja, chat_template.json or tokenizer_config.json).
    pub chat_template: Option<String>,
}

impl CheckpointInfo {
    /// Reads config.json and the chat template of a checkpoint folder.
    pub fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("{}: cannot read the checkpoint's config", config_path.display()))?;
        let config: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}:{}:{}: invalid JSON: {e}", config_path.display(), e.line(), e.column()))?;
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .with_context(|| format!("{}: no `model_type`", config_path.display()))?
            .to_string();
        let has_vision = config.get("vision_config").is_some_and(|v| !v.is_null());
        Ok(Self { dir: dir.to_path_buf(), model_type, has_vision, chat_template: read_chat_template(dir) })
    }

    fn renders_thinking(&self) -> bool {
        self.chat_template.as_deref().is_some_and(|t| t.contains("<think>"))
    }

    /// The template that renders exactly like this checkpoint's own chat template, with the reason.
    pub fn exact_template(&self) -> Option<(&'static str, String)> {
        let think = self.renders_thinking();
        let how =
            if think { "its chat template renders think blocks" } else { "its chat template has no think blocks" };
        let name = match self.model_type.as_str() {
            "qwen3_5" | "qwen3_5_moe" => {
                if think {
                    "qwen3_5"
                } else {
                    "qwen3_5_nothink"
                }
            }
            "qwen3_vl" | "qwen3_vl_moe" => {
                if think {
                    "qwen3_vl"
                } else {
                    "qwen3_vl_nothink"
                }
            }
            "qwen2_vl" | "qwen2_5_vl" => return Some(("qwen2_vl", format!("model_type {}", self.model_type))),
            "qwen3" | "qwen3_moe" => {
                if think {
                    "qwen3"
                } else {
                    "qwen3_nothink"
                }
            }
            "qwen2" | "qwen2_moe" => return Some(("qwen", format!("model_type {}", self.model_type))),
            _ => return None,
        };
        Some((name, format!("model_type {}, {how}", self.model_type)))
    }
}

fn read_chat_template(dir: &Path) -> Option<String> {
    if let Ok(t) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Some(t);
    }
    let from_json = |file: &str| -> Option<String> {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(file)).ok()?).ok()?;
        match v.get("chat_template")? {
            Value::String(s) => Some(s.clone()),
            // A list of named templates: take "default".
            Value::Array(items) => items
                .iter()
                .find(|i| i.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|i| i.get("template")?.as_str().map(String::from)),
            _ => None,
        }
    };
    from_json("chat_template.json").or_else(|| from_json("tokenizer_config.json"))
}

/// The template to use, and the one line to print about the choice.
#[derive(Debug)]
pub struct Choice {
    pub template: &'static Template,
    /// Picked from the checkpoint (no `template` key).
    pub auto: bool,
    /// "template X chosen because ..." or "template X is a poor match: ...".
    pub note: Option<String>,
}

/// Resolves `requested` (the `template` key) against the checkpoint: the exact match when absent, the named
/// template otherwise, with a one-line note when the named one differs from the checkpoint's own format.
pub fn choose(requested: Option<&str>, info: &CheckpointInfo) -> Result<Choice> {
    let exact = info.exact_template();
    let Some(name) = requested else {
        let Some((name, why)) = exact else {
            let names: Vec<&str> = TEMPLATES.iter().map(|t| t.name).collect();
            bail!(
                "{}: cannot pick a template for model_type `{}`; set `template:` to one of {}",
                info.dir.display(),
                info.model_type,
                names.join(", ")
            );
        };
        let template = by_name(name)?;
        let mut note = format!("template: `{name}` (picked from the checkpoint: {why})");
        if template.reasoning {
            let plain = format!("{name}_nothink");
            note.push_str(&format!(
                "; answers are trained after an empty think block, set `template: {plain}` to train without it"
            ));
        }
        return Ok(Choice { template, auto: true, note: Some(note) });
    };
    let template = by_name(name)?;
    let note = match exact {
        Some((exact_name, _)) if exact_name != name => {
            let exact_t = by_name(exact_name)?;
            Some(describe_difference(template, exact_t, info))
        }
        None => Some(format!(
            "template `{name}` is used as given; ferrotune does not know model_type `{}` to check it",
            info.model_type
        )),
        _ => None,
    };
    Ok(Choice { template, auto: false, note })
}

/// One line on how `chosen` renders differently from the checkpoint's exact template.
fn describe_difference(chosen: &Template, exact: &Template, info: &CheckpointInfo) -> String {
    let mut diffs = Vec::new();
    if chosen.default_system != exact.default_system {
        diffs.push(if chosen.default_system.is_empty() {
            format!("has no default system prompt (the checkpoint's is {:?})", exact.default_system)
        } else {
            format!("adds the system prompt {:?} to every sample without one", chosen.default_system)
        });
    }
    match (chosen.reasoning, exact.reasoning) {
        (false, true) => diffs.push(
            "renders no think block, while the checkpoint's chat template puts `<think>\\n\\n</think>\\n\\n` \
             before answers"
                .to_string(),
        ),
        (true, false) => diffs.push(
            "trains an empty think block before each answer, which the checkpoint's chat template does not render"
                .to_string(),
        ),
        _ => {}
    }
    if info.has_vision && !chosen.vision {
        diffs.push(
            "is a text template (LLaMA-Factory refuses images with it; ferrotune expands them from the checkpoint's \
             image processor)"
                .to_string(),
        );
    }
    if diffs.is_empty() {
        diffs.push("renders the same text under another name".to_string());
    }
    // The thinking / non-thinking sibling is a deliberate choice, not a mistake: say "differs", not "poor match".
    let sibling = chosen.name.trim_end_matches("_nothink") == exact.name.trim_end_matches("_nothink");
    let mut line = format!(
        "template `{}` {} this {} checkpoint: it {}; the exact match is `{}`",
        chosen.name,
        if sibling { "differs from the chat template of" } else { "is a poor match for" },
        info.model_type,
        diffs.join("; "),
        exact.name
    );
    if sibling {
        line.push_str(" (serve and export with the same template)");
    } else if exact.reasoning {
        line.push_str(&format!(" (or `{}_nothink` to train answers without the think block)", exact.name));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(model_type: &str, think: bool, vision: bool) -> CheckpointInfo {
        CheckpointInfo {
            dir: PathBuf::from("ckpt"),
            model_type: model_type.into(),
            has_vision: vision,
            chat_template: Some(if think { "...<think>\n..." } else { "..." }.into()),
        }
    }

    #[test]
    fn auto_pick() {
        let c = choose(None, &info("qwen3_5", true, true)).unwrap();
        assert_eq!(c.template.name, "qwen3_5");
        assert!(c.auto && c.note.unwrap().contains("picked from the checkpoint"));
        assert_eq!(choose(None, &info("qwen3_vl", false, true)).unwrap().template.name, "qwen3_vl_nothink");
        assert_eq!(choose(None, &info("qwen2_5_vl", false, true)).unwrap().template.name, "qwen2_vl");
        assert!(choose(None, &info("llama", false, false)).is_err());
    }

    #[test]
    fn poor_match_is_one_line() {
        let c = choose(Some("qwen"), &info("qwen3_5", true, true)).unwrap();
        let note = c.note.unwrap();
        assert!(!note.contains('\n'));
        assert!(note.contains("You are Qwen") && note.contains("think") && note.contains("`qwen3_5`"), "{note}");
        assert!(choose(Some("qwen3_5"), &info("qwen3_5", true, true)).unwrap().note.is_none());
    }
}
