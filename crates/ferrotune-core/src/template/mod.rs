//! Chat templates with LLaMA-Factory's rendering and label masking (`data/template.py` of LLaMA-Factory 0.9.5).
//!
//! Every Qwen template is ChatML; they differ in the default system prompt, whether they are reasoning
//! templates (`ReasoningTemplate`: the empty think block `<think>\n\n</think>\n\n` is added to answers that have
//! none), whether LLaMA-Factory attaches a vision plugin, and their tool format (`qwen3_5`, `qwen3_5_nothink`:
//! Qwen3.5's; the others: Qwen2.5's). Encoding follows `Template._encode`: each message's slots are tokenized
//! separately (no special tokens added) and concatenated, turn 0 starting with the system slot when there is a
//! system prompt or a tool list (the tools' text is appended to the system prompt, see [`tools`]). The answer
//! slot includes `<|im_end|>\n`, so both are trained; a tool-call turn is an answer whose text the template's
//! tool format writes.
//!
//! Deviation: LLaMA-Factory refuses images with a template that has no vision plugin (`qwen`, `qwen3`). Here the
//! image expansion comes from the checkpoint's image processor, so any template works with a VLM; a poor match
//! is reported by [`detect::choose`].

pub mod detect;
pub mod tools;

use std::borrow::Cow;

use anyhow::{anyhow, bail, Result};
use serde_json::Value;

use crate::suggest;
use crate::tokenizer::Tokenizer;

pub use detect::{choose, CheckpointInfo, Choice};
pub use tools::ToolFormat;

/// Who speaks a message, after dataset conversion (LLaMA-Factory's `Role`, without `system`, which is separate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
    /// A tool result, in a user position.
    Observation,
    /// A tool call, in an assistant position.
    Function,
}

/// One message of a conversation. `content` may hold `<image>` placeholders (already replaced by vision tokens
/// when it reaches the template).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into() }
    }
}

/// A chat template (one of LLaMA-Factory's registered names).
#[derive(Debug, PartialEq, Eq)]
pub struct Template {
    pub name: &'static str,
    /// Used when a sample has no system prompt (overridable with `default_system`).
    pub default_system: &'static str,
    /// A `ReasoningTemplate`: the empty think block is added to answers without one.
    pub reasoning: bool,
    /// LLaMA-Factory attaches a Qwen vision plugin (`qwen2_vl` or `qwen3_vl`).
    pub vision: bool,
    /// The `tool_format` of its `format_tools` and `format_function`.
    pub tool_format: ToolFormat,
    /// What the template is meant for, for messages.
    pub for_models: &'static str,
}

const SYSTEM_SLOT: (&str, &str) = ("<|im_start|>system\n", "<|im_end|>\n");
const USER_SLOT: (&str, &str) = ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n");
const ASSISTANT_SLOT: (&str, &str) = ("", "<|im_end|>\n");
const OBSERVATION_SLOT: (&str, &str) =
    ("<|im_start|>user\n<tool_response>\n", "\n</tool_response><|im_end|>\n<|im_start|>assistant\n");
/// `thought_words` of every Qwen reasoning template.
pub const THINK_OPEN: &str = "<think>\n";
pub const THINK_CLOSE: &str = "\n</think>\n\n";

/// The templates ferrotune implements.
pub static TEMPLATES: &[Template] = &[
    Template {
        name: "qwen3_5",
        default_system: "",
        reasoning: true,
        vision: true,
        tool_format: ToolFormat::Qwen35,
        for_models: "Qwen3.5 (thinking)",
    },
    Template {
        name: "qwen3_5_nothink",
        default_system: "",
        reasoning: false,
        vision: true,
        tool_format: ToolFormat::Qwen35,
        for_models: "Qwen3.5 trained without the think block",
    },
    Template {
        name: "qwen3_vl",
        default_system: "",
        reasoning: true,
        vision: true,
        tool_format: ToolFormat::Qwen,
        for_models: "Qwen3-VL-*-Thinking",
    },
    Template {
        name: "qwen3_vl_nothink",
        default_system: "",
        reasoning: false,
        vision: true,
        tool_format: ToolFormat::Qwen,
        for_models: "Qwen3-VL-*-Instruct",
    },
    Template {
        name: "qwen2_vl",
        default_system: "You are a helpful assistant.",
        reasoning: false,
        vision: true,
        tool_format: ToolFormat::Qwen,
        for_models: "Qwen2-VL, Qwen2.5-VL",
    },
    Template {
        name: "qwen",
        default_system: "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        reasoning: false,
        vision: false,
        tool_format: ToolFormat::Qwen,
        for_models: "Qwen1.5/2/2.5 text models",
    },
    Template {
        name: "qwen3",
        default_system: "",
        reasoning: true,
        vision: false,
        tool_format: ToolFormat::Qwen,
        for_models: "Qwen3 (thinking)",
    },
    Template {
        name: "qwen3_nothink",
        default_system: "",
        reasoning: false,
        vision: false,
        tool_format: ToolFormat::Qwen,
        for_models: "Qwen3-*-Instruct-2507 and non-thinking Qwen3",
    },
];

