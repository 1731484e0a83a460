//! `POST /v1/chat/completions` request bodies, read field by field so every wrong type is a 400 that names the
//! field (`param`), unknown fields are ignored as OpenAI ignores them, and fields the server cannot honour
//! (logprobs, n > 1, ...) are refused instead of silently dropped.

use serde_json::{Map, Value};

use super::error::ApiError;

/// One image to resolve: its URL and where it sits in the request (for error messages).
#[derive(Clone, Debug)]
pub struct ImageRef {
    pub url: String,
    pub param: String,
}

#[derive(Clone, Debug, Default)]
pub struct ChatRequest {
    /// The model asked for: the base's served name or an adapter's.
    pub model: Option<String>,
    /// Messages in transformers' chat format (content a string or `text` / `image` parts), consecutive
    /// same-role messages merged.
    pub messages: Vec<Value>,
    /// The images of the `image` parts, in order.
    pub images: Vec<ImageRef>,
    /// The last message is an assistant prefix to continue.
    pub continue_final: bool,
    pub stream: bool,
    pub include_usage: bool,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub enable_thinking: Option<bool>,
    /// Other chat-template variables from `chat_template_kwargs`.
    pub template_kwargs: Map<String, Value>,
    /// Function tools as OpenAI sends them (`{"type": "function", "function": {name, description, parameters}}`).
    pub tools: Vec<Value>,
    pub tool_choice: ToolChoice,
    /// false: at most one tool call per answer (later call blocks stay text).
    pub parallel_tool_calls: bool,
}

/// OpenAI's `tool_choice`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model answers in text; tool-call blocks it writes anyway stay text.
    None,
    /// The model decides (the default with tools).
    #[default]
    Auto,
    /// The answer is a tool call.
    Required,
    /// The answer is a call of this function.
    Function(String),
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(param: &str, want: &str, got: &Value) -> ApiError {
    ApiError::bad(format!("'{param}' must be {want}, got {}", type_name(got))).param(param).code("invalid_type")
}

/// A field's value, absent when missing or null.
fn field<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

fn number(o: &Map<String, Value>, k: &str) -> Result<Option<f64>, ApiError> {
    match field(o, k) {
        None => Ok(None),
        Some(v) => v.as_f64().filter(|x| x.is_finite()).map(Some).ok_or_else(|| wrong_type(k, "a number", v)),
    }
}

fn integer(o: &Map<String, Value>, k: &str) -> Result<Option<i64>, ApiError> {
    match field(o, k) {
        None => Ok(None),
        Some(v) => match v.as_i64() {
            Some(i) => Ok(Some(i)),
            // 5.0 is an integer to JSON Schema, as OpenAI's validator takes it.
            None => match v.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
                _ => Err(wrong_type(k, "an integer", v)),
            },
        },
    }
}

fn boolean(o: &Map<String, Value>, k: &str) -> Result<Option<bool>, ApiError> {
    match field(o, k) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| wrong_type(k, "a boolean", v)),
    }
}

fn in_range(k: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => {
            Err(ApiError::bad(format!("'{k}' must be between {lo} and {hi}, got {x}")).param(k).code("invalid_value"))
        }
        _ => Ok(v),
    }
}

