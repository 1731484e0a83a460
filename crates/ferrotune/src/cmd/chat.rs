//! `ferrotune chat`: a terminal chat with streaming output (`/image PATH`, `/clear`, `/exit`, `/help`), or one
//! answer for scripts with `--prompt` (only the answer goes to stdout).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};
use clap::Parser;
use ferrotune_core::chat_template::RenderOptions;
use ferrotune_core::infer::{Engine, GenerateRequest, Generation};
use image::RgbImage;
use serde_json::{json, Value};

use super::serving::{layered, load_engine, Loaded, ModelArgs, SamplingArgs};
use crate::server::reasoning::{Part, ThinkSplitter};

#[derive(Parser, Clone, Debug, Default)]
#[command(args_override_self = true)]
pub struct Args {
    /// A YAML file with the same keys as the flags, and/or `key=value` items.
    #[arg(value_name = "CONFIG.yaml | KEY=VALUE")]
    pub config: Vec<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Answer this one prompt and exit; stdout gets the answer only.
    #[arg(long)]
    pub prompt: Option<String>,
    /// An image for --prompt (repeat for several; they come before the text).
    #[arg(long = "image", value_name = "PATH")]
    pub images: Vec<PathBuf>,
    /// A system prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Also print the model's reasoning (the text inside <think>…</think>), to stderr.
    #[arg(long = "show-reasoning", alias = "show_reasoning", num_args = 0..=1, default_missing_value = "true")]
    pub show_reasoning: Option<bool>,
}

const HELP: &str = "/image PATH  attach an image to your next message (repeat for several)
/clear       forget the conversation and pending images
/exit        quit (also Ctrl-D; Ctrl-C stops an answer)
/help        this text";

