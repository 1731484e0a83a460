//! Rows → [`Conversation`]s: LLaMA-Factory's `data/converter.py` (alpaca, sharegpt, openai), except that a bad
//! row is an error with a reason instead of a warning and a silently skipped sample.
//!
//! Choices that differ from LLaMA-Factory, each because the user's intent is clear:
//! - Messages with `role`/`content` keys in a dataset without a `tags` block are read with OpenAI-style tags
//!   (LLaMA-Factory would reject every row as "Invalid role tag"). Decided per dataset from its first row.
//! - A row with N images and no `<image>` placeholder gets N placeholders in front of its first user message, as
//!   LLaMA-Factory's own chat API does for requests; any other count mismatch is an error naming the row.
//! - `images` given as a string is an error (a list is required), not wrapped silently.
//! - The `openai` formatting does not inject the system prompt "detailed thinking off" (a Nemotron quirk of
//!   LLaMA-Factory's converter). Its other system-prompt change is kept: with tools, a system prompt gets a
//!   trailing newline.
//! - `tools` given as an already-parsed list is accepted in every formatting (LLaMA-Factory's template expects
//!   JSON text there and fails on a list, except in the `openai` formatting, which writes it back as text).
//! - `tool_calls` in a sharegpt-formatted dataset is an error naming the openai formatting (LLaMA-Factory
//!   ignores them there and trains the message's text, or fails when there is none).
//! - Rows are used as written. LLaMA-Factory loads them through Arrow, which gives every object of a column
//!   the keys of all objects in that column across the dataset (missing ones as null): tool-call `arguments`
//!   or a parsed `tools` list that differ between rows are rendered with extra `null` keys there.
//!
//! Tool calls: a sharegpt `function_call` turn holds a call `{"name", "arguments"}` or a list of them as JSON
//! text, checked and written by the template ([`crate::template::tools`]). In the `openai` formatting an
//! assistant message with `tool_calls` becomes such a turn holding its calls' `function` objects; its text is
//! dropped, as LLaMA-Factory drops it.

use serde_json::Value;

use super::info::{Columns, DatasetAttr, Formatting, Tags};
use crate::template::tools::py_json;
use crate::template::{Message, Role};

/// The image placeholder in message text (LLaMA-Factory's `IMAGE_PLACEHOLDER` default).
pub const IMAGE_PLACEHOLDER: &str = "<image>";
/// Tokens the image expansion writes; literal occurrences in data would be miscounted.
const RESERVED: [&str; 4] = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"];

/// One training example in a format-independent shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    /// The sample's system prompt (`None` or empty: the template's default).
    pub system: Option<String>,
    /// Alternating user/observation and assistant/function messages, ending with an answer.
    pub messages: Vec<Message>,
    /// Tool definitions (JSON objects) for the system prompt; `Some` even when empty, as an empty list still
    /// gives a system turn in LLaMA-Factory.
    pub tools: Option<Vec<Value>>,
    /// Image paths as written in the row (resolved against media_dir later).
    pub images: Vec<String>,
    /// `<image>` placeholders were added because the row had none.
    pub placeholders_added: bool,
}

/// Converts one row; `Err` is the reason the row cannot be used.
pub fn convert(row: &Value, attr: &DatasetAttr, tags: &Tags) -> Result<Conversation, String> {
    let Value::Object(obj) = row else {
        return Err(format!("a row must be a JSON object, got {}", kind(row)));
    };
    let col = |c: &Option<String>| c.as_ref().and_then(|name| obj.get(name)).filter(|v| !v.is_null());
    let mut conv = match attr.formatting {
        Formatting::Alpaca => alpaca(obj, &attr.columns)?,
        Formatting::Sharegpt | Formatting::Openai => sharegpt(obj, attr, tags)?,
    };
    if let Some(tools) = col(&attr.columns.tools) {
        conv.tools = tool_list(tools, attr.columns.tools.as_deref().unwrap_or("tools"), attr.formatting)?;
    }
    if attr.formatting == Formatting::Openai && conv.tools.is_some() {
        if let Some(system) = conv.system.as_mut().filter(|s| !s.is_empty()) {
            system.push('\n');
        }
    }
    for (what, c) in [("videos", &attr.columns.videos), ("audios", &attr.columns.audios)] {
        if col(c).is_some_and(|v| !matches!(v, Value::Array(a) if a.is_empty())) {
            return Err(format!("{what} are not supported yet (only images)"));
        }
    }
    if let Some(images) = col(&attr.columns.images) {
        conv.images = image_list(images, attr.columns.images.as_deref().unwrap_or("images"))?;
    }
    check_placeholders(&mut conv)?;
    Ok(conv)
}

