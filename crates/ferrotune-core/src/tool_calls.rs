//! Tool calls in generated text, as OpenAI `tool_calls`.
//!
//! Qwen3.5's chat template teaches the model to call a function with an XML-like block
//!
//! ```text
//! <tool_call>
//! <function=NAME>
//! <parameter=ARG>
//! VALUE
//! </parameter>
//! </function>
//! </tool_call>
//! ```
//!
//! (values are written raw, so their JSON type comes from the tool's schema), while Qwen2.5 / Qwen3 templates
//! use a JSON block (`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`); each block is read in
//! whichever format its text has. Values are converted as vLLM's `qwen3_coder` parser converts them, with the
//! differences noted at [`convert_value`].
//!
//! A block is the text from `<tool_call>` to the first `</tool_call>`. One that does not parse (unclosed, no
//! `<function=`, bad JSON, stray text) stays in the content as text: a malformed call is never an error. A call
//! of a function the request did not declare is returned all the same (as vLLM does): the client sees what the
//! model asked for, and its values are converted as undeclared parameters.
//!
//! `content` is the text outside the calls, trimmed: the template separates the answer from the first call by a
//! blank line and calls from each other by a newline, which are layout, not content. [`parse`] reads a whole
//! completion; [`StreamParser`] reads it piece by piece and yields the same text and calls. The text is the
//! answer after any `<think>` block (split off before), decoded with `<tool_call>` and `</tool_call>` kept
//! (Qwen's tokenizers mark them as not special, so skipping special tokens keeps them).

use rand::distr::Alphanumeric;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const FUNCTION: &str = "<function=";
const FUNCTION_END: &str = "</function>";
const PARAMETER: &str = "<parameter=";
const PARAMETER_END: &str = "</parameter>";

/// One call the model made.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    /// `call_` and 24 alphanumerics.
    pub id: String,
    pub name: String,
    /// Always a JSON object.
    pub arguments: Value,
}

impl ToolCall {
    /// The arguments as OpenAI sends them: a JSON string of the object.
    pub fn arguments_json(&self) -> String {
        self.arguments.to_string()
    }

    /// `{"id", "type": "function", "function": {"name", "arguments": "<JSON string>"}}`.
    pub fn to_openai(&self) -> Value {
        serde_json::json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments_json()},
        })
    }

    /// The call as one entry of a streamed chunk's `delta.tool_calls`: [`Self::to_openai`] with its `index`.
    pub fn to_openai_delta(&self, index: usize) -> Value {
        let mut v = self.to_openai();
        v["index"] = index.into();
        v
    }
}

/// How a chat template writes a call inside `<tool_call>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallFormat {
    /// Qwen3.5's `<function=NAME>` with `<parameter=...>` blocks.
    Xml,
    /// Qwen2.5 / Qwen3's `{"name": ..., "arguments": ...}`.
    Json,
}

impl CallFormat {
    /// The format a chat template's source teaches; None when it writes no tool calls.
    pub fn of_template(source: &str) -> Option<Self> {
        if source.contains(FUNCTION) {
            Some(Self::Xml)
        } else if source.contains(OPEN) {
            Some(Self::Json)
        } else {
            None
        }
    }
}

/// Text that, appended to the generation prompt, makes the model's answer a call: of `name`, or of a function
/// it picks (OpenAI's `tool_choice` naming a function, or `"required"`). The same text goes first into the
/// parser, so that the block it opens is read whole.
pub fn forced_call_prefix(format: CallFormat, name: Option<&str>) -> String {
    match (format, name) {
        (CallFormat::Xml, Some(n)) => format!("{OPEN}\n{FUNCTION}{n}>\n"),
        (CallFormat::Xml, None) => format!("{OPEN}\n{FUNCTION}"),
        (CallFormat::Json, Some(n)) => format!("{OPEN}\n{{\"name\": {}, \"arguments\": ", Value::from(n)),
        (CallFormat::Json, None) => format!("{OPEN}\n{{\"name\": \""),
    }
}

/// The end of the first complete `<tool_call>` ... `</tool_call>` block of `text`, if any.
pub fn first_block_end(text: &str) -> Option<usize> {
    let open = text.find(OPEN)?;
    text[open..].find(CLOSE).map(|c| open + c + CLOSE.len())
}

/// A completion split into its text and its calls.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    /// The text outside the calls, trimmed; empty when the model only called functions.
    pub content: String,
    pub calls: Vec<ToolCall>,
}

/// Generator of call ids: random, or from a seed for reproducible output.
pub struct CallIds(StdRng);

impl CallIds {
    pub fn random() -> Self {
        Self(StdRng::from_rng(&mut rand::rng()))
    }

    pub fn seeded(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }

    pub fn next_id(&mut self) -> String {
        let tail: String = (&mut self.0).sample_iter(&Alphanumeric).take(24).map(char::from).collect();
        format!("call_{tail}")
    }
}