/// The template called `name`; an unknown name lists the valid ones.
pub fn by_name(name: &str) -> Result<&'static Template> {
    if let Some(t) = TEMPLATES.iter().find(|t| t.name == name) {
        return Ok(t);
    }
    let names: Vec<&str> = TEMPLATES.iter().map(|t| t.name).collect();
    let hint = suggest::hint(name, names.iter().copied());
    bail!(
        "unknown template `{name}`{}; ferrotune implements: {}",
        if hint.is_empty() { String::new() } else { format!(" ({hint})") },
        names.join(", ")
    )
}

/// Template settings that come from the config.
#[derive(Clone, Debug)]
pub struct TemplateOptions {
    /// `default_system`: replaces the template's default system prompt.
    pub default_system: Option<String>,
    /// `enable_thinking` (reasoning templates only): `Some(true)` trains the empty think block, `Some(false)`
    /// puts it in the prompt and strips thinking from answers, `None` (mixed data) puts it in the prompt.
    pub enable_thinking: Option<bool>,
    /// `preserve_thinking`: keep the thinking of history turns when only the last turn is trained.
    pub preserve_thinking: bool,
}

impl Default for TemplateOptions {
    fn default() -> Self {
        Self { default_system: None, enable_thinking: Some(true), preserve_thinking: false }
    }
}

/// A template bound to a tokenizer: turns conversations into token ids.
pub struct ChatEncoder<'a> {
    pub template: &'static Template,
    tok: &'a Tokenizer,
    default_system: String,
    enable_thinking: Option<bool>,
    preserve_thinking: bool,
    thought_ids: Vec<u32>,
}

impl<'a> ChatEncoder<'a> {
    pub fn new(template: &'static Template, tok: &'a Tokenizer, options: &TemplateOptions) -> Result<Self> {
        let thought_ids = tok.encode(&format!("{THINK_OPEN}{THINK_CLOSE}"))?;
        Ok(Self {
            template,
            tok,
            default_system: options.default_system.clone().unwrap_or_else(|| template.default_system.to_string()),
            enable_thinking: options.enable_thinking,
            preserve_thinking: options.preserve_thinking,
            thought_ids,
        })
    }

    /// The tokenizer this encoder uses.
    pub fn tokenizer(&self) -> &Tokenizer {
        self.tok
    }

