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
        // Jinja's `string` is Python's str(): True / None / 1e-05, where minijinja writes true / none / 0.00001
        // (Qwen3.5's template writes non-mapping tool-call arguments this way).
        env.add_filter("string", |v: Value| -> Result<Value, minijinja::Error> {
            if v.is_undefined() {
                return Ok(Value::from(""));
            }
            if v.as_str().is_some() {
                return Ok(v);
            }
            let json: serde_json::Value = serde_json::to_value(&v)
                .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
            Ok(Value::from(python_str(&json)))
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
        J::Number(n) if n.is_f64() => python_float(n.as_f64().unwrap_or(0.0)),
        other => other.to_string(),
    }
}

/// Python's `repr(float)`: the shortest digits that read back, in positional notation for decimal exponents
/// -4..16 (with ".0" when integral), else as `1e-05` / `1.5e+16`.
pub fn python_float(f: f64) -> String {
    if !f.is_finite() {
        return if f.is_nan() {
            "nan".into()
        } else if f > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let fixed = format!("{f}");
        if fixed.contains('.') {
            fixed
        } else {
            format!("{fixed}.0")
        }
    } else {
        format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// Python's `str(value)` of a JSON value: a string as itself, anything else as Python's repr.
pub fn python_str(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => python_repr(other),
    }
}

fn python_repr(v: &serde_json::Value) -> String {
    use serde_json::Value as J;
    match v {
        J::Null => "None".into(),
        J::Bool(b) => if *b { "True" } else { "False" }.into(),
        J::Number(n) if n.is_f64() => python_float(n.as_f64().unwrap_or(0.0)),
        J::Number(n) => n.to_string(),
        J::String(s) => {
            // Single quotes unless the text has one and no double quote.
            let q = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
            let mut out = String::from(q);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == q => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push(q);
            out
        }
        J::Array(a) => format!("[{}]", a.iter().map(python_repr).collect::<Vec<_>>().join(", ")),
        J::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, x)| format!("{}: {}", python_repr(&J::String(k.clone())), python_repr(x)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_and_values_print_as_python_prints_them() {
        // Python 3's repr() of each value.
        let cases = [
            (1e22, "1e+22"),
            (1e15, "1000000000000000.0"),
            (9999999999999998.0, "9999999999999998.0"),
            (1e16, "1e+16"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (123.456, "123.456"),
            (-1.5e-10, "-1.5e-10"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (-0.0, "-0.0"),
            (0.1 + 0.2, "0.30000000000000004"),
            (100.0, "100.0"),
        ];
        for (f, want) in cases {
            assert_eq!(python_float(f), want, "{f:e}");
        }
        let v = serde_json::json!([1, "a", "it's", null, true, {"k": 1.0}]);
        assert_eq!(python_str(&v), r#"[1, 'a', "it's", None, True, {'k': 1.0}]"#);
        assert_eq!(python_str(&serde_json::json!("plain")), "plain");
    }
}
