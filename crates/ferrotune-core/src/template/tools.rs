//! Tool definitions and tool calls as LLaMA-Factory 0.9.5 writes them into the text: `ToolFormatter` (the tool
//! list appended to the system prompt) and `FunctionFormatter` (a `function_call` turn) of `data/formatter.py`,
//! with the `qwen` and `qwen3_5` tool formats of `data/tool_utils.py`.
//!
//! JSON is written as Python's `json.dumps(..., ensure_ascii=False)` writes it (`", "` and `": "` separators,
//! keys in their order, floats as `repr`), since those bytes are what gets tokenized.

use serde_json::Value;

/// How a template writes tools and tool calls (LLaMA-Factory's `tool_format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// Qwen2.5 style: tools as `{"type": "function", "function": ...}` lines, calls as JSON in `<tool_call>`.
    Qwen,
    /// Qwen3.5 style: tools as bare function lines, calls as `<function=...>` with `<parameter=...>` blocks.
    Qwen35,
}

const QWEN_TOOLS_HEAD: &str = "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
     You are provided with function signatures within <tools></tools> XML tags:\n<tools>";
const QWEN_TOOLS_TAIL: &str = "\n</tools>\n\nFor each function call, return a json object with function name and \
     arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": \
     <args-json-object>}\n</tool_call>";
const QWEN35_TOOLS_HEAD: &str = "\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>";
const QWEN35_TOOLS_TAIL: &str = "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format \
     with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n\
     </parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\n\
     multiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST \
     follow the specified format: an inner <function=...></function> block must be nested within \
     <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional \
     reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If there is \
     no function call available, answer the question like normal with your current knowledge and do not tell the \
     user about function calls\n</IMPORTANT>";

/// `thought_words` and `tool_call_words` of every Qwen template.
const THINK: (&str, &str) = (super::THINK_OPEN, super::THINK_CLOSE);
const TOOL_CALL: (&str, &str) = ("<tool_call>", "</tool_call>");

/// The text before and after the tool lines of [`tool_text`].
pub fn tool_text_frame(format: ToolFormat) -> (&'static str, &'static str) {
    match format {
        ToolFormat::Qwen => (QWEN_TOOLS_HEAD, QWEN_TOOLS_TAIL),
        ToolFormat::Qwen35 => (QWEN35_TOOLS_HEAD, QWEN35_TOOLS_TAIL),
    }
}

/// The text appended to the system prompt for `tools` (JSON objects); empty for an empty list.
pub fn tool_text(format: ToolFormat, tools: &[Value]) -> String {
    if tools.is_empty() {
        return String::new();
    }
    let is_function = |t: &Value| t.get("type").and_then(Value::as_str) == Some("function");
    let mut lines = String::new();
    for t in tools {
        lines.push('\n');
        match format {
            // Bare definitions are wrapped as OpenAI function tools.
            ToolFormat::Qwen if is_function(t) => lines.push_str(&py_json(t)),
            ToolFormat::Qwen => lines.push_str(&format!("{{\"type\": \"function\", \"function\": {}}}", py_json(t))),
            // Wrapped definitions are unwrapped (a wrapper without `function` stays as it is).
            ToolFormat::Qwen35 => lines.push_str(&py_json(t.get("function").filter(|_| is_function(t)).unwrap_or(t))),
        }
    }
    let (head, tail) = tool_text_frame(format);
    format!("{head}{lines}{tail}")
}

