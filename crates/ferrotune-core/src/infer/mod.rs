//! Inference: sampling and the generation engine used by `chat`, `api` and `eval`.

pub mod engine;
pub mod sample;

pub use engine::{AdapterMode, Engine, FinishReason, GenerateRequest, Generation, GenerationConfig, Prompt};
pub use sample::{Sampler, SamplingParams};
