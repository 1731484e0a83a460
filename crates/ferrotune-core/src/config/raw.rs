//! Stage one of reading a config: the keys exactly as the user typed them, from a YAML or JSON file and from
//! `key=value` / `--key value` arguments, each remembering where it came from so errors can name the place.
//!
//! Follows LLaMA-Factory's `read_args`: a `.yaml`/`.yml`/`.json` file first, then overrides that replace file
//! values. Values are YAML scalars (`1e-4` and `1.0e-4` are floats, `true` a bool, `a,b` a string).

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::keys::{self, Kind, Support};
use crate::suggest;

/// Where a setting came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    /// A config file; line and column are 1-based and point at the key.
    File { path: PathBuf, line: usize, column: usize },
    /// A command-line override, as typed.
    Arg(String),
    /// Filled in by ferrotune (e.g. by a test or a command that sets a key for the user).
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line, column } => write!(f, "{}:{line}:{column}", path.display()),
            Origin::Arg(a) => write!(f, "argument `{a}`"),
            Origin::Default => write!(f, "(set by ferrotune)"),
        }
    }
}

/// One key's value and origin.
#[derive(Clone, Debug)]
pub struct Setting {
    pub key: String,
    pub value: Value,
    pub origin: Origin,
}

/// The keys of a config, in the order they were given (a later override replaces the earlier value).
#[derive(Clone, Debug, Default)]
pub struct RawConfig {
    /// The config file, when there was one.
    pub path: Option<PathBuf>,
    settings: Vec<Setting>,
}