/// The text of a `function_call` turn (before the assistant's end), or why the content is not a tool call.
///
/// The content is a call `{"name", "arguments"}` or a list of them, as JSON. Text around it survives as
/// LLaMA-Factory keeps it: with a `<tool_call>...</tool_call>` pair only the first pair's inside is parsed and
/// the rest of the text goes before the calls; otherwise a think block is moved in front of the calls.
pub fn function_text(format: ToolFormat, content: &str) -> Result<String, String> {
    let (before, json) = if let Some((whole, inside)) = first_pair(content, TOOL_CALL) {
        (content.replace(whole, ""), inside.to_string())
    } else if let Some((whole, _)) = first_pair(content, THINK) {
        (whole.to_string(), content.replace(whole, ""))
    } else {
        (String::new(), content.to_string())
    };
    let parsed: Value = serde_json::from_str(&json).map_err(|e| {
        format!(
            "the tool call {} is not valid JSON ({e}); write it as {{\"name\": \"tool_name\", \"arguments\": {{...}}}} \
             or a list of such calls",
            excerpt(&json)
        )
    })?;
    let calls = match parsed {
        Value::Array(calls) => calls,
        one => vec![one],
    };
    let mut texts = Vec::with_capacity(calls.len());
    for (k, call) in calls.iter().enumerate() {
        let (Some(name), Some(args)) = (call.get("name"), call.get("arguments")) else {
            return Err(format!(
                "tool call {k} {} is not an object with `name` and `arguments`; write it as {{\"name\": \
                 \"tool_name\", \"arguments\": {{...}}}}",
                excerpt(&py_json(call))
            ));
        };
        // LLaMA-Factory would write any JSON value as the name; only a string can be one.
        let Value::String(name) = name else {
            return Err(format!("tool call {k}: `name` must be a string, got {}", py_json(name)));
        };
        texts.push(match format {
            ToolFormat::Qwen => {
                format!(
                    "<tool_call>\n{{\"name\": {}, \"arguments\": {}}}\n</tool_call>",
                    py_json_str(name),
                    py_json(args)
                )
            }
            ToolFormat::Qwen35 => {
                let Value::Object(args) = args else {
                    let hint = if args.is_string() { " (write the object itself, not its JSON text)" } else { "" };
                    return Err(format!(
                        "tool call {k} (`{name}`): this template writes each argument as a <parameter=...> block, so \
                         `arguments` must be a JSON object, got {}{hint}",
                        excerpt(&py_json(args))
                    ));
                };
                let mut t = format!("<tool_call>\n<function={name}>");
                for (key, value) in args {
                    let value = match value {
                        Value::String(s) => s.clone(),
                        other => py_json(other),
                    };
                    t.push_str(&format!("\n<parameter={key}>\n{value}\n</parameter>"));
                }
                t.push_str("\n</function>\n</tool_call>");
                t
            }
        });
    }
    Ok(before + &texts.join("\n"))
}

/// The first `open ... close` span (shortest, leftmost) and its inside, as LLaMA-Factory's non-greedy regex finds.
fn first_pair<'a>(s: &'a str, (open, close): (&str, &str)) -> Option<(&'a str, &'a str)> {
    let start = s.find(open)?;
    let inner_start = start + open.len();
    let len = s[inner_start..].find(close)?;
    Some((&s[start..inner_start + len + close.len()], &s[inner_start..inner_start + len]))
}

/// The start of `s` on one line, for messages.
fn excerpt(s: &str) -> String {
    const MAX: usize = 80;
    let (text, more) = match s.char_indices().nth(MAX) {
        Some((cut, _)) => (&s[..cut], "..."),
        None => (s, ""),
    };
    format!("`{}{more}`", text.replace('\n', "\\n"))
}

/// `json.dumps(v, ensure_ascii=False)`.
pub fn py_json(v: &Value) -> String {
    let mut out = String::new();
    write_py_json(v, &mut out);
    out
}

fn py_json_str(s: &str) -> String {
    let mut out = String::new();
    write_str(s, &mut out);
    out
}

fn write_py_json(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&py_float(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(k, out);
                out.push_str(": ");
                write_py_json(item, out);
            }
            out.push('}');
        }
    }
}

