//! The checkpoint's own chat template (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`),
//! rendered with minijinja exactly as transformers' `apply_chat_template` renders it, and the processor's
//! expansion of each `<|image_pad|>` into one token per merged image patch.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use minijinja::{Environment, ErrorKind, Value};

/// Options of one rendering.
#[derive(Clone, Debug, Default)]
pub struct RenderOptions {
    pub add_generation_prompt: bool,
    /// `None` leaves `enable_thinking` undefined, so the template's default applies.
    pub enable_thinking: Option<bool>,
    /// Extra template variables (e.g. `tools`, `add_vision_id`), as given per request.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: String,
    pub path: PathBuf,
}

impl ChatTemplate {
    /// Finds the template of a checkpoint (or tokenizer) directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let source =
                std::fs::read_to_string(&jinja).with_context(|| format!("{}: cannot read", jinja.display()))?;
            return Self::new(source, jinja);
        }
        let tc = dir.join("tokenizer_config.json");
        if tc.exists() {
            let text = std::fs::read_to_string(&tc).with_context(|| format!("{}: cannot read", tc.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}:{}:{}: invalid JSON: {e}", tc.display(), e.line(), e.column()))?;
            match json.get("chat_template") {
                Some(serde_json::Value::String(s)) => return Self::new(s.clone(), tc),
                // A list of named templates: the "default" one is the chat template.
                Some(serde_json::Value::Array(list)) => {
                    if let Some(t) = list
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                    {
                        return Self::new(t.to_string(), tc);
                    }
                }
                _ => {}
            }
        }
        bail!(
            "{}: no chat template (neither chat_template.jinja nor \"chat_template\" in tokenizer_config.json); \
             copy them from the original model, or pass `template:` to use a built-in one",
            dir.display()
        )
    }

    /// Compiles a template source; `path` is only used in error messages.
    pub fn new(source: String, path: PathBuf) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Hugging Face templates call `raise_exception(msg)` on invalid conversations.
        env.add_function("raise_exception", |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        // transformers' `tojson` is Python's json.dumps(ensure_ascii=False), not minijinja's HTML-safe one.
        env.add_filter("tojson", |v: Value, indent: Option<usize>| -> Result<String, minijinja::Error> {
            let json: serde_json::Value = serde_json::to_value(&v)
                .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
            Ok(python_json(&json, indent, 0))
        });
        // Whitespace control as transformers configures Jinja.
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        env.set_syntax(syntax.map_err(|e| anyhow::anyhow!("jinja syntax config: {e}"))?);
        env.add_template_owned("chat", source.clone())
            .map_err(|e| anyhow::anyhow!("{}: the chat template does not compile: {e:#}", path.display()))?;
        Ok(Self { env, source, path })
    }

    /// Renders `messages` (OpenAI/transformers shape: role + content string or parts).
    pub fn render(&self, messages: &serde_json::Value, opts: &RenderOptions) -> Result<String> {
        let tmpl = self.env.get_template("chat").context("chat template")?;
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("add_generation_prompt".into(), opts.add_generation_prompt.into());
        if let Some(t) = opts.enable_thinking {
            ctx.insert("enable_thinking".into(), t.into());
        }
        for (k, v) in &opts.extra {
            ctx.insert(k.clone(), v.clone());
        }
        let text = tmpl
            .render(Value::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| anyhow::anyhow!("rendering the chat template ({}): {e}", self.path.display()))?;
        if text.is_empty() {
            bail!(
                "{}: the chat template rendered nothing for these {} message(s), so there is no prompt to give the \
                 model\n  hint: the template must write the conversation (e.g. `{{%- for message in messages %}}...`); \
                 copy chat_template.jinja from the base model's checkpoint, or fix the template",
                self.path.display(),
                messages.as_array().map_or(0, Vec::len)
            );
        }
        Ok(text)
    }
}

/// Replaces the i-th `pad` occurrence in `text` by `counts[i]` copies of it (the processor's expansion of
/// `<|image_pad|>` to the number of merged patches of image i).
pub fn expand_pads(text: &str, pad: &str, counts: &[usize]) -> Result<String> {
    let found = text.matches(pad).count();
    if found != counts.len() {
        bail!("the prompt has {found} {pad} placeholders but {} images were given", counts.len());
    }
    let mut out = String::with_capacity(text.len() + counts.iter().sum::<usize>() * pad.len());
    let mut rest = text;
    for &n in counts {
        let i = rest.find(pad).expect("counted above");
        out.push_str(&rest[..i]);
        for _ in 0..n {
            out.push_str(pad);
        }
        rest = &rest[i + pad.len()..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)` as Python formats it (", " and ": " separators).
pub fn python_json(v: &serde_json::Value, indent: Option<usize>, level: usize) -> String {
    use serde_json::Value as J;
    let (nl, pad, pad_in) = match indent {
        Some(n) => ("\n".to_string(), " ".repeat(n * level), " ".repeat(n * (level + 1))),
        None => (String::new(), String::new(), String::new()),
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(a) if a.is_empty() => "[]".into(),
        J::Object(o) if o.is_empty() => "{}".into(),
        J::Array(a) => {
            let items: Vec<String> =
                a.iter().map(|x| format!("{pad_in}{}", python_json(x, indent, level + 1))).collect();
            format!("[{nl}{}{nl}{pad}]", items.join(&format!("{sep}{nl}")))
        }
        J::Object(o) => {
            let items: Vec<String> = o
                .iter()
                .map(|(k, x)| {
                    format!("{pad_in}{}: {}", serde_json::Value::String(k.clone()), python_json(x, indent, level + 1))
                })
                .collect();
            format!("{{{nl}{}{nl}{pad}}}", items.join(&format!("{sep}{nl}")))
        }
        J::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(0.0);
            // Python prints integral floats with a trailing ".0".
            if f.fract() == 0.0 && f.abs() < 1e16 {
                format!("{f:.1}")
            } else {
                format!("{f}")
            }
        }
        other => other.to_string(),
    }
}