impl RawConfig {
    /// An empty config (all defaults), for flag-only command lines.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads a `.yaml`, `.yml` or `.json` config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read config", path.display()))?;
        let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
        Self::parse(&text, path, is_json)
    }

    /// Parses config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path, is_json: bool) -> Result<Self> {
        let map: Vec<(String, Value)> = if is_json {
            let v: Value = serde_json::from_str(text)
                .map_err(|e| anyhow::anyhow!("{}:{}:{}: invalid JSON: {e}", path.display(), e.line(), e.column()))?;
            match v {
                Value::Object(m) => m.into_iter().collect(),
                Value::Null => Vec::new(),
                _ => bail!("{}: the config must be a JSON object of `key: value` pairs", path.display()),
            }
        } else {
            parse_yaml(text, path)?
        };
        let mut settings = Vec::with_capacity(map.len());
        for (key, value) in map {
            let (line, column) = locate_key(text, &key, is_json).unwrap_or((1, 1));
            settings.push(Setting { key, value, origin: Origin::File { path: path.to_path_buf(), line, column } });
        }
        Ok(Self { path: Some(path.to_path_buf()), settings })
    }

    /// Applies command-line overrides: `key=value`, `--key value`, `--key=value`, or a bare `--flag` (true).
    pub fn apply_args<S: AsRef<str>>(&mut self, args: &[S]) -> Result<()> {
        let mut i = 0;
        while i < args.len() {
            let arg = args[i].as_ref();
            let (key, raw, typed) = if let Some(flag) = arg.strip_prefix("--") {
                if let Some((k, v)) = flag.split_once('=') {
                    (k.to_string(), Some(v.to_string()), arg.to_string())
                } else {
                    let next = args.get(i + 1).map(|s| s.as_ref());
                    match next {
                        Some(v) if !v.starts_with("--") => {
                            i += 1;
                            (flag.to_string(), Some(v.to_string()), format!("{arg} {v}"))
                        }
                        _ => (flag.to_string(), None, arg.to_string()),
                    }
                }
            } else if let Some((k, v)) = arg.split_once('=') {
                (k.to_string(), Some(v.to_string()), arg.to_string())
            } else {
                bail!(
                    "argument `{arg}`: expected `key=value` or `--key value` (a config file must come first and \
                     end in .yaml, .yml or .json)"
                );
            };
            if key.is_empty() {
                bail!("argument `{typed}`: the key is empty");
            }
            let value = match raw {
                None => Value::Bool(true),
                Some(v) => parse_scalar(&v),
            };
            self.set(&key, value, Origin::Arg(typed));
            i += 1;
        }
        Ok(())
    }

    /// Sets (or replaces) a key.
    pub fn set(&mut self, key: &str, value: Value, origin: Origin) {
        if let Some(s) = self.settings.iter_mut().find(|s| s.key == key) {
            s.value = value;
            s.origin = origin;
        } else {
            self.settings.push(Setting { key: key.to_string(), value, origin });
        }
    }

    /// The setting for `key`, if given.
    pub fn get(&self, key: &str) -> Option<&Setting> {
        self.settings.iter().find(|s| s.key == key)
    }

    pub fn settings(&self) -> &[Setting] {
        &self.settings
    }

    /// Checks every key against the key table. Unknown keys and unimplemented features are errors (all of them
    /// listed in one message); keys accepted with no effect but set to a non-default value come back as notes.
    ///
    /// With `ALLOW_EXTRA_ARGS=1` (LLaMA-Factory's switch) unknown keys become notes instead of errors.
    pub fn check_keys(&self) -> Result<Vec<String>> {
        let allow_extra = std::env::var("ALLOW_EXTRA_ARGS").is_ok_and(|v| matches!(v.as_str(), "1" | "true"));
        let mut errors = Vec::new();
        let mut notes = Vec::new();
        for s in &self.settings {
            if let Some(def) = keys::find(&s.key) {
                if let Support::Inert(why) = def.support {
                    if !same_as_default(&s.value, def.default) {
                        notes.push(format!("`{}` ({}) has no effect: {why}", s.key, s.origin));
                    }
                }
                continue;
            }
            if let Some((feature, default)) = keys::find_unimplemented(&s.key) {
                if !same_as_default(&s.value, default) {
                    errors.push(format!(
                        "{}: `{}: {}` asks for {}, which ferrotune does not implement\n  hint: {}",
                        s.origin,
                        s.key,
                        show(&s.value),
                        feature.feature,
                        feature.hint
                    ));
                }
                continue;
            }
            let hint = suggest::hint(&s.key, keys::all_names());
            let message = format!(
                "{}: unknown key `{}`{}",
                s.origin,
                s.key,
                if hint.is_empty() {
                    "\n  hint: `ferrotune train --help` lists every key".to_string()
                } else {
                    format!("\n  hint: {hint}")
                }
            );
            if allow_extra {
                notes.push(format!("{message} (ignored: ALLOW_EXTRA_ARGS is set)"));
            } else {
                errors.push(message);
            }
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("\n"));
        }
        Ok(notes)
    }

    // ---- typed access (stage two reads keys through these) ----

    fn def(&self, key: &str) -> Result<&'static keys::KeyDef> {
        keys::find(key).with_context(|| format!("internal: config key `{key}` is not in the key table"))
    }

    /// The value of `key` (given or default) and its origin, type-checked against the key table; `None` for
    /// an absent or `null` value.
    fn value(&self, key: &str) -> Result<(Option<Value>, Origin)> {
        let def = self.def(key)?;
        let (value, origin) = match self.get(key) {
            Some(s) => (s.value.clone(), s.origin.clone()),
            None => (serde_json::from_str(def.default).unwrap_or(Value::Null), Origin::Default),
        };
        if value.is_null() {
            if !def.nullable && origin != Origin::Default {
                bail!("{origin}: `{key}` cannot be null (LLaMA-Factory's default is {})", def.default);
            }
            return Ok((None, origin));
        }
        Ok((Some(value), origin))
    }

    fn type_error(&self, key: &str, origin: &Origin, kind: Kind, value: &Value) -> anyhow::Error {
        let want = match kind {
            Kind::Bool => "true or false",
            Kind::Int => "a whole number",
            Kind::Float => "a number",
            Kind::Str => "a string",
            Kind::List => "a comma-separated string or a list",
            Kind::Any => "a value",
        };
        anyhow::anyhow!("{origin}: `{key}` must be {want}, got {}", show(value))
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        let (v, origin) = self.value(key)?;
        let Some(v) = v else { return Ok(None) };
        match &v {
            Value::Bool(b) => Ok(Some(*b)),
            // YAML 1.1 (OmegaConf) reads these as booleans; serde_yaml_ng keeps them as strings.
            Value::String(s) => match s.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" => Ok(Some(true)),
                "false" | "no" | "off" => Ok(Some(false)),
                _ => Err(self.type_error(key, &origin, Kind::Bool, &v)),
            },
            _ => Err(self.type_error(key, &origin, Kind::Bool, &v)),
        }
    }

    pub fn bool(&self, key: &str) -> Result<bool> {
        Ok(self.opt_bool(key)?.unwrap_or(false))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        let (v, origin) = self.value(key)?;
        let Some(v) = v else { return Ok(None) };
        let f = match &v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        match f {
            Some(f) if f.is_finite() => Ok(Some(f)),
            _ => Err(self.type_error(key, &origin, Kind::Float, &v)),
        }
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.with_context(|| format!("`{key}` needs a value"))
    }

    pub fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        let (v, origin) = self.value(key)?;
        let Some(v) = v else { return Ok(None) };
        let i = match &v {
            Value::Number(n) => n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
            Value::String(s) => s.trim().parse::<i64>().ok(),
            _ => None,
        };
        i.map(Some).ok_or_else(|| self.type_error(key, &origin, Kind::Int, &v))
    }

    pub fn i64(&self, key: &str) -> Result<i64> {
        self.opt_i64(key)?.with_context(|| format!("`{key}` needs a value"))
    }

    /// A whole number that must be at least `min`.
    pub fn usize_at_least(&self, key: &str, min: usize) -> Result<usize> {
        let v = self.i64(key)?;
        self.check_at_least(key, v, min)
    }

    pub fn opt_usize_at_least(&self, key: &str, min: usize) -> Result<Option<usize>> {
        match self.opt_i64(key)? {
            None => Ok(None),
            Some(v) => self.check_at_least(key, v, min).map(Some),
        }
    }

    fn check_at_least(&self, key: &str, v: i64, min: usize) -> Result<usize> {
        if v < min as i64 {
            bail!("{}: `{key}` must be at least {min}, got {v}", self.origin_of(key));
        }
        Ok(v as usize)
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<String>> {
        let (v, origin) = self.value(key)?;
        match v {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            // A YAML number or bool where a string is expected (e.g. `template: 2`): keep its text.
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(Value::Bool(b)) => Ok(Some(b.to_string())),
            Some(other) => Err(self.type_error(key, &origin, Kind::Str, &other)),
        }
    }

    pub fn str(&self, key: &str) -> Result<String> {
        self.opt_str(key)?.with_context(|| format!("`{key}` needs a value"))
    }

    /// A list key: a comma-separated string (items trimmed, empty items dropped) or a list of strings.
    pub fn list(&self, key: &str) -> Result<Vec<String>> {
        let (v, origin) = self.value(key)?;
        let split = |s: &str| s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect();
        match v {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(split(&s)),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for item in &items {
                    match item {
                        Value::String(s) => out.extend(split(s)),
                        other => return Err(self.type_error(key, &origin, Kind::List, other)),
                    }
                }
                Ok(out)
            }
            Some(other) => Err(self.type_error(key, &origin, Kind::List, &other)),
        }
    }

    /// The raw value of `key` (given or LLaMA-Factory's default), for keys of mixed type.
    pub fn any(&self, key: &str) -> Result<Option<Value>> {
        Ok(self.value(key)?.0)
    }

    /// Where `key` was set, for messages (`Origin::Default` when it was not).
    pub fn origin_of(&self, key: &str) -> Origin {
        self.get(key).map(|s| s.origin.clone()).unwrap_or(Origin::Default)
    }

    /// `key` as the user sees it in an error: `train.yaml:7:1: \`cutoff_len\``.
    pub fn place(&self, key: &str) -> String {
        match self.get(key) {
            Some(s) => format!("{}: `{key}`", s.origin),
            None => format!("`{key}`"),
        }
    }
}