impl ChatRequest {
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad(format!("the request body is not valid JSON: {e}")).code("invalid_json"))?;
        let Value::Object(o) = v else {
            return Err(ApiError::bad(format!("the request body must be a JSON object, got {}", type_name(&v)))
                .code("invalid_json"));
        };
        let mut r = ChatRequest::default();
        if let Some(m) = field(&o, "model") {
            let Some(m) = m.as_str() else { return Err(wrong_type("model", "a string", m)) };
            r.model = Some(m.to_string());
        }
        r.stream = boolean(&o, "stream")?.unwrap_or(false);
        if let Some(so) = field(&o, "stream_options") {
            let so = so.as_object().ok_or_else(|| wrong_type("stream_options", "an object", so))?;
            r.include_usage =
                boolean(so, "include_usage").map_err(|e| e.param("stream_options.include_usage"))? == Some(true);
        }
        r.temperature = in_range("temperature", number(&o, "temperature")?, 0.0, 100.0)?;
        r.top_p = number(&o, "top_p")?;
        if let Some(p) = r.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::bad(format!("'top_p' must be in (0, 1], got {p}")).param("top_p"));
            }
        }
        r.top_k = match integer(&o, "top_k")? {
            None => None,
            Some(k) if k <= 0 => Some(0), // -1 (vLLM) and 0 both mean "no top-k"
            Some(k) => Some(k as usize),
        };
        r.seed = integer(&o, "seed")?.map(|s| s as u64);
        let max_completion = integer(&o, "max_completion_tokens")?;
        let max = max_completion.or(integer(&o, "max_tokens")?);
        if let Some(m) = max {
            if m < 1 {
                let k = if max_completion.is_some() { "max_completion_tokens" } else { "max_tokens" };
                return Err(ApiError::bad(format!("'{k}' must be at least 1, got {m}")).param(k).code("invalid_value"));
            }
            r.max_tokens = Some(m as usize);
        }
        r.stop = match field(&o, "stop") {
            None => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    s.as_str().map(str::to_owned).ok_or_else(|| wrong_type(&format!("stop[{i}]"), "a string", s))
                })
                .collect::<Result<_, _>>()?,
            Some(v) => return Err(wrong_type("stop", "a string or an array of strings", v)),
        };
        r.stop.retain(|s| !s.is_empty());
        r.presence_penalty = in_range("presence_penalty", number(&o, "presence_penalty")?, -2.0, 2.0)?;
        r.frequency_penalty = in_range("frequency_penalty", number(&o, "frequency_penalty")?, -2.0, 2.0)?;
        r.repetition_penalty = number(&o, "repetition_penalty")?;
        if let Some(p) = r.repetition_penalty {
            if p <= 0.0 {
                return Err(ApiError::bad(format!("'repetition_penalty' must be positive, got {p}"))
                    .param("repetition_penalty"));
            }
        }
        if let Some(n) = integer(&o, "n")? {
            if n != 1 {
                return Err(ApiError::bad(format!(
                    "'n' = {n}: this server returns one choice per request; send n = 1"
                ))
                .param("n")
                .code("unsupported_value"));
            }
        }
        r.enable_thinking = boolean(&o, "enable_thinking")?;
        if let Some(kw) = field(&o, "chat_template_kwargs") {
            let kw = kw.as_object().ok_or_else(|| wrong_type("chat_template_kwargs", "an object", kw))?;
            for (k, v) in kw {
                match k.as_str() {
                    "enable_thinking" => {
                        r.enable_thinking =
                            boolean(kw, k).map_err(|e| e.param("chat_template_kwargs.enable_thinking"))?
                    }
                    // The server owns these: letting a request set them would break the prompt it builds.
                    "messages" | "add_generation_prompt" => {}
                    _ => {
                        r.template_kwargs.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        refuse_unsupported(&o)?;
        r.parse_tools(&o)?;
        r.parse_messages(&o)?;
        Ok(r)
    }

    fn parse_tools(&mut self, o: &Map<String, Value>) -> Result<(), ApiError> {
        self.tools = match field(o, "tools") {
            None => vec![],
            Some(Value::Array(a)) => a.clone(),
            Some(v) => return Err(wrong_type("tools", "an array", v)),
        };
        for (i, t) in self.tools.iter().enumerate() {
            let p = format!("tools[{i}]");
            let t = t.as_object().ok_or_else(|| wrong_type(&p, "an object", t))?;
            match field(t, "type") {
                Some(Value::String(ty)) if ty == "function" => {}
                Some(v) => {
                    return Err(ApiError::bad(format!("'{p}.type' must be \"function\", got {v}"))
                        .param(format!("{p}.type"))
                        .code("unsupported_value"))
                }
                None => return Err(ApiError::bad(format!("'{p}.type' is required")).param(format!("{p}.type"))),
            }
            let f = match field(t, "function") {
                Some(Value::Object(f)) => f,
                Some(v) => return Err(wrong_type(&format!("{p}.function"), "an object", v)),
                None => return Err(ApiError::bad(format!("'{p}.function' is required")).param(format!("{p}.function"))),
            };
            match field(f, "name") {
                Some(Value::String(n)) if !n.is_empty() => {}
                _ => {
                    return Err(ApiError::bad(format!("'{p}.function.name' must be a non-empty string"))
                        .param(format!("{p}.function.name")))
                }
            }
            if let Some(v) = field(f, "parameters").filter(|v| !v.is_object()) {
                return Err(wrong_type(&format!("{p}.function.parameters"), "an object (a JSON Schema)", v));
            }
        }
        let names: Vec<&str> = self.tools.iter().filter_map(|t| t["function"]["name"].as_str()).collect();
        self.tool_choice = match field(o, "tool_choice") {
            None => ToolChoice::Auto,
            Some(Value::String(c)) => match c.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(ApiError::bad(format!(
                        "'tool_choice' = {other:?}; expected \"none\", \"auto\", \"required\" or \
                         {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                    ))
                    .param("tool_choice"))
                }
            },
            Some(Value::Object(c)) => match c.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
                Some(n) => ToolChoice::Function(n.to_string()),
                None => {
                    return Err(
                        ApiError::bad("'tool_choice.function.name' is required").param("tool_choice.function.name")
                    )
                }
            },
            Some(v) => return Err(wrong_type("tool_choice", "a string or an object", v)),
        };
        match &self.tool_choice {
            ToolChoice::Required if self.tools.is_empty() => {
                return Err(ApiError::bad("'tool_choice' is \"required\" but no 'tools' are given").param("tool_choice"))
            }
            ToolChoice::Function(n) if !names.contains(&n.as_str()) => {
                return Err(ApiError::bad(format!(
                    "'tool_choice' names the function `{n}`, which is not among 'tools' ({})",
                    names.join(", ")
                ))
                .param("tool_choice.function.name"))
            }
            _ => {}
        }
        self.parallel_tool_calls = boolean(o, "parallel_tool_calls")?.unwrap_or(true);
        Ok(())
    }

    fn parse_messages(&mut self, o: &Map<String, Value>) -> Result<(), ApiError> {
        let msgs = match o.get("messages") {
            None | Some(Value::Null) => {
                return Err(ApiError::bad("'messages' is required")
                    .param("messages")
                    .code("missing_required_parameter"))
            }
            Some(Value::Array(a)) if a.is_empty() => {
                return Err(ApiError::bad("'messages' must not be empty").param("messages"))
            }
            Some(Value::Array(a)) => a,
            Some(v) => return Err(wrong_type("messages", "an array", v)),
        };
        let mut out: Vec<Value> = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let p = format!("messages[{i}]");
            let m = m.as_object().ok_or_else(|| wrong_type(&p, "an object", m))?;
            let role = match field(m, "role") {
                Some(Value::String(s)) => s.as_str(),
                Some(v) => return Err(wrong_type(&format!("{p}.role"), "a string", v)),
                None => return Err(ApiError::bad(format!("'{p}.role' is required")).param(format!("{p}.role"))),
            };
            let role = match role {
                "system" | "developer" => "system",
                "user" | "assistant" | "tool" => role,
                other => {
                    return Err(ApiError::bad(format!(
                        "'{p}.role' = {other:?}; expected system, developer, user, assistant or tool"
                    ))
                    .param(format!("{p}.role")))
                }
            };
            let content = self.content(field(m, "content"), &p, role)?;
            let mut msg = Map::new();
            msg.insert("role".into(), role.into());
            msg.insert("content".into(), content);
            // What Qwen's template reads besides role and content.
            for k in ["tool_calls", "tool_call_id", "name", "reasoning_content"] {
                if let Some(v) = field(m, k) {
                    msg.insert(k.into(), v.clone());
                }
            }
            if let Some(tc) = msg.get_mut("tool_calls") {
                normalize_tool_calls(tc, &p)?;
            }
            match out.last_mut() {
                Some(prev) if mergeable(prev, &msg) => merge_into(prev, msg),
                _ => out.push(Value::Object(msg)),
            }
        }
        let last = out.last().and_then(|m| m.get("role")).and_then(Value::as_str);
        self.continue_final = last == Some("assistant");
        if last == Some("system") {
            return Err(ApiError::bad("the conversation has no user message after the system prompt").param("messages"));
        }
        self.messages = out;
        Ok(())
    }

    /// A message's content in transformers' shape: a string, or `text` / `image` parts.
    fn content(&mut self, v: Option<&Value>, p: &str, role: &str) -> Result<Value, ApiError> {
        match v {
            None => Ok(Value::String(String::new())),
            Some(Value::String(s)) => Ok(Value::String(s.clone())),
            Some(Value::Array(parts)) => {
                let mut out = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    let pp = format!("{p}.content[{j}]");
                    let part = part.as_object().ok_or_else(|| wrong_type(&pp, "an object", part))?;
                    let ty = match field(part, "type") {
                        Some(Value::String(t)) => t.as_str(),
                        Some(v) => return Err(wrong_type(&format!("{pp}.type"), "a string", v)),
                        None => {
                            return Err(ApiError::bad(format!("'{pp}.type' is required")).param(format!("{pp}.type")))
                        }
                    };
                    match ty {
                        "text" | "input_text" => {
                            let t = match field(part, "text") {
                                Some(Value::String(t)) => t.clone(),
                                Some(v) => return Err(wrong_type(&format!("{pp}.text"), "a string", v)),
                                None => {
                                    return Err(
                                        ApiError::bad(format!("'{pp}.text' is required")).param(format!("{pp}.text"))
                                    )
                                }
                            };
                            out.push(serde_json::json!({"type": "text", "text": t}));
                        }
                        "image_url" | "input_image" => {
                            if role == "assistant" {
                                return Err(ApiError::bad(format!("'{pp}': assistant messages cannot hold images"))
                                    .param(format!("{pp}.type")));
                            }
                            // {"image_url": {"url": ...}} as OpenAI sends it; a bare string as some clients do.
                            let url = match field(part, "image_url") {
                                Some(Value::String(u)) => u.clone(),
                                Some(Value::Object(iu)) => match field(iu, "url") {
                                    Some(Value::String(u)) => u.clone(),
                                    Some(v) => return Err(wrong_type(&format!("{pp}.image_url.url"), "a string", v)),
                                    None => {
                                        return Err(ApiError::bad(format!("'{pp}.image_url.url' is required"))
                                            .param(format!("{pp}.image_url.url")))
                                    }
                                },
                                Some(v) => return Err(wrong_type(&format!("{pp}.image_url"), "an object", v)),
                                None => {
                                    return Err(ApiError::bad(format!("'{pp}.image_url' is required"))
                                        .param(format!("{pp}.image_url")))
                                }
                            };
                            self.images.push(ImageRef { url, param: format!("{pp}.image_url.url") });
                            out.push(serde_json::json!({"type": "image"}));
                        }
                        other => {
                            return Err(ApiError::bad(format!(
                                "'{pp}.type' = {other:?} is not supported; use \"text\" or \"image_url\""
                            ))
                            .param(format!("{pp}.type"))
                            .code("unsupported_content_type"))
                        }
                    }
                }
                Ok(Value::Array(out))
            }
            Some(v) => Err(wrong_type(&format!("{p}.content"), "a string or an array of content parts", v)),
        }
    }
}