fn alpaca(obj: &serde_json::Map<String, Value>, c: &Columns) -> Result<Conversation, String> {
    fn get<'a>(obj: &'a serde_json::Map<String, Value>, col: &'a Option<String>) -> Option<(&'a str, &'a Value)> {
        col.as_ref().and_then(|n| obj.get(n).map(|v| (n.as_str(), v)))
    }
    let text = |name: &str, v: &Value| -> Result<String, String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Null => Ok(String::new()),
            other => Err(format!("`{name}` must be a string, got {}", kind(other))),
        }
    };
    let mut messages = Vec::new();
    if let Some((name, Value::Array(turns))) = get(obj, &c.history) {
        for (i, t) in turns.iter().enumerate() {
            match t.as_array().map(Vec::as_slice) {
                Some([Value::String(q), Value::String(a)]) => {
                    messages.push(Message::new(Role::User, q.clone()));
                    messages.push(Message::new(Role::Assistant, a.clone()));
                }
                _ => return Err(format!("`{name}[{i}]` must be a [\"prompt\", \"response\"] pair of strings")),
            }
        }
    }
    // LLaMA-Factory joins the non-empty instruction and input with a newline.
    let mut query = Vec::new();
    for col in [&c.prompt, &c.query] {
        if let Some((name, v)) = get(obj, col) {
            let t = text(name, v)?;
            if !t.is_empty() {
                query.push(t);
            }
        }
    }
    messages.push(Message::new(Role::User, query.join("\n")));
    let response = match get(obj, &c.response) {
        Some((_, Value::String(s))) => s.clone(),
        Some((name, other)) => return Err(format!("`{name}` must be a string, got {}", kind(other))),
        None => return Err(format!("no `{}` (the answer to train on)", c.response.as_deref().unwrap_or("output"))),
    };
    messages.push(Message::new(Role::Assistant, response));
    let system = match get(obj, &c.system) {
        Some((name, v)) => Some(text(name, v)?),
        None => None,
    };
    Ok(Conversation { system, messages, tools: None, images: Vec::new(), placeholders_added: false })
}