    /// `(prompt ids, answer ids)` per turn, as `encode_multiturn` builds them for training. `messages` alternate
    /// user/observation and assistant/function and end with an answer. `tools` (JSON objects) are the sample's
    /// tool definitions: `Some` even when empty, since an empty list still opens a system turn in LLaMA-Factory.
    /// With `mask_history` (and without `preserve_thinking`) thinking is stripped from all answers but the last,
    /// as LLaMA-Factory does.
    pub fn encode_turns(
        &self,
        messages: &[Message],
        system: Option<&str>,
        tools: Option<&[Value]>,
        mask_history: bool,
    ) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        if messages.is_empty() || !messages.len().is_multiple_of(2) {
            bail!("a conversation needs prompt/answer pairs, got {} messages", messages.len());
        }
        let mut messages = messages.to_vec();
        let discard_history_thinking = mask_history && !self.preserve_thinking;
        if self.template.reasoning {
            if self.enable_thinking == Some(false) {
                for m in messages.iter_mut().skip(1).step_by(2) {
                    m.content = remove_thought(&m.content);
                }
            }
            if discard_history_thinking {
                let last_answer = messages.len() - 1;
                for m in messages.iter_mut().take(last_answer).skip(1).step_by(2) {
                    m.content = remove_thought(&m.content);
                }
            }
        }
        let mut encoded = self.encode_messages(&messages, system, tools)?;
        if self.template.reasoning {
            let turns: Vec<usize> = if discard_history_thinking {
                vec![messages.len() - 2]
            } else {
                (0..messages.len()).step_by(2).collect()
            };
            for i in turns {
                if !has_thought(&messages[i + 1].content) {
                    if self.enable_thinking == Some(true) {
                        let answer = std::mem::take(&mut encoded[i + 1]);
                        encoded[i + 1] = [self.thought_ids.as_slice(), &answer].concat();
                    } else {
                        encoded[i].extend_from_slice(&self.thought_ids);
                    }
                }
            }
        }
        let mut pairs = Vec::with_capacity(encoded.len() / 2);
        let mut it = encoded.into_iter();
        while let (Some(p), Some(a)) = (it.next(), it.next()) {
            pairs.push((p, a));
        }
        Ok(pairs)
    }

    /// The prompt for generating the next answer (`encode_oneturn` with an empty answer, as LLaMA-Factory's chat
    /// engines do). `messages` end with a user or observation message.
    pub fn encode_prompt(
        &self,
        messages: &[Message],
        system: Option<&str>,
        tools: Option<&[Value]>,
    ) -> Result<Vec<u32>> {
        if messages.len() % 2 != 1 {
            bail!("a prompt needs an odd number of messages ending with the user's, got {}", messages.len());
        }
        let mut messages = messages.to_vec();
        messages.push(Message::new(Role::Assistant, ""));
        if self.template.reasoning && !self.preserve_thinking {
            let last_answer = messages.len() - 1;
            for m in messages.iter_mut().take(last_answer).skip(1).step_by(2) {
                m.content = remove_thought(&m.content);
            }
        }
        let encoded = self.encode_messages(&messages, system, tools)?;
        let mut prompt: Vec<u32> = encoded[..encoded.len() - 1].concat();
        if self.template.reasoning && self.enable_thinking != Some(true) {
            prompt.extend_from_slice(&self.thought_ids);
        }
        Ok(prompt)
    }

    /// `Template._encode`: one id list per message.
    fn encode_messages(
        &self,
        messages: &[Message],
        system: Option<&str>,
        tools: Option<&[Value]>,
    ) -> Result<Vec<Vec<u32>>> {
        let system = match system {
            Some(s) if !s.is_empty() => s,
            _ => self.default_system.as_str(),
        };
        let mut out = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let mut ids = Vec::new();
            if i == 0 && (!system.is_empty() || tools.is_some()) {
                let tool_text = tools.map(|t| tools::tool_text(self.template.tool_format, t)).unwrap_or_default();
                ids.extend(self.slot(SYSTEM_SLOT, &format!("{system}{tool_text}"))?);
            }
            let (slot, content) = match m.role {
                Role::User => (USER_SLOT, Cow::from(&m.content)),
                Role::Assistant => (ASSISTANT_SLOT, Cow::from(&m.content)),
                Role::Observation => (OBSERVATION_SLOT, Cow::from(&m.content)),
                Role::Function => {
                    let text = tools::function_text(self.template.tool_format, &m.content)
                        .map_err(|e| anyhow!("answer {} (a function_call turn): {e}", i / 2 + 1))?;
                    (ASSISTANT_SLOT, Cow::from(text))
                }
            };
            ids.extend(self.slot(slot, &content)?);
            out.push(ids);
        }
        Ok(out)
    }

    fn slot(&self, (before, after): (&str, &str), content: &str) -> Result<Vec<u32>> {
        let text = format!("{before}{content}{after}");
        if text.is_empty() {
            return Ok(Vec::new());
        }
        self.tok.encode(&text)
    }
}

/// Whether an answer already carries a think block (either tag counts, as in LLaMA-Factory).
fn has_thought(content: &str) -> bool {
    content.contains(THINK_OPEN.trim()) || content.contains(THINK_CLOSE.trim())
}

/// `ReasoningTemplate.remove_thought`: deletes every `<think>\n...\n</think>\n\n` block (shortest match, left
/// to right) and then leading newlines.
pub fn remove_thought(content: &str) -> String {
    let mut out = String::with_capacity(content.len());
    let mut rest = content;
    while let Some(start) = rest.find(THINK_OPEN) {
        let after_open = &rest[start + THINK_OPEN.len()..];
        let Some(end) = after_open.find(THINK_CLOSE) else { break };
        out.push_str(&rest[..start]);
        rest = &after_open[end + THINK_CLOSE.len()..];
    }
    out.push_str(rest);
    out.trim_start_matches('\n').to_string()
}