/// A YAML document as ordered (key, value) pairs; syntax errors carry line and column.
fn parse_yaml(text: &str, path: &Path) -> Result<Vec<(String, Value)>> {
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| {
        let place = match e.location() {
            Some(l) => format!("{}:{}:{}", path.display(), l.line(), l.column()),
            None => path.display().to_string(),
        };
        let hint = if e.to_string().contains("duplicate entry") {
            "\n  hint: each key may appear once; delete the repeated line"
        } else {
            "\n  hint: a config is flat `key: value` lines; check indentation and quotes near that place"
        };
        anyhow::anyhow!("{place}: invalid YAML: {e}{hint}")
    })?;
    let mapping = match doc {
        serde_yaml_ng::Value::Mapping(m) => m,
        serde_yaml_ng::Value::Null => return Ok(Vec::new()),
        _ => bail!("{}: the config must be a mapping of `key: value` lines", path.display()),
    };
    let mut out = Vec::with_capacity(mapping.len());
    for (k, v) in mapping {
        let key = match k {
            serde_yaml_ng::Value::String(s) => s,
            other => bail!("{}: config keys must be names, found {:?}", path.display(), other),
        };
        let value = serde_json::to_value(&v)
            .with_context(|| format!("{}: the value of `{key}` cannot be represented", path.display()))?;
        out.push((key, value));
    }
    Ok(out)
}