fn sharegpt(obj: &serde_json::Map<String, Value>, attr: &DatasetAttr, tags: &Tags) -> Result<Conversation, String> {
    let col_name = attr.columns.messages.as_deref().unwrap_or("conversations");
    let raw = match obj.get(col_name) {
        Some(Value::Array(m)) => m,
        Some(other) => return Err(format!("`{col_name}` must be a list of messages, got {}", kind(other))),
        None => return Err(format!("no `{col_name}` list (dataset_info.json columns.messages)")),
    };
    let role_tag = tags.role.as_deref().unwrap_or("from");
    let content_tag = tags.content.as_deref().unwrap_or("value");
    // (index, role, content, is a tool call) of each message, validated.
    let mut items = Vec::with_capacity(raw.len());
    for (i, m) in raw.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(format!("`{col_name}[{i}]` must be an object, got {}", kind(m)));
        };
        let role = match m.get(role_tag) {
            Some(Value::String(r)) => r.as_str(),
            _ => {
                return Err(format!(
                    "`{col_name}[{i}]` has no `{role_tag}`{}",
                    if m.contains_key("role") || m.contains_key("from") {
                        " (this dataset's messages mix role/content and from/value keys)"
                    } else {
                        ""
                    }
                ))
            }
        };
        let answers = |role: &str| tags.assistant.as_deref() == Some(role) || tags.function.as_deref() == Some(role);
        if answers(role) {
            if let Some(calls) = tool_calls(m.get("tool_calls"), &format!("{col_name}[{i}].tool_calls"))? {
                if attr.formatting != Formatting::Openai {
                    return Err(format!(
                        "`{col_name}[{i}]` has `tool_calls`, which only the openai formatting reads; set \
                         \"formatting\": \"openai\" for this dataset in dataset_info.json"
                    ));
                }
                items.push((i, role.to_string(), calls, true));
                continue;
            }
        }
        let content = match m.get(content_tag) {
            Some(Value::String(c)) => c.clone(),
            Some(Value::Null) | None if attr.formatting == Formatting::Openai && m.contains_key("tool_calls") => {
                String::new()
            }
            Some(other) => {
                return Err(format!(
                    "`{col_name}[{i}].{content_tag}` must be a string, got {} (content parts are not part of \
                     LLaMA-Factory's data format; write text with `<image>` placeholders)",
                    kind(other)
                ))
            }
            None => return Err(format!("`{col_name}[{i}]` has no `{content_tag}`")),
        };
        items.push((i, role.to_string(), content, false));
    }
    let is = |tag: &Option<String>, role: &str| tag.as_deref() == Some(role);
    let mut system = None;
    let mut start = 0;
    if let Some((_, role, content, _)) = items.first() {
        if is(&tags.system, role) {
            system = Some(content.clone());
            start = 1;
        }
    }
    if system.is_none() {
        if let Some(name) = &attr.columns.system {
            match obj.get(name) {
                Some(Value::String(s)) => system = Some(s.clone()),
                None | Some(Value::Null) => {}
                Some(other) => return Err(format!("`{name}` must be a string, got {}", kind(other))),
            }
        }
    }
    let mut messages = Vec::new();
    let mut pending_tool: Vec<String> = Vec::new();
    for (i, role, content, is_call) in items.into_iter().skip(start) {
        // The openai formatting merges consecutive tool results into one observation turn.
        if attr.formatting == Formatting::Openai && (role == "tool" || is(&tags.observation, &role)) {
            pending_tool.push(content);
            continue;
        }
        if !pending_tool.is_empty() {
            let merged = pending_tool.join("\n</tool_response>\n<tool_response>\n");
            messages.push(Message::new(Role::Observation, merged));
            pending_tool.clear();
        }
        let role = if is_call {
            Role::Function
        } else if is(&tags.user, &role) {
            Role::User
        } else if is(&tags.assistant, &role) {
            Role::Assistant
        } else if is(&tags.observation, &role) {
            Role::Observation
        } else if is(&tags.function, &role) {
            Role::Function
        } else if is(&tags.system, &role) {
            return Err(format!("`{col_name}[{i}]`: a system message is only allowed first"));
        } else {
            let known: Vec<&str> = [&tags.user, &tags.assistant, &tags.observation, &tags.function, &tags.system]
                .into_iter()
                .filter_map(|t| t.as_deref())
                .collect();
            return Err(format!(
                "`{col_name}[{i}]`: unknown role `{role}` (this dataset's roles: {})",
                known.join(", ")
            ));
        };
        messages.push(Message { role, content });
    }
    if !pending_tool.is_empty() {
        messages.push(Message::new(Role::Observation, pending_tool.join("\n</tool_response>\n<tool_response>\n")));
    }
    // Turns alternate: user/observation at even positions, assistant/function at odd ones.
    for (pos, m) in messages.iter().enumerate() {
        let ok = if pos % 2 == 0 {
            matches!(m.role, Role::User | Role::Observation)
        } else {
            matches!(m.role, Role::Assistant | Role::Function)
        };
        if !ok {
            let want = if pos % 2 == 0 { "a user message" } else { "an assistant message" };
            return Err(format!("message {} is {:?} where {want} must be (turns must alternate)", pos + start, m.role));
        }
    }
    if messages.is_empty() {
        return Err(format!("`{col_name}` has no messages"));
    }
    if messages.len() % 2 != 0 {
        return Err(format!("{} messages: the conversation must end with an assistant answer", messages.len()));
    }
    Ok(Conversation { system, messages, tools: None, images: Vec::new(), placeholders_added: false })
}