/// LLaMA-Factory's `infer_seqlen`: how many prompt and answer tokens of one turn fit in `cutoff` tokens.
pub fn infer_seqlen(source_len: usize, target_len: usize, cutoff: usize) -> (usize, usize) {
    let max_target = if target_len * 2 < cutoff {
        cutoff
    } else if source_len * 2 < cutoff {
        cutoff - source_len
    } else {
        // int(cutoff * (target / (source + target))), in f64 like Python.
        (cutoff as f64 * (target_len as f64 / (source_len + target_len) as f64)) as usize
    };
    let new_target = max_target.min(target_len);
    let new_source = cutoff.saturating_sub(new_target).min(source_len);
    (new_source, new_target)
}

/// How every template [`to_jinja`] writes begins, followed by the template's name.
const JINJA_HEADER: &str = "{#- ferrotune: the `";

/// The built-in template that a `chat_template.jinja` written by [`to_jinja`] (an adapter folder's, after
/// training) was rendered from, and whether `options` render it identically; `None` for any other template.
pub fn rendered_from(jinja: &str, options: &TemplateOptions) -> Option<(&'static Template, bool)> {
    let name = jinja.strip_prefix(JINJA_HEADER)?.split('`').next()?;
    let t = TEMPLATES.iter().find(|t| t.name == name)?;
    Some((t, to_jinja(t, options) == jinja))
}