/// Parses a whole completion. `tools` is the request's `tools` array (OpenAI shape), which types the values.
pub fn parse(text: &str, tools: &[Value], ids: &mut CallIds) -> Parsed {
    let mut outside = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(OPEN) {
        outside.push_str(&rest[..i]);
        let after = &rest[i + OPEN.len()..];
        let Some(j) = after.find(CLOSE) else {
            // Unclosed: the rest is text.
            outside.push_str(&rest[i..]);
            rest = "";
            break;
        };
        match parse_block(&after[..j], tools) {
            Some((name, arguments)) => calls.push(ToolCall { id: ids.next_id(), name, arguments }),
            None => outside.push_str(&rest[i..i + OPEN.len() + j + CLOSE.len()]),
        }
        rest = &after[j + CLOSE.len()..];
    }
    outside.push_str(rest);
    Parsed { content: outside.trim().to_string(), calls }
}

/// What a [`StreamParser`] releases.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Content text; the deltas of a stream concatenate to [`Parsed::content`].
    Text(String),
    /// A complete call; `index` counts the calls of the completion from 0 (OpenAI's `tool_calls[].index`).
    Call { index: usize, call: ToolCall },
}

/// Splits a completion into text and calls as its pieces arrive.
///
/// Text that may still become `<tool_call>` is held back, and so is a block until its `</tool_call>`; the block
/// is then released as one call (or, when it does not parse, as text). Whitespace is held until text follows it,
/// so that the deltas add up to the trimmed content of [`parse`].
pub struct StreamParser {
    tools: Vec<Value>,
    ids: CallIds,
    /// Undecided text: a possible start of `<tool_call>`, or the inside of an open block.
    buf: String,
    in_block: bool,
    /// Bytes of an open block already searched for `</tool_call>`.
    scanned: usize,
    calls: usize,
    /// Whether content text has been released (leading whitespace is dropped before it).
    started: bool,
    /// Whitespace released only if more text follows.
    pending_ws: String,
}

impl StreamParser {
    pub fn new(tools: Vec<Value>, ids: CallIds) -> Self {
        Self {
            tools,
            ids,
            buf: String::new(),
            in_block: false,
            scanned: 0,
            calls: 0,
            started: false,
            pending_ws: String::new(),
        }
    }

    /// Adds the next piece of generated text.
    pub fn push(&mut self, piece: &str) -> Vec<Event> {
        self.buf.push_str(piece);
        let mut out = Vec::new();
        loop {
            if !self.in_block {
                if let Some(i) = self.buf.find(OPEN) {
                    let before = self.buf[..i].to_string();
                    self.buf.drain(..i + OPEN.len());
                    self.text(&before, &mut out);
                    self.in_block = true;
                    self.scanned = 0;
                    continue;
                }
                let release = self.buf.len() - partial_tag_suffix(&self.buf, OPEN);
                let text: String = self.buf.drain(..release).collect();
                self.text(&text, &mut out);
                return out;
            }
            // A close may straddle the previous piece and this one.
            let mut from = self.scanned.saturating_sub(CLOSE.len() - 1);
            while !self.buf.is_char_boundary(from) {
                from -= 1;
            }
            let Some(j) = self.buf[from..].find(CLOSE).map(|j| from + j) else {
                self.scanned = self.buf.len();
                return out;
            };
            let block: String = self.buf.drain(..j + CLOSE.len()).collect();
            let inner = &block[..j];
            match parse_block(inner, &self.tools) {
                Some((name, arguments)) => {
                    let call = ToolCall { id: self.ids.next_id(), name, arguments };
                    out.push(Event::Call { index: self.calls, call });
                    self.calls += 1;
                }
                None => self.text(&format!("{OPEN}{block}"), &mut out),
            }
            self.in_block = false;
        }
    }

    /// Ends the completion: held text is released, an unclosed block as text.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        if self.in_block {
            self.text(&format!("{OPEN}{rest}"), &mut out);
            self.in_block = false;
        } else {
            self.text(&rest, &mut out);
        }
        // Trailing whitespace is not content.
        self.pending_ws.clear();
        out
    }

    fn text(&mut self, s: &str, out: &mut Vec<Event>) {
        let s = if self.started { s } else { s.trim_start() };
        if s.is_empty() {
            return;
        }
        let core = s.trim_end();
        if core.is_empty() {
            self.pending_ws.push_str(s);
            return;
        }
        self.started = true;
        let mut delta = std::mem::take(&mut self.pending_ws);
        delta.push_str(core);
        self.pending_ws.push_str(&s[core.len()..]);
        out.push(Event::Text(delta));
    }
}

/// Length of the longest suffix of `s` that is a proper prefix of `tag` (ASCII).
fn partial_tag_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1)).rev().find(|&n| s.ends_with(&tag[..n])).unwrap_or(0)
}

/// The name and arguments of one block's inside, if it is a call in either format.
fn parse_block(inner: &str, tools: &[Value]) -> Option<(String, Value)> {
    let t = inner.trim();
    if let Some(rest) = t.strip_prefix(FUNCTION) {
        parse_xml(rest, tools)
    } else if t.starts_with('{') {
        parse_json(t)
    } else {
        None
    }
}