/// A command-line value parsed as a YAML scalar, as OmegaConf's dotlist does; text that is not valid YAML
/// stays a string.
fn parse_scalar(raw: &str) -> Value {
    if raw.is_empty() {
        return Value::Null;
    }
    match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(raw) {
        Ok(v @ (serde_yaml_ng::Value::Bool(_) | serde_yaml_ng::Value::Number(_) | serde_yaml_ng::Value::Null)) => {
            serde_json::to_value(&v).unwrap_or_else(|_| Value::String(raw.to_string()))
        }
        Ok(v @ serde_yaml_ng::Value::Sequence(_)) => {
            serde_json::to_value(&v).unwrap_or_else(|_| Value::String(raw.to_string()))
        }
        _ => Value::String(raw.to_string()),
    }
}

/// Line and column (1-based) of a top-level key in config text: a line that starts (unindented) with the key,
/// optionally quoted, followed by `:`. For JSON the first `"key"` followed by `:`.
pub fn locate_key(text: &str, key: &str, is_json: bool) -> Option<(usize, usize)> {
    for (i, line) in text.lines().enumerate() {
        if is_json {
            let pat = format!("\"{key}\"");
            if let Some(pos) = line.find(&pat) {
                if line[pos + pat.len()..].trim_start().starts_with(':') {
                    return Some((i + 1, line[..pos].chars().count() + 1));
                }
            }
            continue;
        }
        for candidate in [key.to_string(), format!("\"{key}\""), format!("'{key}'")] {
            if let Some(rest) = line.strip_prefix(&candidate) {
                if rest.trim_start().starts_with(':') {
                    return Some((i + 1, 1));
                }
            }
        }
    }
    None
}

