//! ferrotune-core: LoRA fine-tuning and serving of Qwen vision-language models.
//!
//! Everything but argv parsing and HTTP lives here. The data flow is
//! config → data → template → image processor → model (+ LoRA) → train / infer.

pub mod bench;
pub mod chat_template;
pub mod config;
pub mod data;
pub mod demo;
pub mod device;
pub mod env;
pub mod eval;
pub mod export;
pub mod gguf;
pub mod image;
pub mod infer;
pub mod lora;
#[cfg(unix)]
pub mod mapped;
pub mod models;
pub mod nn;
pub mod parallel;
pub mod parity;
pub mod plot;
pub mod suggest;
pub mod sys;
pub mod template;
pub mod tokenizer;
pub mod tool_calls;
pub mod train;
pub mod weights;

/// Checkpoint tensors used in place need an allocator that knows their buffers (see [`mapped`]).
#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: mapped::Allocator = mapped::Allocator;

/// The crate version, as printed by `ferrotune env`.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