/// The `tools` column: `None` for no tools (absent, or empty text), else the tool definitions.
fn tool_list(v: &Value, name: &str, formatting: Formatting) -> Result<Option<Vec<Value>>, String> {
    const FIX: &str = "write a list of tool definitions, [{\"name\": ..., \"description\": ..., \"parameters\": \
                       {...}}] (each may also be wrapped as {\"type\": \"function\", \"function\": {...}})";
    let list = match v {
        Value::String(s) if s.is_empty() => return Ok(None),
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Array(list)) => list,
            Ok(other) => return Err(format!("`{name}` holds {} where a list belongs; {FIX}", kind(&other))),
            Err(e) => return Err(format!("`{name}` is not valid JSON ({e}); {FIX}")),
        },
        // The openai converter writes a list back as text, so there even an empty list opens a system turn.
        Value::Array(list) if list.is_empty() && formatting != Formatting::Openai => return Ok(None),
        Value::Array(list) => list.clone(),
        other => return Err(format!("`{name}` must be a list (or its JSON text), got {}; {FIX}", kind(other))),
    };
    for (i, t) in list.iter().enumerate() {
        if !t.is_object() {
            return Err(format!("`{name}[{i}]` must be an object, got {}; {FIX}", kind(t)));
        }
    }
    let text = py_json(&Value::Array(list.clone()));
    if let Some(tok) = RESERVED.iter().find(|t| text.contains(*t)) {
        return Err(format!("`{name}` contains the reserved token {tok}"));
    }
    Ok(Some(list))
}

