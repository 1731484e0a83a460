//! GGUF export for llama.cpp, Ollama and LM Studio: the container ([`format`]), ggml's block formats
//! ([`quant`]) and the Qwen3.5 model, projector and LoRA files ([`export_gguf`]).

pub mod format;
pub mod quant;
mod qwen35;

pub use qwen35::{export_gguf, GgufOptions, GgufReport, Quant};
