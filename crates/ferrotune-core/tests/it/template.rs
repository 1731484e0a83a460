//! Token ids and labels equal LLaMA-Factory 0.9.5's (fixtures from tools/golden/gen_lf.py), for every template,
//! dataset format and option the fixtures cover.

use ferrotune_core::data::{prepare, IssueKind};
use ferrotune_core::template::{by_name, ChatEncoder, Message, Role, TemplateOptions};
use ferrotune_core::tokenizer::Tokenizer;
use serde_json::Value;

use crate::common::{fixtures, golden, plan, tiny};

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().expect("a list of ids").iter().map(|x| x.as_i64().expect("an id")).collect()
}

/// The first index where two id lists differ, with a little context, for failure messages.
fn first_diff(ours: &[i64], theirs: &[i64]) -> String {
    let i = ours.iter().zip(theirs).position(|(a, b)| a != b).unwrap_or(ours.len().min(theirs.len()));
    let window = |v: &[i64]| v[i.saturating_sub(3)..(i + 5).min(v.len())].to_vec();
    format!(
        "lengths {} vs {}, first difference at {i}: ours {:?} vs LLaMA-Factory {:?}",
        ours.len(),
        theirs.len(),
        window(ours),
        window(theirs)
    )
}

fn check_case(file: &str) {
    let g = golden(file);
    let case = g["case"].as_str().unwrap();
    let mut pairs: Vec<(&str, Value)> = Vec::new();
    for (k, v) in g["args"].as_object().unwrap() {
        if k == "dataset_dir" {
            let dir = fixtures().join("data").join(v.as_str().unwrap());
            pairs.push(("dataset_dir", Value::String(dir.display().to_string())));
        } else {
            pairs.push((k.as_str(), v.clone()));
        }
    }
    let p = plan(&pairs);
    let prepared = prepare(&p, &|_, _| {}).unwrap_or_else(|e| panic!("{case}: {e:#}"));
    let mut ours = prepared.train.iter();
    let mut compared = 0;
    for s in g["samples"].as_array().unwrap() {
        let (dataset, row) = (s["dataset"].as_str().unwrap(), s["row"].as_u64().unwrap() as usize);
        if s["image_cut"].as_bool().unwrap() {
            // LLaMA-Factory cut image tokens here; ferrotune drops the row and says why.
            let dropped = prepared.report.issues.iter().any(|i| {
                i.at.dataset == dataset && i.at.row == row && matches!(i.kind, IssueKind::ImageOverCutoff { .. })
            });
            assert!(dropped, "{case}: {dataset} row {row} cuts an image and should be dropped");
            continue;
        }
        let sample = ours
            .next()
            .unwrap_or_else(|| panic!("{case}: no sample for {dataset} row {row}; report:\n{}", prepared.report));
        assert_eq!((sample.source.dataset.as_str(), sample.source.row), (dataset, row), "{case}: sample order");
        let our_ids: Vec<i64> = sample.input_ids.iter().map(|&i| i64::from(i)).collect();
        let lf_ids = ids(&s["input_ids"]);
        assert!(our_ids == lf_ids, "{case} {dataset} row {row} input_ids: {}", first_diff(&our_ids, &lf_ids));
        let lf_labels = ids(&s["labels"]);
        assert!(
            sample.labels == lf_labels,
            "{case} {dataset} row {row} labels: {}",
            first_diff(&sample.labels, &lf_labels)
        );
        compared += 1;
    }
    assert!(ours.next().is_none(), "{case}: more samples than LLaMA-Factory produced");
    assert!(compared > 0, "{case}: nothing compared");
}

macro_rules! golden_cases {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_case(concat!("samples_", stringify!($name), ".json"));
            }
        )*
    };
}

// One test per fixture file, so a failure names the case.
golden_cases!(
    qwen3_5,
    qwen3_5_nothink,
    qwen3_vl,
    qwen3_vl_nothink,
    qwen2_vl,
    qwen,
    qwen3,
    qwen3_nothink,
    qwen3_5_thinking_off,
    qwen3_5_thinking_mixed,
    qwen3_mask_history,
    qwen3_5_preserve_thinking,
    qwen3_5_nothink_train_on_prompt,
    qwen3_5_nothink_cutoff,
    qwen3_5_cutoff_images,
    qwen2_vl_default_system,
    qwen3_5_small_images,
    reference_qwen3_5,
    reference_qwen3_5_nothink,
    tools_qwen3_5_nothink,
    tools_qwen3_5,
    tools_qwen3_vl_nothink,
    tools_qwen,
    tools_qwen3_thinking_off,
);

#[test]
fn generation_prompts() {
    let tok = Tokenizer::from_path(&tiny()).unwrap();
    for case in golden("prompts.json")["samples"].as_array().unwrap() {
        let name = case["template"].as_str().unwrap();
        let thinking = case["enable_thinking"].as_bool().unwrap();
        let options = TemplateOptions { enable_thinking: Some(thinking), ..TemplateOptions::default() };
        let enc = ChatEncoder::new(by_name(name).unwrap(), &tok, &options).unwrap();
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let role = if m["role"] == "user" { Role::User } else { Role::Assistant };
                Message::new(role, m["content"].as_str().unwrap())
            })
            .collect();
        let prompt = enc.encode_prompt(&messages, case["system"].as_str(), None).unwrap();
        let ours: Vec<i64> = prompt.iter().map(|&i| i64::from(i)).collect();
        let theirs = ids(&case["prompt_ids"]);
        assert!(ours == theirs, "{name} thinking={thinking}: {}", first_diff(&ours, &theirs));
    }
}