/// A JSON string with Python's escapes: the two-character ones, `\u00XX` for other control characters, and
/// everything else (non-ASCII included) as it is.
fn write_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest round-trip digits, positional for exponents -4..16, else `d.ddde+XX`.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` writes an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1;
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if (point as usize) >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let sign_e = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{sign_e}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn floats_as_python_repr() {
        // Each pair: the float and Python's repr of it.
        for (f, py) in [
            (1.0, "1.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (2.5, "2.5"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1e15, "1000000000000000.0"),
            (123456789.125, "123456789.125"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (0.00012345, "0.00012345"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (-3.25e-7, "-3.25e-07"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
        ] {
            assert_eq!(py_float(f), py, "{f:e}");
        }
    }

    #[test]
    fn json_as_python_dumps() {
        let v: Value =
            serde_json::from_str(r#"{"b": [1, -2, 3.0, true, null], "a": "é\u0001\"\\/\t\u007f😀", "c": {}}"#).unwrap();
        // json.dumps(v, ensure_ascii=False)
        assert_eq!(
            py_json(&v),
            "{\"b\": [1, -2, 3.0, true, null], \"a\": \"é\\u0001\\\"\\\\/\\t\u{7f}😀\", \"c\": {}}"
        );
    }

    #[test]
    fn tool_call_shapes() {
        let call = r#"{"name": "f", "arguments": {"x": 1, "s": "a\nb"}}"#;
        assert_eq!(
            function_text(ToolFormat::Qwen, call).unwrap(),
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1, \"s\": \"a\\nb\"}}\n</tool_call>"
        );
        assert_eq!(
            function_text(ToolFormat::Qwen35, &format!("[{call}, {call}]")).unwrap(),
            [
                "<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n<parameter=s>\na\nb\n</parameter>\n</function>\n</tool_call>";
                2
            ]
            .join("\n")
        );
        // Text around a <tool_call> pair goes first, and so does a think block.
        assert_eq!(
            function_text(ToolFormat::Qwen, &format!("Checking.<tool_call>{call}</tool_call>!")).unwrap(),
            "Checking.!<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1, \"s\": \"a\\nb\"}}\n</tool_call>"
        );
        assert_eq!(
            function_text(ToolFormat::Qwen35, &format!("{call}<think>\nx\n</think>\n\n")).unwrap(),
            "<think>\nx\n</think>\n\n<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n<parameter=s>\na\nb\n\
             </parameter>\n</function>\n</tool_call>"
        );
        assert_eq!(function_text(ToolFormat::Qwen35, "[]").unwrap(), "");
    }

    #[test]
    fn malformed_tool_calls_say_how_to_write_them() {
        for (content, want) in [
            ("get_weather(city='Paris')", "not valid JSON"),
            ("", "not valid JSON"),
            (r#"{"name": "f"}"#, "not an object with `name` and `arguments`"),
            (r#"["f"]"#, "not an object with `name` and `arguments`"),
        ] {
            let err = function_text(ToolFormat::Qwen, content).unwrap_err();
            assert!(err.contains(want) && err.contains("{\"name\": \"tool_name\", \"arguments\": {...}}"), "{err}");
        }
        let err = function_text(ToolFormat::Qwen, r#"{"name": 3, "arguments": {}}"#).unwrap_err();
        assert!(err.contains("`name` must be a string"), "{err}");
        // The qwen3_5 format needs an object of arguments; the qwen format writes any JSON value.
        let string_args = r#"{"name": "f", "arguments": "{\"x\": 1}"}"#;
        let err = function_text(ToolFormat::Qwen35, string_args).unwrap_err();
        assert!(err.contains("must be a JSON object") && err.contains("not its JSON text"), "{err}");
        assert!(function_text(ToolFormat::Qwen, string_args).unwrap().contains(r#""arguments": "{\"x\": 1}""#));
    }

    #[test]
    fn tool_list_shapes() {
        let bare = json!({"name": "f", "parameters": {}});
        let wrapped = json!({"type": "function", "function": {"name": "g"}});
        let qwen = tool_text(ToolFormat::Qwen, &[bare.clone(), wrapped.clone()]);
        assert!(qwen.contains(
            "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": {}}}\n\
             {\"type\": \"function\", \"function\": {\"name\": \"g\"}}\n</tools>"
        ));
        let qwen35 = tool_text(ToolFormat::Qwen35, &[bare, wrapped]);
        assert!(qwen35.contains("<tools>\n{\"name\": \"f\", \"parameters\": {}}\n{\"name\": \"g\"}\n</tools>"));
        assert_eq!(tool_text(ToolFormat::Qwen35, &[]), "");
    }
}