/// Qwen3.5: `NAME>` then `<parameter=ARG>\nVALUE\n</parameter>` blocks separated by whitespace, then
/// `</function>`.
fn parse_xml(rest: &str, tools: &[Value]) -> Option<(String, Value)> {
    let gt = rest.find('>')?;
    let name = &rest[..gt];
    if !valid_name(name) {
        return None;
    }
    let mut body = rest[gt + 1..].strip_suffix(FUNCTION_END)?;
    let props = properties(tools, name);
    let mut args = Map::new();
    loop {
        body = body.trim_start();
        if body.is_empty() {
            break;
        }
        let after = body.strip_prefix(PARAMETER)?;
        let gt = after.find('>')?;
        let arg = &after[..gt];
        if arg.is_empty() || arg.contains(['<', '\n']) {
            return None;
        }
        let region = &after[gt + 1..];
        // A value may contain `</parameter>` itself: the closing one is followed by the next parameter or by the
        // end of the function (vLLM's rule).
        let end = region.match_indices(PARAMETER_END).map(|(k, _)| k).find(|&k| {
            let next = region[k + PARAMETER_END.len()..].trim_start();
            next.is_empty() || next.starts_with(PARAMETER)
        })?;
        let raw = &region[..end];
        // The template writes exactly one newline on each side of the value.
        let raw = raw.strip_prefix('\n').unwrap_or(raw);
        let raw = raw.strip_suffix('\n').unwrap_or(raw);
        args.insert(arg.to_string(), convert_value(raw, props.and_then(|p| p.get(arg))));
        body = &region[end + PARAMETER_END.len()..];
    }
    Some((name.to_string(), Value::Object(args)))
}

/// Qwen2.5 / Qwen3 (Hermes): `{"name": ..., "arguments": {...}}`. Arguments sent as a JSON string of an object
/// are accepted, and missing ones are an empty object (a function without parameters).
fn parse_json(t: &str) -> Option<(String, Value)> {
    let Value::Object(mut o) = serde_json::from_str::<Value>(t).ok()? else { return None };
    let name = match o.remove("name")? {
        Value::String(n) if valid_name(&n) => n,
        _ => return None,
    };
    let args = match o.remove("arguments").or_else(|| o.remove("parameters")) {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v,
        Some(Value::String(s)) => match serde_json::from_str::<Value>(&s).ok()? {
            v @ Value::Object(_) => v,
            _ => return None,
        },
        Some(_) => return None,
    };
    Some((name, args))
}

/// A function name as a model writes one, not a template fragment or prose (vLLM rejects the same).
fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || "{}<>\"'".contains(c))
}

/// `parameters.properties` of the tool named `name`, in OpenAI's `{"type": "function", "function": {...}}` shape
/// or a bare function object.
fn properties<'a>(tools: &'a [Value], name: &str) -> Option<&'a Map<String, Value>> {
    tools
        .iter()
        .map(|t| t.get("function").unwrap_or(t))
        .find(|f| f.get("name").and_then(Value::as_str) == Some(name))?
        .get("parameters")?
        .get("properties")?
        .as_object()
}

/// The declared type of a parameter (lowercase; the first non-null one of a list or `anyOf` / `oneOf`), and
/// whether it admits null. A schema without a type is a string, as in vLLM.
fn declared_type(schema: &Value) -> (String, bool) {
    let mut types: Vec<String> = Vec::new();
    let mut add = |t: &Value| match t {
        Value::String(s) => types.push(s.trim().to_lowercase()),
        Value::Array(a) => types.extend(a.iter().filter_map(Value::as_str).map(|s| s.trim().to_lowercase())),
        _ => {}
    };
    if let Some(t) = schema.get("type") {
        add(t);
    } else if let Some(Value::Array(options)) = schema.get("anyOf").or_else(|| schema.get("oneOf")) {
        for o in options {
            if let Some(t) = o.get("type") {
                add(t);
            }
        }
    }
    let nullable = types.iter().any(|t| t == "null");
    let primary = types.iter().find(|t| *t != "null").or(types.first()).cloned().unwrap_or_else(|| "string".into());
    (primary, nullable)
}