/// The Jinja template written next to a trained model renders generation prompts exactly as the training
/// encoder does, for every template and thinking setting.
#[test]
fn written_chat_template_equals_the_training_encoder() {
    use ferrotune_core::chat_template::{ChatTemplate, RenderOptions};
    use ferrotune_core::template::{to_jinja, TEMPLATES};
    let tok = Tokenizer::from_path(&tiny()).unwrap();
    let history = [
        Message::new(Role::User, "Describe it."),
        Message::new(Role::Assistant, "<think>\nlooking\n</think>\n\nA red robot."),
        Message::new(Role::User, "And the wheels?"),
    ];
    let json = serde_json::json!([
        {"role": "user", "content": "Describe it."},
        {"role": "assistant", "content": "<think>\nlooking\n</think>\n\nA red robot."},
        {"role": "user", "content": "And the wheels?"}
    ]);
    for t in TEMPLATES {
        for thinking in [Some(true), Some(false), None] {
            for system in [None, Some("Be brief.")] {
                let opts = TemplateOptions {
                    default_system: system.map(str::to_owned),
                    enable_thinking: thinking,
                    preserve_thinking: false,
                };
                let enc = ChatEncoder::new(t, &tok, &opts).unwrap();
                let want = enc.encode_prompt(&history, None, None).unwrap();
                let jinja = ChatTemplate::new(to_jinja(t, &opts), "chat_template.jinja".into()).unwrap();
                let text =
                    jinja.render(&json, &RenderOptions { add_generation_prompt: true, ..Default::default() }).unwrap();
                assert_eq!(
                    tok.encode(&text).unwrap(),
                    want,
                    "{} thinking {thinking:?} system {system:?}: {text:?}",
                    t.name
                );
            }
        }
    }
}

/// With tools, tool calls in the history and tool results, the written template renders the prompt the training
/// encoder writes (whose tool text and calls equal LLaMA-Factory's, see the `tools_*` goldens), for every template.
#[test]
fn written_chat_template_renders_tools_as_training_encodes_them() {
    use ferrotune_core::chat_template::{ChatTemplate, RenderOptions};
    use ferrotune_core::template::{to_jinja, TEMPLATES};
    use serde_json::json;
    let tok = Tokenizer::from_path(&tiny()).unwrap();
    let tools = vec![
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}),
        json!({"name": "now", "description": "The time", "parameters": {"type": "object", "properties": {}}}),
    ];
    let calls = json!([{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}},
                       {"name": "get_weather", "arguments": {"city": "北京", "days": 1.5, "units": ["c", null]}}]);
    let history = [
        Message::new(Role::User, "Weather in Zürich and Beijing?"),
        Message::new(Role::Function, calls.to_string()),
        Message::new(Role::Observation, "sunny\n</tool_response>\n<tool_response>\nrain"),
        Message::new(Role::Assistant, "Sunny there, rain here."),
        Message::new(Role::User, "And tomorrow?"),
    ];
    let openai_calls: Vec<serde_json::Value> = calls
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| json!({"id": format!("c{i}"), "type": "function", "function": c}))
        .collect();
    for system in [None, Some("Be brief.")] {
        let mut messages = vec![
            json!({"role": "user", "content": "Weather in Zürich and Beijing?"}),
            json!({"role": "assistant", "content": "", "tool_calls": openai_calls}),
            json!({"role": "tool", "tool_call_id": "c0", "content": "sunny"}),
            json!({"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "rain"}]}),
            json!({"role": "assistant", "content": "Sunny there, rain here."}),
            json!({"role": "user", "content": "And tomorrow?"}),
        ];
        if let Some(s) = system {
            messages.insert(0, json!({"role": "system", "content": s}));
        }
        for t in TEMPLATES {
            for thinking in [Some(true), Some(false)] {
                let opts = TemplateOptions { enable_thinking: thinking, ..Default::default() };
                let enc = ChatEncoder::new(t, &tok, &opts).unwrap();
                let jinja = ChatTemplate::new(to_jinja(t, &opts), "chat_template.jinja".into()).unwrap();
                for with_tools in [true, false] {
                    let want = enc.encode_prompt(&history, system, with_tools.then_some(&tools[..])).unwrap();
                    let mut ro = RenderOptions { add_generation_prompt: true, ..Default::default() };
                    if with_tools {
                        ro.extra.insert("tools".into(), serde_json::Value::Array(tools.clone()));
                    }
                    let text = jinja.render(&serde_json::Value::Array(messages.clone()), &ro).unwrap();
                    assert!(!with_tools || text.contains("get_weather") && text.contains("<tools>"), "{text}");
                    assert_eq!(
                        tok.encode(&text).unwrap(),
                        want,
                        "{} thinking {thinking:?} system {system:?} tools {with_tools}: {text:?}",
                        t.name
                    );
                }
            }
        }
    }
}