/// A Jinja chat template that renders prompts exactly as `t` encodes them for training, for serving and export
/// (one renderer everywhere: a model trained with a `_nothink` template must not be served with a thinking
/// prompt). Content may be a string or parts (`{"type": "image"}` / `{"type": "text"}`); a reasoning template
/// drops earlier thoughts from history and, unless thinking is on, closes an empty think block in the prompt.
pub fn to_jinja(t: &Template, options: &TemplateOptions) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('\'', "\\'").replace('\n', "\\n");
    let mut j = String::new();
    j.push_str(JINJA_HEADER);
    j.push_str(t.name);
    j.push_str("` template (LLaMA-Factory semantics) as used in training -#}\n");
    j.push_str(
        "{%- macro render(content) -%}\
         {%- if content is string -%}{{- content -}}\
         {%- elif content is iterable -%}{%- for part in content -%}\
         {%- if part.type == 'image' or part.type == 'image_url' or 'image' in part -%}\
         {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}\
         {%- elif part.type == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}\
         {%- elif 'text' in part -%}{{- part.text -}}{%- endif -%}\
         {%- endfor -%}{%- endif -%}\
         {%- endmacro -%}\n",
    );
    // Turn 0's system slot: the system prompt (or the default one) and the tool list, as training writes them.
    let default_system = options.default_system.as_deref().unwrap_or(t.default_system);
    j.push_str(
        "{%- set system = render(messages[0].content) if (messages and messages[0].role == 'system') else '' -%}\n",
    );
    j.push_str(&format!("{{%- if not system -%}}{{%- set system = '{}' -%}}{{%- endif -%}}\n", esc(default_system)));
    let (head, tail) = tools::tool_text_frame(t.tool_format);
    let line = match t.tool_format {
        // Qwen's lines are OpenAI function tools: bare definitions are wrapped.
        ToolFormat::Qwen => "(tool | tojson) if tool.type == 'function' else '{\"type\": \"function\", \"function\": ' + (tool | tojson) + '}'",
        // Qwen3.5's are bare definitions: wrapped ones are unwrapped.
        ToolFormat::Qwen35 => "(tool.function | tojson) if (tool.type == 'function' and tool.function is defined) else (tool | tojson)",
    };
    j.push_str("{%- set ns = namespace(tools='', calls='', args='') -%}\n");
    j.push_str(&format!(
        "{{%- if tools -%}}{{%- for tool in tools -%}}{{%- set ns.tools = ns.tools + '\\n' + ({line}) -%}}{{%- endfor -%}}\
         {{%- set ns.tools = '{}' + ns.tools + '{}' -%}}{{%- endif -%}}\n",
        esc(head),
        esc(tail)
    ));
    j.push_str("{%- if system or ns.tools -%}{{- '<|im_start|>system\\n' + system + ns.tools + '<|im_end|>\\n' -}}{%- endif -%}\n");
    j.push_str("{%- for message in messages -%}\n");
    j.push_str(
        "{%- if message.role == 'user' -%}{{- '<|im_start|>user\\n' + render(message.content) + '<|im_end|>\\n' -}}\n",
    );
    j.push_str("{%- elif message.role == 'assistant' -%}{%- set content = render(message.content) -%}\n");
    // Tool calls replace the text beside them (LLaMA-Factory's openai conversion keeps only the calls).
    let call = match t.tool_format {
        ToolFormat::Qwen => {
            "'<tool_call>\\n{\"name\": ' + (f.name | tojson) + ', \"arguments\": ' + (f.arguments | tojson) + '}\\n</tool_call>'"
        }
        ToolFormat::Qwen35 => {
            "'<tool_call>\\n<function=' + f.name + '>' + ns.args + '\\n</function>\\n</tool_call>'"
        }
    };
    j.push_str("{%- if message.tool_calls -%}{%- set ns.calls = '' -%}{%- for tc in message.tool_calls -%}\
         {%- set f = tc.function if tc.function is defined else tc -%}{%- set ns.args = '' -%}\
         {%- for k, v in f.arguments | items -%}\
         {%- set ns.args = ns.args + '\\n<parameter=' + k + '>\\n' + (v if v is string else (v | tojson)) + '\\n</parameter>' -%}\
         {%- endfor -%}");
    j.push_str(&format!(
        "{{%- set ns.calls = ns.calls + ('' if loop.first else '\\n') + {call} -%}}{{%- endfor -%}}\
         {{%- set content = ns.calls -%}}{{%- endif -%}}\n"
    ));
    if t.reasoning {
        j.push_str("{%- if not loop.last and '</think>' in content -%}{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}\n");
    }
    j.push_str("{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}\n");
    // Consecutive tool results are one observation turn.
    j.push_str("{%- elif message.role == 'tool' -%}\
         {{- ('<|im_start|>user\\n<tool_response>\\n' if loop.first or loop.previtem.role != 'tool' else '\\n</tool_response>\\n<tool_response>\\n') + render(message.content) -}}\
         {%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '\\n</tool_response><|im_end|>\\n' -}}{%- endif -%}\n");
    j.push_str("{%- endif -%}\n{%- endfor -%}\n");
    j.push_str("{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}\n");
    if t.reasoning {
        // As in training: the empty think block goes into the prompt unless thinking is on (a request's
        // `enable_thinking` overrides the training setting).
        let default = match options.enable_thinking {
            Some(true) => "true",
            Some(false) => "false",
            None => "none",
        };
        j.push_str(&format!(
            "{{%- set thinking = enable_thinking if enable_thinking is defined else {default} -%}}\n\
             {{%- if thinking is not true -%}}{{{{- '<think>\\n\\n</think>\\n\\n' -}}}}{{%- endif -%}}\n"
        ));
    }
    j.push_str("{%- endif -%}\n");
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_templates_name_their_source() {
        let opts = TemplateOptions::default();
        for t in TEMPLATES {
            let (found, same) = rendered_from(&to_jinja(t, &opts), &opts).unwrap();
            assert!(found.name == t.name && same, "{}", t.name);
        }
        let t = by_name("qwen3_5_nothink").unwrap();
        let other = TemplateOptions { default_system: Some("Be brief.".into()), ..Default::default() };
        let (found, same) = rendered_from(&to_jinja(t, &other), &opts).unwrap();
        assert!(found.name == "qwen3_5_nothink" && !same);
        // A checkpoint's own template, and a header naming no built-in one.
        assert!(rendered_from("{%- for message in messages %}{{ message.content }}{% endfor %}", &opts).is_none());
        assert!(rendered_from("{#- ferrotune: the `nope` template -#}", &opts).is_none());
    }

    #[test]
    fn thought_removal() {
        assert_eq!(remove_thought("<think>\nabc\n</think>\n\nanswer"), "answer");
        assert_eq!(remove_thought("a<think>\nx\n</think>\n\nb<think>\ny\n</think>\n\nc"), "abc");
        assert_eq!(remove_thought("<think>\nunclosed"), "<think>\nunclosed");
        assert_eq!(remove_thought("\n\nplain"), "plain");
    }

    #[test]
    fn seqlen_matches_llamafactory() {
        // Values computed with LLaMA-Factory's infer_seqlen.
        assert_eq!(infer_seqlen(10, 10, 100), (10, 10));
        assert_eq!(infer_seqlen(100, 10, 50), (40, 10));
        assert_eq!(infer_seqlen(10, 100, 50), (10, 40));
        assert_eq!(infer_seqlen(60, 40, 50), (30, 20));
        assert_eq!(infer_seqlen(0, 0, 5), (0, 0));
    }

    #[test]
    fn unknown_template_lists_names() {
        let err = by_name("qwen35").unwrap_err().to_string();
        assert!(err.contains("qwen3_5") && err.contains("qwen2_vl"), "{err}");
        let err = by_name("qwen2_5_vl").unwrap_err().to_string();
        assert!(err.contains("did you mean"), "{err}");
    }
}