/// Converts a raw value by its parameter's schema (`None`: not declared), as vLLM's `qwen3_coder` parser does:
///
/// - string types (`string`, `str`, `text`, `varchar`, `char`, `enum`) keep the text, except `null` / `None` for
///   a nullable one;
/// - other types read `null` / `None` (any case) as null;
/// - integer types (`int*`, `uint*`, `long*`, `short*`, `unsigned*`): Python's `int()`; number types (`num*`,
///   `float*`): Python's `float()`, an integral value as an integer;
/// - `boolean` / `bool` / `binary`: `true` / `false` in any case;
/// - `object`, `array`, `arr`, `dict*`, `list*`: JSON (a JSON string holding a Python literal is read once
///   more), else a Python literal (`{'a': True}`);
/// - any other type: JSON, else a Python literal;
/// - a value that does not convert stays the text.
///
/// Differences from vLLM: a boolean that is neither true nor false stays the text (vLLM makes it false); an
/// undeclared parameter is JSON when it parses as an object, array, number or boolean (vLLM keeps the text), so
/// that a structured argument of a function the request did not describe arrives structured.
pub fn convert_value(raw: &str, schema: Option<&Value>) -> Value {
    let text = || Value::String(raw.to_string());
    let Some(schema) = schema else {
        return match serde_json::from_str::<Value>(raw) {
            Ok(v @ (Value::Object(_) | Value::Array(_) | Value::Number(_) | Value::Bool(_))) => v,
            _ => text(),
        };
    };
    let (ty, nullable) = declared_type(schema);
    let is_null = raw.eq_ignore_ascii_case("null") || raw.eq_ignore_ascii_case("none");
    if nullable && is_null {
        return Value::Null;
    }
    if matches!(ty.as_str(), "string" | "str" | "text" | "varchar" | "char" | "enum") {
        return text();
    }
    if is_null {
        return Value::Null;
    }
    let starts = |prefixes: &[&str]| prefixes.iter().any(|p| ty.starts_with(p));
    if starts(&["int", "uint", "long", "short", "unsigned"]) {
        return python_int(raw).unwrap_or_else(text);
    }
    if starts(&["num", "float"]) {
        return python_float(raw).map(integral_as_int).unwrap_or_else(text);
    }
    if matches!(ty.as_str(), "boolean" | "bool" | "binary") {
        return match raw.to_lowercase().as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => text(),
        };
    }
    let container = matches!(ty.as_str(), "object" | "array" | "arr") || starts(&["dict", "list"]);
    match serde_json::from_str::<Value>(raw) {
        // A model trained on a template that wrote json.dumps(str(dict)) writes a JSON string of a Python repr.
        Ok(Value::String(s)) if container => python_literal(&s).unwrap_or(Value::String(s)),
        Ok(v) => v,
        Err(_) => python_literal(raw).unwrap_or_else(text),
    }
}

fn integral_as_int(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.2e18 {
        Value::from(f as i64)
    } else {
        Value::from(f)
    }
}

/// Digits with single underscores between them, as Python reads numbers (`1_000`); `None` for a misplaced one.
fn without_underscores(s: &str) -> Option<String> {
    let b = s.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b'_' && !(i > 0 && b[i - 1].is_ascii_digit() && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            return None;
        }
    }
    Some(s.replace('_', ""))
}

/// Python's `int(text)`: surrounding whitespace, a sign, decimal digits.
fn python_int(raw: &str) -> Option<Value> {
    let s = without_underscores(raw.trim())?;
    let digits = s.strip_prefix(['+', '-']).unwrap_or(&s);
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let s = s.strip_prefix('+').unwrap_or(&s);
    s.parse::<i64>().map(Value::from).or_else(|_| s.parse::<u64>().map(Value::from)).ok()
}

/// Python's `float(text)`, finite values only (JSON has no others).
fn python_float(raw: &str) -> Option<f64> {
    let s = without_underscores(raw.trim())?;
    // Rust accepts the same decimal and exponent forms, and also "inf" / "nan", which are refused below.
    let f: f64 = s.parse().ok()?;
    f.is_finite().then_some(f)
}

/// Python's `ast.literal_eval` for the literals that have a JSON value: dicts (string or integer keys), lists,
/// tuples, strings, numbers, True, False, None.
fn python_literal(raw: &str) -> Option<Value> {
    let mut p = PyLit { s: raw.as_bytes(), i: 0, src: raw };
    let v = p.value(0)?;
    p.ws();
    (p.i == p.s.len()).then_some(v)
}

struct PyLit<'a> {
    s: &'a [u8],
    i: usize,
    src: &'a str,
}

