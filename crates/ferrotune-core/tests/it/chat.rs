//! Chat template rendering and image-pad expansion equal transformers' processor (tools/golden/gen_chat.py).

use ferrotune_core::chat_template::{expand_pads, ChatTemplate, RenderOptions};
use ferrotune_core::tokenizer::Tokenizer;

use crate::common::{fixtures, tiny_checkpoint};

#[test]
fn rendering_and_token_ids_match_the_processor() {
    let tmpl = ChatTemplate::from_dir(&tiny_checkpoint()).unwrap();
    let tok = Tokenizer::from_path(&tiny_checkpoint()).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("golden/chat.json")).unwrap()).unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 6);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let opts = RenderOptions {
            add_generation_prompt: c["add_generation_prompt"].as_bool().unwrap(),
            enable_thinking: c["enable_thinking"].as_bool(),
            ..Default::default()
        };
        let text = tmpl.render(&c["messages"], &opts).unwrap();
        assert_eq!(text, c["text"].as_str().unwrap(), "{name}: rendered text");
        let counts: Vec<usize> = c["image_grid_thw"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).product::<usize>() / 4)
            .collect();
        let expanded = expand_pads(&text, "<|image_pad|>", &counts).unwrap();
        let ids = tok.encode(&expanded).unwrap();
        let want: Vec<u32> = c["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want, "{name}: input ids");
    }
}

#[test]
fn template_errors_surface_with_the_templates_message() {
    let tmpl = ChatTemplate::from_dir(&tiny_checkpoint()).unwrap();
    let msgs = serde_json::json!([{"role": "assistant", "content": "hi"}]);
    let err = tmpl.render(&msgs, &RenderOptions::default()).unwrap_err().to_string();
    assert!(err.contains("No user query found"), "{err}");
}

#[test]
fn a_template_that_renders_nothing_is_an_error_naming_it() {
    // A template whose every line is a tag renders to "" (e.g. a loop over a key the messages do not have).
    let source = "{%- for m in messages %}{%- if m.text %}{{ m.text }}{%- endif %}{%- endfor %}".to_string();
    let tmpl = ChatTemplate::new(source, "broken/chat_template.jinja".into()).unwrap();
    let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
    let err = format!("{:#}", tmpl.render(&msgs, &RenderOptions::default()).unwrap_err());
    assert!(err.contains("broken/chat_template.jinja") && err.contains("rendered nothing"), "{err}");
    assert!(err.contains("hint:") && err.contains("copy chat_template.jinja"), "{err}");
}