/// Whether a given value equals a LLaMA-Factory default (JSON literal), numerically for numbers and treating
/// YAML-1.1 boolean words as booleans.
pub fn same_as_default(value: &Value, default: &str) -> bool {
    let Ok(d) = serde_json::from_str::<Value>(default) else { return false };
    match (value, &d) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::String(s), Value::Bool(b)) => {
            matches!(
                (s.to_ascii_lowercase().as_str(), b),
                ("true" | "yes" | "on", true) | ("false" | "no" | "off", false)
            )
        }
        (Value::String(s), Value::Null) => s.is_empty() || s.eq_ignore_ascii_case("none") || s == "null",
        (Value::Array(a), Value::Null) => a.is_empty(),
        _ => *value == d,
    }
}

/// A value as the user would have typed it.
pub fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> RawConfig {
        RawConfig::parse(text, Path::new("train.yaml"), false).unwrap()
    }

    #[test]
    fn floats_in_both_spellings() {
        let c = yaml("learning_rate: 1.0e-4\nweight_decay: 1e-4\n");
        assert_eq!(c.f64("learning_rate").unwrap(), 1e-4);
        assert_eq!(c.f64("weight_decay").unwrap(), 1e-4);
    }

    #[test]
    fn overrides_replace_file_values() {
        let mut c = yaml("learning_rate: 1.0e-4\nbf16: true\n");
        c.apply_args(&["learning_rate=2e-4", "--cutoff_len", "512", "--plot_loss", "--bf16=false"]).unwrap();
        assert_eq!(c.f64("learning_rate").unwrap(), 2e-4);
        assert_eq!(c.i64("cutoff_len").unwrap(), 512);
        assert!(c.bool("plot_loss").unwrap());
        assert!(!c.bool("bf16").unwrap());
        assert_eq!(c.origin_of("cutoff_len"), Origin::Arg("--cutoff_len 512".into()));
    }

    #[test]
    fn unknown_key_has_place_and_suggestion() {
        let c = yaml("stage: sft\nlearning_rat: 1.0e-4\n");
        let err = c.check_keys().unwrap_err().to_string();
        assert!(err.contains("train.yaml:2:1"), "{err}");
        assert!(err.contains("did you mean `learning_rate`?"), "{err}");
    }

    #[test]
    fn unimplemented_key_is_an_error_unless_default() {
        assert!(yaml("deepspeed: null\nquantization_type: nf4\n").check_keys().is_ok());
        let err = yaml("quantization_type: fp4\n").check_keys().unwrap_err().to_string();
        assert!(err.contains("4-bit") && err.contains("does not implement"), "{err}");
        let err = yaml("deepspeed: examples/deepspeed/ds_z3_config.json\n").check_keys().unwrap_err().to_string();
        assert!(err.contains("distributed training"), "{err}");
    }

    #[test]
    fn inert_key_with_other_value_is_noted() {
        let notes = yaml("ddp_timeout: 180000000\ntrust_remote_code: true\n").check_keys().unwrap();
        assert_eq!(notes.len(), 2);
        assert!(notes[0].contains("ddp_timeout"));
    }

    #[test]
    fn yaml_errors_have_line_and_column() {
        let err = RawConfig::parse("a: [1,\nb: 2\n", Path::new("x.yaml"), false).unwrap_err().to_string();
        assert!(err.starts_with("x.yaml:"), "{err}");
        let err = RawConfig::parse("stage: sft\nstage: pt\n", Path::new("x.yaml"), false).unwrap_err().to_string();
        assert!(err.contains("duplicate"), "{err}");
    }

    #[test]
    fn type_errors_name_the_place() {
        let c = yaml("cutoff_len: lots\n");
        let err = c.usize_at_least("cutoff_len", 1).unwrap_err().to_string();
        assert!(err.contains("train.yaml:1:1") && err.contains("whole number"), "{err}");
    }

    #[test]
    fn lists() {
        let c = yaml("dataset: a, b ,c\nlora_target:\n  - q_proj\n  - v_proj\n");
        assert_eq!(c.list("dataset").unwrap(), vec!["a", "b", "c"]);
        assert_eq!(c.list("lora_target").unwrap(), vec!["q_proj", "v_proj"]);
    }
}