impl PyLit<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Option<Value> {
        if depth > 64 {
            return None;
        }
        self.ws();
        match *self.s.get(self.i)? {
            b'{' => {
                self.i += 1;
                let mut o = Map::new();
                loop {
                    if self.eat(b'}') {
                        return Some(Value::Object(o));
                    }
                    let key = match self.value(depth + 1)? {
                        Value::String(k) => k,
                        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
                        _ => return None,
                    };
                    if !self.eat(b':') {
                        return None;
                    }
                    o.insert(key, self.value(depth + 1)?);
                    if !self.eat(b',') {
                        return self.eat(b'}').then_some(Value::Object(o));
                    }
                }
            }
            open @ (b'[' | b'(') => {
                self.i += 1;
                let close = if open == b'[' { b']' } else { b')' };
                let mut items = Vec::new();
                let mut comma = false;
                loop {
                    if self.eat(close) {
                        // `(x)` is x itself; `(x,)` and `()` are tuples.
                        if open == b'(' && items.len() == 1 && !comma {
                            return items.pop();
                        }
                        return Some(Value::Array(items));
                    }
                    items.push(self.value(depth + 1)?);
                    comma = self.eat(b',');
                    if !comma {
                        return self.eat(close).then(|| {
                            if open == b'(' && items.len() == 1 {
                                items.pop().unwrap_or(Value::Null)
                            } else {
                                Value::Array(items)
                            }
                        });
                    }
                }
            }
            b'\'' | b'"' => {
                // Adjacent literals concatenate, as in Python.
                let mut s = self.string()?;
                loop {
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b'\'' | b'"') => s.push_str(&self.string()?),
                        _ => return Some(Value::String(s)),
                    }
                }
            }
            _ => self.scalar(),
        }
    }

    /// A quoted string with Python's escapes (no prefixes, no triple quotes).
    fn string(&mut self) -> Option<String> {
        let q = self.s[self.i];
        self.i += 1;
        let mut out = String::new();
        loop {
            let rest = &self.src[self.i..];
            let c = rest.chars().next()?;
            self.i += c.len_utf8();
            match c {
                '\n' => return None,
                c if c as u32 == u32::from(q) => return Some(out),
                '\\' => {
                    let e = self.src[self.i..].chars().next()?;
                    self.i += e.len_utf8();
                    let hex = |p: &mut Self, n: usize| -> Option<char> {
                        let h = p.src.get(p.i..p.i + n)?;
                        p.i += n;
                        char::from_u32(u32::from_str_radix(h, 16).ok()?)
                    };
                    match e {
                        '\n' => {}
                        '\\' | '\'' | '"' => out.push(e),
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        'a' => out.push('\u{7}'),
                        'b' => out.push('\u{8}'),
                        'f' => out.push('\u{c}'),
                        'v' => out.push('\u{b}'),
                        'x' => out.push(hex(self, 2)?),
                        'u' => out.push(hex(self, 4)?),
                        'U' => out.push(hex(self, 8)?),
                        '0'..='7' => {
                            let mut n = e.to_digit(8)?;
                            for _ in 0..2 {
                                match self.s.get(self.i) {
                                    Some(d @ b'0'..=b'7') => {
                                        n = n * 8 + u32::from(d - b'0');
                                        self.i += 1;
                                    }
                                    _ => break,
                                }
                            }
                            out.push(char::from_u32(n)?);
                        }
                        other => {
                            out.push('\\');
                            out.push(other);
                        }
                    }
                }
                c => out.push(c),
            }
        }
    }

    /// True, False, None, or a (signed) decimal number.
    fn scalar(&mut self) -> Option<Value> {
        let start = self.i;
        while self.i < self.s.len() && (self.s[self.i].is_ascii_alphanumeric() || b"+-._".contains(&self.s[self.i])) {
            // A sign only leads the number or its exponent.
            if matches!(self.s[self.i], b'+' | b'-') && self.i > start && !matches!(self.s[self.i - 1], b'e' | b'E') {
                break;
            }
            self.i += 1;
        }
        let word = &self.src[start..self.i];
        match word {
            "True" => return Some(Value::Bool(true)),
            "False" => return Some(Value::Bool(false)),
            "None" => return Some(Value::Null),
            _ => {}
        }
        let digits = word.trim_start_matches(['+', '-']);
        if !digits.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
            return None;
        }
        if digits.bytes().all(|c| c.is_ascii_digit() || c == b'_') {
            // Python refuses leading zeros in a decimal literal ("007").
            if digits.len() > 1 && digits.starts_with('0') && digits.bytes().any(|c| c != b'0' && c != b'_') {
                return None;
            }
            return python_int(word);
        }
        python_float(word).map(Value::from)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn tools() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}),
            json!({"type": "function", "function": {"name": "typed", "parameters": {"type": "object", "properties": {
                "s": {"type": "string"},
                "e": {"type": "string", "enum": ["a", "b"]},
                "i": {"type": "integer"},
                "n": {"type": "number"},
                "b": {"type": "boolean"},
                "o": {"type": "object"},
                "a": {"type": "array", "items": {"type": "string"}},
                "ns": {"type": ["string", "null"]},
                "ni": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                "nul": {"type": "null"},
                "untyped": {"description": "no type"},
            }}}}),
        ]
    }

    fn run(text: &str) -> Parsed {
        parse(text, &tools(), &mut CallIds::seeded(7))
    }

    /// The OpenAI message fields of a parse: content (null when empty) and the calls without their ids.
    fn openai(p: &Parsed) -> Value {
        let calls: Vec<Value> = p
            .calls
            .iter()
            .map(|c| {
                let mut v = c.to_openai();
                assert!(v["id"].as_str().unwrap().starts_with("call_"));
                v.as_object_mut().unwrap().remove("id");
                v
            })
            .collect();
        json!({"content": if p.content.is_empty() { Value::Null } else { p.content.clone().into() }, "tool_calls": calls})
    }

    fn call(name: &str, args: &str) -> Value {
        json!({"type": "function", "function": {"name": name, "arguments": args}})
    }

    /// One typed parameter of the `typed` tool, written as the template writes it.
    fn typed(arg: &str, value: &str) -> Value {
        let text = format!(
            "<tool_call>\n<function=typed>\n<parameter={arg}>\n{value}\n</parameter>\n</function>\n</tool_call>"
        );
        let p = run(&text);
        assert_eq!(p.calls.len(), 1, "{text:?}");
        p.calls[0].arguments[arg].clone()
    }

    const PARIS: &str =
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>";

    #[test]
    fn one_call() {
        let p = run(PARIS);
        assert_eq!(openai(&p), json!({"content": null, "tool_calls": [call("get_weather", r#"{"city":"Paris"}"#)]}));
        assert_eq!(p.calls[0].arguments, json!({"city": "Paris"}));
    }

    #[test]
    fn two_calls_with_several_parameters() {
        let text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n\
                    </parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\n\
                    Tokyo\n</parameter>\n</function>\n</tool_call>";
        let p = run(text);
        assert_eq!(
            openai(&p),
            json!({"content": null, "tool_calls": [
                call("get_weather", r#"{"city":"Paris","days":3}"#),
                call("get_weather", r#"{"city":"Tokyo"}"#),
            ]})
        );
        assert_ne!(p.calls[0].id, p.calls[1].id);
    }

    #[test]
    fn text_before_a_call_is_the_content() {
        let p = run(&format!("Let me check the weather.\n\n{PARIS}"));
        assert_eq!(
            openai(&p),
            json!({"content": "Let me check the weather.", "tool_calls": [call("get_weather", r#"{"city":"Paris"}"#)]})
        );
        // Text after a call (the template forbids it, a model may still write it) stays content too.
        let p = run(&format!("Checking.\n\n{PARIS}\nDone."));
        assert_eq!(p.content, "Checking.\n\n\nDone.");
        assert_eq!(p.calls.len(), 1);
    }

    #[test]
    fn multi_line_values_lose_exactly_one_newline_on_each_side() {
        assert_eq!(typed("s", "line 1\n\n  line 3"), json!("line 1\n\n  line 3"));
        assert_eq!(typed("s", "\nblank lines around\n"), json!("\nblank lines around\n"));
        assert_eq!(typed("s", ""), json!(""));
        // A value written on the tag's line has no newline to lose.
        let p = run("<tool_call>\n<function=typed>\n<parameter=s>x y</parameter>\n</function>\n</tool_call>");
        assert_eq!(p.calls[0].arguments, json!({"s": "x y"}));
    }

    #[test]
    fn values_follow_the_schema_types() {
        // vLLM's qwen3_coder conversions, but for a boolean that is neither true nor false (vLLM: false).
        assert_eq!(typed("s", "42"), json!("42"));
        assert_eq!(typed("s", "null"), json!("null"));
        assert_eq!(typed("s", "True"), json!("True"));
        assert_eq!(typed("e", "a"), json!("a"));
        assert_eq!(typed("untyped", "7"), json!("7"));
        assert_eq!(typed("i", "42"), json!(42));
        assert_eq!(typed("i", "-7"), json!(-7));
        assert_eq!(typed("i", " 1_000 "), json!(1000));
        assert_eq!(typed("i", "4.5"), json!("4.5"));
        assert_eq!(typed("i", "many"), json!("many"));
        assert_eq!(typed("i", "None"), json!(null));
        assert_eq!(typed("n", "1.5"), json!(1.5));
        assert_eq!(typed("n", "2.0"), json!(2));
        assert_eq!(typed("n", "1e-05"), json!(1e-05));
        assert_eq!(typed("n", "-3"), json!(-3));
        assert_eq!(typed("n", "nan"), json!("nan"));
        assert_eq!(typed("n", "inf"), json!("inf"));
        assert_eq!(typed("n", "abc"), json!("abc"));
        assert_eq!(typed("b", "true"), json!(true));
        assert_eq!(typed("b", "True"), json!(true));
        assert_eq!(typed("b", "FALSE"), json!(false));
        assert_eq!(typed("b", "yes"), json!("yes"));
        assert_eq!(typed("ns", "None"), json!(null));
        assert_eq!(typed("ns", "null"), json!(null));
        assert_eq!(typed("ns", "text"), json!("text"));
        assert_eq!(typed("ni", "null"), json!(null));
        assert_eq!(typed("ni", "12"), json!(12));
        assert_eq!(typed("nul", "None"), json!(null));
        assert_eq!(typed("o", r#"{"a": 1, "b": [true, null]}"#), json!({"a": 1, "b": [true, null]}));
        assert_eq!(
            typed("o", "{'a': True, 'b': None, 'c': (1, 2), 1: 'x'}"),
            json!({"a": true, "b": null, "c": [1, 2], "1": "x"})
        );
        assert_eq!(typed("o", r#""{'k': 'v'}""#), json!({"k": "v"}));
        assert_eq!(typed("o", "{not json"), json!("{not json"));
        assert_eq!(typed("a", r#"["x", "y"]"#), json!(["x", "y"]));
        assert_eq!(typed("a", "['x', \"y\\n\", -1.5e3]"), json!(["x", "y\n", -1500.0]));
        assert_eq!(typed("a", "x, y"), json!("x, y"));
        assert_eq!(typed("a", "null"), json!(null));
    }

    #[test]
    fn undeclared_parameters_and_functions() {
        // Declared function, undeclared parameter: JSON when it is an object, array, number or boolean.
        assert_eq!(typed("extra", r#"{"k": [1, 2]}"#), json!({"k": [1, 2]}));
        assert_eq!(typed("extra", "[1]"), json!([1]));
        assert_eq!(typed("extra", "42"), json!(42));
        assert_eq!(typed("extra", "false"), json!(false));
        assert_eq!(typed("extra", "null"), json!("null"));
        assert_eq!(typed("extra", r#""quoted""#), json!(r#""quoted""#));
        assert_eq!(typed("extra", "Paris"), json!("Paris"));
        // A function the request does not declare is returned all the same.
        let p = run("<tool_call>\n<function=unknown_fn>\n<parameter=x>\n5\n</parameter>\n<parameter=y>\nhi\n\
                     </parameter>\n</function>\n</tool_call>");
        assert_eq!(openai(&p), json!({"content": null, "tool_calls": [call("unknown_fn", r#"{"x":5,"y":"hi"}"#)]}));
        // No tools at all: the same.
        let p = parse(PARIS, &[], &mut CallIds::seeded(1));
        assert_eq!(p.calls[0].arguments, json!({"city": "Paris"}));
    }

    #[test]
    fn nested_json_values() {
        let v = r#"{"a": {"b": [1, {"c": "d"}, [2.5, null]]}, "e": "中文"}"#;
        assert_eq!(typed("o", v), json!({"a": {"b": [1, {"c": "d"}, [2.5, null]]}, "e": "中文"}));
        let p =
            run(&format!("<tool_call>\n<function=typed>\n<parameter=o>\n{v}\n</parameter>\n</function>\n</tool_call>"));
        assert_eq!(p.calls[0].arguments_json(), r#"{"o":{"a":{"b":[1,{"c":"d"},[2.5,null]]},"e":"中文"}}"#);
    }

    #[test]
    fn unicode_text_names_and_values() {
        let text = "好的，我来查一下 🌤️\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\n北京 Zürich\n\
                    </parameter>\n</function>\n</tool_call>";
        let p = run(text);
        assert_eq!(
            openai(&p),
            json!({"content": "好的，我来查一下 🌤️", "tool_calls": [call("get_weather", r#"{"city":"北京 Zürich"}"#)]})
        );
        let p = run("<tool_call>\n<function=查询>\n<parameter=城市>\n东京\n</parameter>\n</function>\n</tool_call>");
        assert_eq!(openai(&p), json!({"content": null, "tool_calls": [call("查询", r#"{"城市":"东京"}"#)]}));
    }

    #[test]
    fn a_literal_closing_parameter_tag_inside_a_value() {
        let text = "<tool_call>\n<function=typed>\n<parameter=s>\nuse </parameter> to close\n</parameter>\n\
                    <parameter=i>\n3\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(run(text).calls[0].arguments, json!({"s": "use </parameter> to close", "i": 3}));
    }

    #[test]
    fn hermes_json_blocks() {
        let text = "I will look it up.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \
                    \"days\": 3}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        assert_eq!(
            openai(&run(text)),
            json!({"content": "I will look it up.", "tool_calls": [
                call("get_weather", r#"{"city":"Paris","days":3}"#),
                call("get_time", "{}"),
            ]})
        );
        // Arguments as a JSON string, or absent.
        let p = run("<tool_call>\n{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}\n</tool_call>");
        assert_eq!(p.calls[0].arguments, json!({"x": 1}));
        let p = run("<tool_call>{\"name\": \"f\"}</tool_call>");
        assert_eq!(p.calls[0].arguments, json!({}));
        // Both formats in one completion.
        let p =
            run(&format!("<tool_call>\n{{\"name\": \"f\", \"arguments\": {{\"s\": \"x\"}}}}\n</tool_call>\n{PARIS}"));
        assert_eq!(p.calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["f", "get_weather"]);
    }

    #[test]
    fn broken_blocks_are_text() {
        let broken = [
            // Unclosed block, also after text.
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n",
            "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
            // No function.
            "<tool_call>\nget_weather(city=\"Paris\")\n</tool_call>",
            "<tool_call></tool_call>",
            // Unclosed function or parameter, a function name that is not one, stray text between parameters.
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</tool_call>",
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>",
            "<tool_call>\n<function=get_weather\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
            "<tool_call>\n<function={{ name }}>\n</function>\n</tool_call>",
            "<tool_call>\n<function=get_weather>\nnow\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\nmore\n</tool_call>",
            // Bad JSON, a JSON block without a name or with arguments that are not an object.
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": }\n</tool_call>",
            "<tool_call>\n{\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            "<tool_call>\n{\"name\": \"f\", \"arguments\": [1, 2]}\n</tool_call>",
            "<tool_call>\n{\"name\": \"f\", \"arguments\": \"not json\"}\n</tool_call>",
            // Unknown structure.
            "<tool_call>\n<invoke name=\"f\"/>\n</tool_call>",
        ];
        for text in broken {
            let p = run(text);
            assert_eq!(p, Parsed { content: text.trim().to_string(), calls: vec![] }, "{text:?}");
        }
        // A broken block does not hide a good one after it.
        let p = run(&format!("<tool_call>\noops\n</tool_call>\n{PARIS}"));
        assert_eq!(
            openai(&p),
            json!({"content": "<tool_call>\noops\n</tool_call>", "tool_calls": [call("get_weather", r#"{"city":"Paris"}"#)]})
        );
        // Plain text, and text that only mentions the tag.
        assert_eq!(run("  Hello!\n").content, "Hello!");
        assert_eq!(run("a </tool_call> b").content, "a </tool_call> b");
    }

    #[test]
    fn call_ids() {
        let id = CallIds::random().next_id();
        assert_eq!(id.len(), 29);
        assert!(id.starts_with("call_") && id[5..].chars().all(|c| c.is_ascii_alphanumeric()), "{id}");
        let (mut a, mut b) = (CallIds::seeded(3), CallIds::seeded(3));
        let first = a.next_id();
        assert_eq!(first, b.next_id());
        assert_ne!(first, a.next_id());
        assert_ne!(first, CallIds::seeded(4).next_id());
    }

    #[test]
    fn stream_holds_back_a_possible_tag_and_an_open_block() {
        let mut s = StreamParser::new(tools(), CallIds::seeded(7));
        assert_eq!(s.push("Hello <tool"), vec![Event::Text("Hello".into())]);
        assert_eq!(s.push("_call>\n<function=get_weather>\n<parameter=city>\nPa"), vec![]);
        assert_eq!(s.push("ris\n</parameter>\n</function>\n</tool_"), vec![]);
        let events = s.push("call> and <b>");
        assert_eq!(events.len(), 2, "{events:?}");
        let Event::Call { index: 0, call } = &events[0] else { panic!("{events:?}") };
        assert_eq!((call.name.as_str(), &call.arguments), ("get_weather", &json!({"city": "Paris"})));
        assert_eq!(events[1], Event::Text("  and <b>".into()));
        assert_eq!(s.push(" <tool_call"), vec![]);
        assert_eq!(s.finish(), vec![Event::Text(" <tool_call".into())]);
        // An unclosed block is flushed as text at the end.
        let mut s = StreamParser::new(tools(), CallIds::seeded(7));
        assert_eq!(s.push("<tool_call>\n<function=f>"), vec![]);
        assert_eq!(s.finish(), vec![Event::Text("<tool_call>\n<function=f>".into())]);
    }

    #[test]
    fn a_forced_call_prefix_then_the_models_text_is_one_call() {
        let generated = "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>";
        let text = format!("{}{generated}", forced_call_prefix(CallFormat::Xml, Some("get_weather")));
        assert_eq!(text, PARIS);
        let text = format!("{}get_weather>\n{generated}", forced_call_prefix(CallFormat::Xml, None));
        assert_eq!(text, PARIS);
        let mut s = StreamParser::new(tools(), CallIds::seeded(7));
        assert_eq!(s.push(&forced_call_prefix(CallFormat::Xml, Some("get_weather"))), vec![]);
        let events = s.push(generated);
        let Some(Event::Call { index: 0, call }) = events.first() else { panic!("{events:?}") };
        assert_eq!(
            call.to_openai_delta(0),
            json!({"index": 0, "id": call.id, "type": "function",
                   "function": {"name": "get_weather", "arguments": r#"{"city":"Paris"}"#}})
        );
    }

    /// Splits at random char boundaries and checks that the events add up to the whole-text parse.
    #[test]
    fn streaming_equals_parsing_the_whole_text() {
        let inputs = [
            PARIS.to_string(),
            format!("Let me check.\n\n{PARIS}\n{PARIS}"),
            format!("  \n a < b <tool <tool_call <tool_call>\nbad\n</tool_call> {PARIS} tail \n"),
            "好的 🌤️ <tool_call>\n<function=typed>\n<parameter=o>\n{\"a\": [1, \"中\"]}\n</parameter>\n\
             <parameter=s>\nx </tool\n</parameter>\n</function>\n</tool_call>"
                .to_string(),
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n\n".into(),
            format!("{PARIS}<tool_call>\n<function=get_weather>\n<parameter=city>\nunclosed"),
            "plain answer\n\nwith paragraphs  ".into(),
            "</tool_call><tool_call></tool_call>\n<tool_call><<tool_call>>".into(),
        ];
        let mut rng = StdRng::seed_from_u64(11);
        for input in &inputs {
            let whole = parse(input, &tools(), &mut CallIds::seeded(5));
            let bounds: Vec<usize> = (0..=input.len()).filter(|&i| input.is_char_boundary(i)).collect();
            for trial in 0..300 {
                let mut cuts: Vec<usize> = match trial {
                    0 => bounds.clone(), // one char at a time
                    1 => vec![],         // one piece
                    _ => (0..rng.random_range(1..12)).map(|_| bounds[rng.random_range(0..bounds.len())]).collect(),
                };
                cuts.sort_unstable();
                cuts.dedup();
                let mut s = StreamParser::new(tools(), CallIds::seeded(5));
                let mut events = Vec::new();
                let mut last = 0;
                for &c in cuts.iter().chain([&input.len()]) {
                    events.extend(s.push(&input[last..c]));
                    last = c;
                }
                events.extend(s.finish());
                let mut got = Parsed::default();
                for e in events {
                    match e {
                        Event::Text(t) => {
                            assert!(!t.is_empty());
                            got.content.push_str(&t)
                        }
                        Event::Call { index, call } => {
                            assert_eq!(index, got.calls.len());
                            got.calls.push(call);
                        }
                    }
                }
                assert_eq!(got, whole, "{input:?} cut at {cuts:?}");
            }
        }
    }
}
