//! Splits a streamed completion into `reasoning_content` (inside `<think>…</think>`) and `content`.
//!
//! Qwen3.5's template opens the think block in the prompt (`<think>\n`) unless thinking is off, so the model's
//! text starts inside it; a model may also open the block itself. A LoRA trained with LLaMA-Factory's `qwen3_5`
//! template answers `\n</think>\n\n{answer}`: the reasoning is empty and `content` is the bare answer, where
//! LLaMA-Factory's server returns the think tags inside `content`. Text is released as soon as it cannot be the
//! start of a tag any more.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Reasoning,
    Content,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not yet known whether the text opens a think block.
    Detect,
    /// Inside the block: leading newlines are dropped (the template writes `<think>\n`).
    ReasoningStart,
    Reasoning,
    /// After `</think>`: leading newlines are dropped until the first other character.
    ContentStart,
    Content,
}

pub struct ThinkSplitter {
    phase: Phase,
    buf: String,
}

/// Length of the longest suffix of `s` that is a proper prefix of `tag` (text that may still become the tag).
fn partial_tag_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

impl ThinkSplitter {
    /// `prompt_opens_think`: the rendered prompt ends inside an open `<think>` block.
    pub fn new(prompt_opens_think: bool) -> Self {
        Self { phase: if prompt_opens_think { Phase::ReasoningStart } else { Phase::Detect }, buf: String::new() }
    }

    /// Whether a rendered prompt leaves a think block open for the model to continue.
    pub fn prompt_opens_think(prompt: &str) -> bool {
        match (prompt.rfind(OPEN), prompt.rfind(CLOSE)) {
            (Some(o), Some(c)) => o > c,
            (Some(_), None) => true,
            _ => false,
        }
    }

    /// Feeds a piece of text; returns what can be released, in order.
    pub fn push(&mut self, piece: &str) -> Vec<(Part, String)> {
        self.buf.push_str(piece);
        let mut out = Vec::new();
        loop {
            match self.phase {
                Phase::Detect => {
                    // `<think>` is one token in Qwen's vocabulary, and the first one when a model opens the block.
                    if let Some(rest) = self.buf.strip_prefix(OPEN) {
                        self.buf = rest.to_string();
                        self.phase = Phase::ReasoningStart;
                    } else if OPEN.starts_with(self.buf.as_str()) {
                        return out; // empty or a prefix of <think>: wait for more
                    } else {
                        self.phase = Phase::Content;
                    }
                }
                Phase::ReasoningStart => {
                    let t = self.buf.trim_start_matches(['\n', '\r']);
                    if t.is_empty() {
                        self.buf.clear();
                        return out;
                    }
                    self.buf = t.to_string();
                    self.phase = Phase::Reasoning;
                }
                Phase::Reasoning => {
                    if let Some(i) = self.buf.find(CLOSE) {
                        let before = self.buf[..i].trim_end_matches(['\n', '\r']).to_string();
                        self.buf = self.buf[i + CLOSE.len()..].to_string();
                        if !before.is_empty() {
                            out.push((Part::Reasoning, before));
                        }
                        self.phase = Phase::ContentStart;
                    } else {
                        // Hold back what may become `</think>`, and newlines that may precede it.
                        let keep = partial_tag_suffix(&self.buf, CLOSE);
                        let cut = self.buf[..self.buf.len() - keep].trim_end_matches(['\n', '\r']).len();
                        if cut > 0 {
                            out.push((Part::Reasoning, self.buf[..cut].to_string()));
                            self.buf.drain(..cut);
                        }
                        return out;
                    }
                }
                Phase::ContentStart => {
                    let t = self.buf.trim_start_matches(['\n', '\r']);
                    if t.is_empty() {
                        self.buf.clear();
                        return out;
                    }
                    self.buf = t.to_string();
                    self.phase = Phase::Content;
                }
                Phase::Content => {
                    if !self.buf.is_empty() {
                        out.push((Part::Content, std::mem::take(&mut self.buf)));
                    }
                    return out;
                }
            }
        }
    }

    /// Releases what is still held at the end (an unclosed think block stays reasoning).
    pub fn finish(&mut self) -> Vec<(Part, String)> {
        let rest = std::mem::take(&mut self.buf);
        let part = match self.phase {
            Phase::Reasoning | Phase::ReasoningStart => Part::Reasoning,
            _ => Part::Content,
        };
        if rest.is_empty() || matches!(self.phase, Phase::ContentStart | Phase::ReasoningStart) {
            return vec![];
        }
        vec![(part, rest)]
    }

    /// Splits a whole text at once: (reasoning, content).
    pub fn split_all(prompt_opens_think: bool, text: &str) -> (String, String) {
        let mut s = Self::new(prompt_opens_think);
        let mut parts = s.push(text);
        parts.extend(s.finish());
        let mut r = String::new();
        let mut c = String::new();
        for (p, t) in parts {
            match p {
                Part::Reasoning => r.push_str(&t),
                Part::Content => c.push_str(&t),
            }
        }
        (r, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streamed(open: bool, pieces: &[&str]) -> (String, String) {
        let mut s = ThinkSplitter::new(open);
        let mut r = String::new();
        let mut c = String::new();
        let mut all: Vec<(Part, String)> = pieces.iter().flat_map(|p| s.push(p)).collect();
        all.extend(s.finish());
        for (p, t) in all {
            match p {
                Part::Reasoning => r.push_str(&t),
                Part::Content => c.push_str(&t),
            }
        }
        (r, c)
    }

    #[test]
    fn trained_empty_think_block_leaves_bare_answer() {
        // What a LoRA trained on `<think>\n\n</think>\n\n{answer}` produces after the prompt's `<think>\n`.
        assert_eq!(streamed(true, &["\n</th", "ink>\n", "\nA red", " robot."]), (String::new(), "A red robot.".into()));
        assert_eq!(
            ThinkSplitter::split_all(true, "\n</think>\n\nA red robot."),
            (String::new(), "A red robot.".into())
        );
        // Newlines inside the reasoning are kept; those around it are the template's.
        assert_eq!(streamed(true, &["\nA\n", "\nB\n", "</think>\n\nC"]), ("A\n\nB".into(), "C".into()));
    }

    #[test]
    fn reasoning_then_answer_in_any_pieces() {
        let text = "Let me look.</think>\n\nIt has wheels.";
        for cut in 0..text.len() {
            let (a, b) = text.split_at(cut);
            assert_eq!(streamed(true, &[a, b]), ("Let me look.".into(), "It has wheels.".into()), "cut {cut}");
        }
    }

    #[test]
    fn model_opens_the_block_itself_or_not_at_all() {
        assert_eq!(streamed(false, &["<thi", "nk>hm</think>ok"]), ("hm".into(), "ok".into()));
        assert_eq!(streamed(false, &["<b>bold</b>"]), (String::new(), "<b>bold</b>".into()));
        assert_eq!(streamed(false, &["<th"]), (String::new(), "<th".into()));
        // An unclosed block (stopped by length) stays reasoning.
        assert_eq!(streamed(true, &["still thinking </thi"]), ("still thinking </thi".into(), String::new()));
    }

    #[test]
    fn prompt_detection() {
        assert!(ThinkSplitter::prompt_opens_think("<|im_start|>assistant\n<think>\n"));
        assert!(!ThinkSplitter::prompt_opens_think("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(!ThinkSplitter::prompt_opens_think("<|im_start|>assistant\n"));
    }
}
