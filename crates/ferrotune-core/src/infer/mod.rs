//! Inference: sampling and the generation engine used by `chat`, `api` and `eval`.

pub mod batch;
pub mod engine;
pub mod sample;

pub use batch::{BatchOptions, BatchStats, Batcher, Job, Sink};
pub use engine::{
    AdapterMode, Decoding, Engine, FinishReason, GenerateRequest, Generation, GenerationConfig, NamedAdapter, Prefill,
    Prompt, PREFILL_CHUNK,
};
pub use sample::{Sampler, SamplingParams};