pub fn run(args: Args) -> Result<ExitCode> {
    let args = layered::<Args>("chat", &args.config, &[])?.unwrap_or(args);
    if super::serving::named_adapters(args.model.adapter_name_or_path.as_deref())?.is_some() {
        anyhow::bail!(
            "--adapter_name_or_path: NAME=DIR entries serve several adapters side by side, which only `api` does; \
             chat with one adapter folder (DIR, or DIR,DIR applied in order)"
        );
    }
    let loaded = load_engine(&args.model, &args.sampling)?;
    let show_reasoning = args.show_reasoning.unwrap_or(false);
    let mut chat = Conversation::new(args.system.clone());
    match args.prompt.as_deref() {
        Some(p) => {
            let images = args.images.iter().map(|p| load_image(&loaded, p)).collect::<Result<Vec<_>>>()?;
            let mut out = std::io::stdout().lock();
            let g = chat.turn(&loaded, p, images, show_reasoning, &mut out)?;
            writeln!(out)?;
            if g.finish_reason.as_openai() == "length" {
                eprintln!("(stopped at the token limit: {} tokens)", g.token_ids.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        None if !args.images.is_empty() => bail!("--image goes with --prompt; in the chat, use /image PATH"),
        None => interactive(&loaded, chat, show_reasoning).map(|()| ExitCode::SUCCESS),
    }
}

/// Set while an answer is being generated; Ctrl-C then stops the answer instead of the program.
static GENERATING: AtomicBool = AtomicBool::new(false);
static STOP_ANSWER: AtomicBool = AtomicBool::new(false);

fn interactive(loaded: &Loaded, mut chat: Conversation, show_reasoning: bool) -> Result<()> {
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprintln!("Chat with {}. Type /help for commands; Ctrl-C stops an answer.", loaded.model_name);
    }
    let _ = ctrlc::set_handler(|| {
        if GENERATING.load(Ordering::SeqCst) {
            STOP_ANSWER.store(true, Ordering::SeqCst);
        } else {
            std::process::exit(130);
        }
    });
    let mut pending: Vec<RgbImage> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if tty {
            eprint!("\nUser: ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        if let Some(cmd) = text.strip_prefix('/') {
            let (name, rest) = cmd.split_once(char::is_whitespace).unwrap_or((cmd, ""));
            match name {
                "exit" | "quit" => break,
                "clear" => {
                    chat.clear();
                    pending.clear();
                    eprintln!("(conversation cleared)");
                }
                "help" => eprintln!("{HELP}"),
                "image" if !rest.trim().is_empty() => match load_image(loaded, rest.trim().as_ref()) {
                    Ok(img) => {
                        pending.push(img);
                        eprintln!("({} image(s) attached to your next message)", pending.len());
                    }
                    Err(e) => eprintln!("error: {e:#}"),
                },
                _ => eprintln!("unknown command /{name}\n{HELP}"),
            }
            continue;
        }
        if tty {
            eprint!("Assistant: ");
        }
        let mut out = std::io::stdout().lock();
        match chat.turn(loaded, text, std::mem::take(&mut pending), show_reasoning, &mut out) {
            Ok(_) => writeln!(out)?,
            Err(e) => eprintln!("error: {e:#}"),
        }
        out.flush()?;
    }
    Ok(())
}

/// Reads an image and pre-resizes it as training did.
fn load_image(l: &Loaded, path: &std::path::Path) -> Result<RgbImage> {
    let img = ferrotune_core::image::load_image(path)?;
    Ok(ferrotune_core::image::fit_pixels(img, l.pixels.0, l.pixels.1))
}

/// The history of one chat: messages in transformers' format and their images in order.
struct Conversation {
    system: Option<String>,
    messages: Vec<Value>,
    images: Vec<RgbImage>,
}

impl Conversation {
    fn new(system: Option<String>) -> Self {
        let mut c = Self { system, messages: vec![], images: vec![] };
        c.clear();
        c
    }

    fn clear(&mut self) {
        self.messages.clear();
        self.images.clear();
        if let Some(s) = &self.system {
            self.messages.push(json!({"role": "system", "content": s}));
        }
    }

    /// Adds a user message, streams the answer's content to `out`, and records the answer. On error the
    /// conversation is left as it was.
    fn turn(
        &mut self,
        l: &Loaded,
        text: &str,
        images: Vec<RgbImage>,
        show_reasoning: bool,
        out: &mut impl Write,
    ) -> Result<Generation> {
        let content = if images.is_empty() {
            json!(text)
        } else {
            let mut parts: Vec<Value> = images.iter().map(|_| json!({"type": "image"})).collect();
            parts.push(json!({"type": "text", "text": text}));
            Value::Array(parts)
        };
        self.messages.push(json!({"role": "user", "content": content}));
        let n_before = self.images.len();
        self.images.extend(images);
        match answer(&l.engine, l, &self.messages, &self.images, show_reasoning, out) {
            Ok((g, content)) => {
                self.messages.push(json!({"role": "assistant", "content": content}));
                Ok(g)
            }
            Err(e) => {
                self.messages.pop();
                self.images.truncate(n_before);
                Err(e)
            }
        }
    }
}

/// Renders, checks the length, generates; content goes to `out` as it comes, reasoning to stderr when asked.
fn answer(
    engine: &Engine,
    l: &Loaded,
    messages: &[Value],
    images: &[RgbImage],
    show_reasoning: bool,
    out: &mut impl Write,
) -> Result<(Generation, String)> {
    let ro = RenderOptions { add_generation_prompt: true, enable_thinking: l.enable_thinking, ..Default::default() };
    let text = engine.template.render(&Value::Array(messages.to_vec()), &ro)?;
    let prompt = engine.prompt_from_text(&text, images)?;
    let n = prompt.ids.len();
    if n >= l.max_model_len {
        bail!("the conversation has {n} tokens, the context holds {}; /clear it", l.max_model_len);
    }
    let room = l.max_model_len - n;
    let req = GenerateRequest {
        sampling: l.sampling.clone(),
        max_tokens: l.max_new_tokens.unwrap_or(room).min(room),
        stop: vec![],
    };
    let mut splitter = ThinkSplitter::new(ThinkSplitter::prompt_opens_think(&text));
    let mut content = String::new();
    let mut io_err: Option<std::io::Error> = None;
    let mut emit = |parts: Vec<(Part, String)>, content: &mut String| {
        for (part, t) in parts {
            match part {
                Part::Content => {
                    content.push_str(&t);
                    if let Err(e) = out.write_all(t.as_bytes()).and_then(|_| out.flush()) {
                        io_err = Some(e);
                        return false; // stdout closed (e.g. piped into `head`): stop generating
                    }
                }
                Part::Reasoning if show_reasoning => eprint!("{t}"),
                Part::Reasoning => {}
            }
        }
        true
    };
    STOP_ANSWER.store(false, Ordering::SeqCst);
    GENERATING.store(true, Ordering::SeqCst);
    let g = engine.generate(&prompt, &req, |piece| {
        emit(splitter.push(piece), &mut content) && !STOP_ANSWER.load(Ordering::SeqCst)
    });
    GENERATING.store(false, Ordering::SeqCst);
    let g = g?;
    emit(splitter.finish(), &mut content);
    if let Some(e) = io_err {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
    }
    Ok((g, content))
}