/// An openai message's `tool_calls` as the content of a function_call turn: the JSON list of their `function`
/// objects. `None` when there are none (absent, null or empty, which LLaMA-Factory treats alike).
fn tool_calls(v: Option<&Value>, name: &str) -> Result<Option<String>, String> {
    let calls = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(calls)) if calls.is_empty() => return Ok(None),
        Some(Value::Array(calls)) => calls,
        Some(other) => return Err(format!("`{name}` must be a list of tool calls, got {}", kind(other))),
    };
    let functions = calls
        .iter()
        .enumerate()
        .map(|(k, c)| {
            c.get("function").cloned().ok_or_else(|| {
                format!(
                    "`{name}[{k}]` has no `function`; write each call as {{\"type\": \"function\", \"function\": \
                     {{\"name\": ..., \"arguments\": {{...}}}}}}"
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(py_json(&Value::Array(functions))))
}

/// The `images` column: a list of paths (or `{"path": ...}` objects).
fn image_list(v: &Value, name: &str) -> Result<Vec<String>, String> {
    match v {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                Value::Object(o) => o
                    .get("path")
                    .and_then(Value::as_str)
                    .map(String::from)
                    .ok_or_else(|| format!("`{name}[{i}]` must be a path string or {{\"path\": ...}}")),
                other => Err(format!("`{name}[{i}]` must be a path string, got {}", kind(other))),
            })
            .collect(),
        Value::String(s) => Err(format!(
            "`{name}` is a string; it must be a list, even for one image: \"{name}\": [{}]",
            serde_json::to_string(s).unwrap_or_default()
        )),
        other => Err(format!("`{name}` must be a list of image paths, got {}", kind(other))),
    }
}

/// Validates `<image>` placeholders against the image list, adding them when the row has none.
fn check_placeholders(conv: &mut Conversation) -> Result<(), String> {
    for (i, m) in conv.messages.iter().enumerate() {
        if let Some(tok) = RESERVED.iter().find(|t| m.content.contains(*t)) {
            return Err(format!("message {i} contains the reserved token {tok}; use `{IMAGE_PLACEHOLDER}` for images"));
        }
        if matches!(m.role, Role::Assistant | Role::Function) && m.content.contains(IMAGE_PLACEHOLDER) {
            return Err(format!(
                "message {i} (an answer) contains `{IMAGE_PLACEHOLDER}`; images belong in user messages"
            ));
        }
    }
    if conv.system.as_deref().is_some_and(|s| s.contains(IMAGE_PLACEHOLDER)) {
        return Err(format!("the system prompt contains `{IMAGE_PLACEHOLDER}`; images belong in user messages"));
    }
    let placeholders: usize = conv.messages.iter().map(|m| m.content.matches(IMAGE_PLACEHOLDER).count()).sum();
    let images = conv.images.len();
    if placeholders == images {
        return Ok(());
    }
    if placeholders == 0 {
        if let Some(first_user) = conv.messages.iter_mut().find(|m| m.role == Role::User) {
            first_user.content = format!("{}{}", IMAGE_PLACEHOLDER.repeat(images), first_user.content);
            conv.placeholders_added = true;
            return Ok(());
        }
    }
    Err(format!(
        "{images} image{} but {placeholders} `{IMAGE_PLACEHOLDER}` placeholder{} in the messages; each image needs one \
         placeholder where it belongs in the text",
        if images == 1 { "" } else { "s" },
        if placeholders == 1 { "" } else { "s" }
    ))
}

/// Whether a dataset's rows use OpenAI-style `role`/`content` messages (looked up in its first usable row).
pub fn uses_role_content<'a>(rows: impl IntoIterator<Item = &'a Value>, attr: &DatasetAttr) -> bool {
    let col = attr.columns.messages.as_deref().unwrap_or("conversations");
    rows.into_iter()
        .find_map(|r| r.get(col)?.as_array()?.first()?.as_object().cloned())
        .is_some_and(|m| m.contains_key("role") && m.contains_key("content") && !m.contains_key("from"))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attr(formatting: Formatting) -> DatasetAttr {
        let columns =
            Columns { images: Some("images".into()), messages: Some("messages".into()), ..Columns::default() };
        DatasetAttr {
            name: "t".into(),
            files: vec![],
            formatting,
            num_samples: None,
            columns,
            tags: Tags::default(),
            tags_given: false,
            origin: String::new(),
        }
    }

    #[test]
    fn reference_row_shape() {
        let row = json!({"messages": [{"role": "user", "content": "describe"}, {"role": "assistant", "content": "a robot"}],
                         "images": ["robot_001.png"]});
        let c = convert(&row, &attr(Formatting::Sharegpt), &Tags::openai()).unwrap();
        assert_eq!(c.messages[0].content, "<image>describe");
        assert!(c.placeholders_added);
        assert_eq!(c.images, vec!["robot_001.png"]);
    }

    #[test]
    fn string_images_is_an_error() {
        let row = json!({"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}],
                         "images": "robot.png"});
        let err = convert(&row, &attr(Formatting::Sharegpt), &Tags::openai()).unwrap_err();
        assert!(err.contains("must be a list") && err.contains("[\"robot.png\"]"), "{err}");
    }

    #[test]
    fn count_mismatch() {
        let row = json!({"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}],
                         "images": ["a.png", "b.png"]});
        let err = convert(&row, &attr(Formatting::Sharegpt), &Tags::openai()).unwrap_err();
        assert!(err.contains("2 images but 1"), "{err}");
    }

    #[test]
    fn alternation_and_system() {
        let t = Tags::default();
        let row = json!({"messages": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                                      {"from": "gpt", "value": "a"}]});
        let c = convert(&row, &attr(Formatting::Sharegpt), &t).unwrap();
        assert_eq!(c.system.as_deref(), Some("S"));
        let row = json!({"messages": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]});
        assert!(convert(&row, &attr(Formatting::Sharegpt), &t).unwrap_err().contains("alternate"));
        let row = json!({"messages": [{"from": "human", "value": "q"}]});
        assert!(convert(&row, &attr(Formatting::Sharegpt), &t).unwrap_err().contains("end with an assistant"));
    }

    #[test]
    fn tools_column() {
        let mut a = attr(Formatting::Sharegpt);
        a.columns.tools = Some("tools".into());
        let t = Tags::openai();
        let row = |tools: Value| {
            json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                   "tools": tools})
        };
        let tools = |v: Value, a: &DatasetAttr| convert(&row(v), a, &t).map(|c| c.tools);
        // LLaMA-Factory: empty text is no tools; "[]" is tools (a system turn, with no tool text).
        assert_eq!(tools(json!(""), &a).unwrap(), None);
        assert_eq!(tools(json!("[]"), &a).unwrap(), Some(vec![]));
        assert_eq!(tools(json!([]), &a).unwrap(), None);
        assert_eq!(tools(json!("[{\"name\": \"f\"}]"), &a).unwrap(), Some(vec![json!({"name": "f"})]));
        assert_eq!(tools(json!([{"name": "f"}]), &a).unwrap(), Some(vec![json!({"name": "f"})]));
        for (bad, want) in [
            (json!("{\"name\": \"f\"}"), "`tools` holds an object where a list belongs"),
            (json!("f(x)"), "`tools` is not valid JSON"),
            (json!(["f"]), "`tools[0]` must be an object"),
            (json!(3), "`tools` must be a list"),
        ] {
            let err = tools(bad, &a).unwrap_err();
            assert!(err.contains(want) && err.contains("[{\"name\": ..."), "{err}");
        }
        // The openai converter writes a parsed list back as text (so even an empty one counts) and adds a
        // newline to a system prompt when there are tools.
        a.formatting = Formatting::Openai;
        assert_eq!(tools(json!([]), &a).unwrap(), Some(vec![]));
        let mut r = row(json!([{"name": "f"}]));
        r["messages"].as_array_mut().unwrap().insert(0, json!({"role": "system", "content": "S"}));
        assert_eq!(convert(&r, &a, &t).unwrap().system.as_deref(), Some("S\n"));
        r["tools"] = json!("");
        assert_eq!(convert(&r, &a, &t).unwrap().system.as_deref(), Some("S"));
    }

    #[test]
    fn openai_tool_calls() {
        let a = attr(Formatting::Openai);
        let t = Tags::openai();
        let call = json!({"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1.5}}});
        let row = |assistant: Value| {
            json!({"messages": [{"role": "user", "content": "q"}, assistant, {"role": "tool", "content": "r"},
                                {"role": "assistant", "content": "done"}]})
        };
        // The calls' `function` objects as JSON text; the message's own text is dropped.
        let c =
            convert(&row(json!({"role": "assistant", "content": "Let me see.", "tool_calls": [call, call]})), &a, &t)
                .unwrap();
        assert_eq!(c.messages[1].role, Role::Function);
        assert_eq!(
            c.messages[1].content,
            r#"[{"name": "f", "arguments": {"x": 1.5}}, {"name": "f", "arguments": {"x": 1.5}}]"#
        );
        assert_eq!(c.messages[2], Message::new(Role::Observation, "r"));
        // No calls: an ordinary answer.
        let c = convert(&row(json!({"role": "assistant", "content": "Hm.", "tool_calls": []})), &a, &t).unwrap();
        assert_eq!(c.messages[1], Message::new(Role::Assistant, "Hm."));
        let err = convert(&row(json!({"role": "assistant", "tool_calls": [{"id": "c1"}]})), &a, &t).unwrap_err();
        assert!(err.contains("`messages[1].tool_calls[0]` has no `function`"), "{err}");
        let err = convert(&row(json!({"role": "assistant", "tool_calls": "f()"})), &a, &t).unwrap_err();
        assert!(err.contains("must be a list of tool calls"), "{err}");
        let sharegpt = attr(Formatting::Sharegpt);
        let err = convert(&row(json!({"role": "assistant", "content": "", "tool_calls": [call]})), &sharegpt, &t)
            .unwrap_err();
        assert!(err.contains("only the openai formatting reads"), "{err}");
    }

    #[test]
    fn alpaca_rows() {
        let row = json!({"instruction": "Do", "input": "this", "output": "done", "history": [["q", "a"]]});
        let mut a = attr(Formatting::Alpaca);
        a.columns = Columns { history: Some("history".into()), ..Columns::default() };
        let c = convert(&row, &a, &Tags::default()).unwrap();
        assert_eq!(c.messages.len(), 4);
        assert_eq!(c.messages[2].content, "Do\nthis");
        let err = convert(&json!({"instruction": "x"}), &a, &Tags::default()).unwrap_err();
        assert!(err.contains("no `output`"), "{err}");
    }
}