/// Fields OpenAI defines that this server cannot honour: refused, so a client never gets silently different
/// behaviour.
fn refuse_unsupported(o: &Map<String, Value>) -> Result<(), ApiError> {
    let refuse =
        |k: &str, why: &str| Err(ApiError::bad(format!("'{k}': {why}")).param(k).code("unsupported_parameter"));
    // The deprecated function-calling fields: silently ignored they would make calls vanish.
    for k in ["functions", "function_call"] {
        if field(o, k).is_some() {
            return refuse(
                k,
                "the deprecated function-calling fields are not supported; send 'tools' and 'tool_choice'",
            );
        }
    }
    if boolean(o, "logprobs")? == Some(true) || field(o, "top_logprobs").is_some() {
        return refuse("logprobs", "log probabilities are not supported yet");
    }
    if field(o, "logit_bias").and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
        return refuse("logit_bias", "not supported yet");
    }
    if let Some(rf) = field(o, "response_format") {
        let ty = rf.get("type").and_then(Value::as_str);
        if ty != Some("text") {
            return refuse("response_format", "only {\"type\": \"text\"} is supported (no JSON mode or schemas yet)");
        }
    }
    Ok(())
}

/// Qwen's template reads `tool_calls[].function.arguments` as a mapping; OpenAI sends it as a JSON string.
fn normalize_tool_calls(tc: &mut Value, p: &str) -> Result<(), ApiError> {
    let Value::Array(calls) = tc else { return Err(wrong_type(&format!("{p}.tool_calls"), "an array", tc)) };
    for (k, c) in calls.iter_mut().enumerate() {
        if let Some(args) = c.get_mut("function").and_then(|f| f.get_mut("arguments")) {
            if let Value::String(s) = args {
                *args = serde_json::from_str(s).map_err(|e| {
                    ApiError::bad(format!("'{p}.tool_calls[{k}].function.arguments' is not a JSON object: {e}"))
                        .param(format!("{p}.tool_calls[{k}].function.arguments"))
                })?;
            }
        }
    }
    Ok(())
}

