//! Prompts with tools equal transformers' rendering of the checkpoint's template (tools/golden/gen_tools.py), and
//! the tool calls that rendering writes for an assistant turn parse back into that turn's calls.

use ferrotune_core::chat_template::{ChatTemplate, RenderOptions};
use ferrotune_core::tokenizer::Tokenizer;
use ferrotune_core::tool_calls::{parse, CallIds, Event, StreamParser};
use serde_json::Value;

use crate::common::{fixtures, tiny_checkpoint};

fn golden() -> (Vec<Value>, Vec<Value>) {
    let path = fixtures().join("golden/tools.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let g: Value = serde_json::from_str(&text).unwrap();
    (g["tools"].as_array().unwrap().clone(), g["cases"].as_array().unwrap().clone())
}

fn options(case: &Value, tools: &[Value]) -> RenderOptions {
    let mut extra = serde_json::Map::new();
    extra.insert("tools".into(), Value::Array(tools.to_vec()));
    RenderOptions {
        add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
        enable_thinking: case["enable_thinking"].as_bool(),
        extra,
    }
}

/// The conversation with each tool call's JSON-string arguments parsed into an object, as a server must do
/// before rendering (the template iterates the arguments as a mapping).
fn arguments_as_objects(messages: &Value) -> Value {
    let mut m = messages.clone();
    for msg in m.as_array_mut().unwrap() {
        for call in msg.get_mut("tool_calls").and_then(Value::as_array_mut).into_iter().flatten() {
            let f = if call.get("function").is_some() { call.get_mut("function").unwrap() } else { call };
            if let Some(Value::String(s)) = f.get("arguments") {
                f["arguments"] = serde_json::from_str(s).unwrap();
            }
        }
    }
    m
}

/// The rendered prompt of a case: transformers' text, or for a conversation it refused, its rendering once the
/// arguments are objects.
fn rendered(case: &Value) -> (&str, Value) {
    match case.get("text") {
        Some(t) => (t.as_str().unwrap(), case["messages"].clone()),
        None => (case["parsed_text"].as_str().unwrap(), arguments_as_objects(&case["messages"])),
    }
}

#[test]
fn prompts_with_tools_match_transformers() {
    let tmpl = ChatTemplate::from_dir(&tiny_checkpoint()).unwrap();
    let tok = Tokenizer::from_path(&tiny_checkpoint()).unwrap();
    let (tools, cases) = golden();
    assert!(cases.len() >= 10);
    for c in &cases {
        let name = c["name"].as_str().unwrap();
        let opts = options(c, &tools);
        match c.get("text") {
            Some(want) => {
                let text = tmpl.render(&c["messages"], &opts).unwrap_or_else(|e| panic!("{name}: {e:#}"));
                assert_eq!(text, want.as_str().unwrap(), "{name}: rendered text");
                let want: Vec<u32> =
                    c["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
                assert_eq!(tok.encode(&text).unwrap(), want, "{name}: token ids");
            }
            None => {
                // Arguments as a JSON string: transformers' template cannot iterate them, and neither can ours.
                let err = c["error"].as_str().unwrap();
                assert!(err.contains("mapping"), "{name}: {err}");
                assert!(tmpl.render(&c["messages"], &opts).is_err(), "{name}: string arguments rendered");
                let parsed = arguments_as_objects(&c["messages"]);
                let text = tmpl.render(&parsed, &opts).unwrap_or_else(|e| panic!("{name}: {e:#}"));
                assert_eq!(text, c["parsed_text"].as_str().unwrap(), "{name}: rendered text, arguments parsed");
            }
        }
    }
}

/// Each closed assistant turn of a rendered prompt, in order (the generation prompt is not closed).
fn assistant_turns(text: &str) -> Vec<&str> {
    const START: &str = "<|im_start|>assistant\n";
    let mut turns = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(START) {
        rest = &rest[i + START.len()..];
        if let Some(j) = rest.find("<|im_end|>") {
            turns.push(&rest[..j]);
            rest = &rest[j..];
        }
    }
    turns
}

#[test]
fn the_templates_tool_calls_parse_back_into_the_messages_calls() {
    let (tools, cases) = golden();
    let mut checked = 0;
    for c in &cases {
        let name = c["name"].as_str().unwrap();
        let (text, messages) = rendered(c);
        let assistants: Vec<&Value> =
            messages.as_array().unwrap().iter().filter(|m| m["role"] == "assistant").collect();
        let turns = assistant_turns(text);
        assert_eq!(turns.len(), assistants.len(), "{name}: assistant turns");
        for (k, (turn, msg)) in turns.iter().zip(&assistants).enumerate() {
            let Some(want) = msg.get("tool_calls").and_then(Value::as_array) else { continue };
            // The reasoning is not the parser's: the server splits it off first.
            let answer = turn.rsplit_once("</think>").map_or(*turn, |(_, a)| a);
            let parsed = parse(answer, &tools, &mut CallIds::seeded(k as u64));
            let got: Vec<(&str, &Value)> = parsed.calls.iter().map(|c| (c.name.as_str(), &c.arguments)).collect();
            let want: Vec<(&str, &Value)> = want
                .iter()
                .map(|c| {
                    let f = c.get("function").unwrap_or(c);
                    (f["name"].as_str().unwrap(), &f["arguments"])
                })
                .collect();
            assert_eq!(got, want, "{name}: assistant turn {k}");
            let content = msg["content"].as_str().unwrap_or("");
            let content = content.rsplit_once("</think>").map_or(content, |(_, a)| a).trim();
            assert_eq!(parsed.content, content, "{name}: assistant turn {k} content");

            // Streamed a character at a time: the same calls, with their indices.
            let mut s = StreamParser::new(tools.clone(), CallIds::seeded(k as u64));
            let mut events: Vec<Event> = Vec::new();
            for (i, ch) in answer.char_indices() {
                events.extend(s.push(&answer[i..i + ch.len_utf8()]));
            }
            events.extend(s.finish());
            let streamed: Vec<_> = events
                .into_iter()
                .filter_map(|e| match e {
                    Event::Call { index, call } => Some((index, call)),
                    Event::Text(_) => None,
                })
                .collect();
            assert_eq!(streamed.len(), parsed.calls.len(), "{name}: streamed calls");
            for (i, (index, call)) in streamed.into_iter().enumerate() {
                assert_eq!((index, call), (i, parsed.calls[i].clone()), "{name}: streamed call {i}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 7, "only {checked} assistant turns with tool calls");
}