/// Consecutive user, assistant or system messages become one (LLaMA-Factory rejects them); tool results and
/// tool calls stay separate, as the template renders each.
fn mergeable(prev: &Value, next: &Map<String, Value>) -> bool {
    let role = prev.get("role").and_then(Value::as_str);
    role == next.get("role").and_then(Value::as_str)
        && matches!(role, Some("user" | "assistant" | "system"))
        && prev.get("tool_calls").is_none()
        && !next.contains_key("tool_calls")
}

fn merge_into(prev: &mut Value, next: Map<String, Value>) {
    let a = prev.get("content").cloned().unwrap_or(Value::String(String::new()));
    let b = next.get("content").cloned().unwrap_or(Value::String(String::new()));
    let merged = match (a, b) {
        (Value::String(x), Value::String(y)) if x.is_empty() => Value::String(y),
        (Value::String(x), Value::String(y)) if y.is_empty() => Value::String(x),
        (Value::String(x), Value::String(y)) => Value::String(format!("{x}\n\n{y}")),
        (x, y) => {
            let parts = |v: Value| -> Vec<Value> {
                match v {
                    Value::Array(a) => a,
                    Value::String(s) if s.is_empty() => vec![],
                    Value::String(s) => vec![serde_json::json!({"type": "text", "text": s})],
                    _ => vec![],
                }
            };
            let mut all = parts(x);
            let rest = parts(y);
            if !all.is_empty() && !rest.is_empty() {
                all.push(serde_json::json!({"type": "text", "text": "\n\n"}));
            }
            all.extend(rest);
            Value::Array(all)
        }
    };
    if let Some(o) = prev.as_object_mut() {
        o.insert("content".into(), merged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ChatRequest, ApiError> {
        ChatRequest::parse(v.to_string().as_bytes())
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = parse(serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}))
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = parse(serde_json::json!({"messages": [{"role": "user", "content": [{"type": "audio"}]}]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));
        assert_eq!(e.code, Some("unsupported_content_type"));
        let e = parse(serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "n": 2})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
        assert!(ChatRequest::parse(b"{\"messages\": [").unwrap_err().message.contains("not valid JSON"));
    }

    #[test]
    fn fields_and_merging() {
        let r = parse(serde_json::json!({
            "model": "x", "unknown_field": {"ignored": true},
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "one"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                                             {"type": "text", "text": "two"}]},
            ],
            "max_completion_tokens": 7, "max_tokens": 3, "stop": "x", "top_k": -1, "seed": 5,
            "chat_template_kwargs": {"enable_thinking": false, "add_vision_id": true},
            "stream": true, "stream_options": {"include_usage": true}
        }))
        .unwrap();
        assert_eq!(r.messages.len(), 2);
        assert_eq!(
            r.messages[1]["content"],
            serde_json::json!([{"type": "text", "text": "one"}, {"type": "text", "text": "\n\n"}, {"type": "image"},
                               {"type": "text", "text": "two"}])
        );
        assert_eq!(r.images.len(), 1);
        assert_eq!(r.images[0].param, "messages[2].content[0].image_url.url");
        assert_eq!((r.max_tokens, r.top_k, r.seed), (Some(7), Some(0), Some(5)));
        assert_eq!(r.stop, vec!["x".to_string()]);
        assert_eq!(r.enable_thinking, Some(false));
        assert_eq!(r.template_kwargs.get("add_vision_id"), Some(&Value::Bool(true)));
        assert!(r.stream && r.include_usage && !r.continue_final);
        let r = parse(
            serde_json::json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
        )
        .unwrap();
        assert!(r.continue_final);
    }
}
