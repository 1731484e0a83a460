//! Configuration: LLaMA-Factory's YAML/JSON keys, read in two stages (ripgrep's low/high args).
//!
//! 1. [`RawConfig`]: the keys as typed, from a file and `key=value` / `--key value` overrides, each with its
//!    place (file:line:column or the argument). Unknown keys are errors with a "did you mean".
//! 2. [`Plan`]: the validated configuration with LLaMA-Factory's defaults, resolved paths and the cross-key
//!    rules; [`Steps`] derives optimizer steps exactly as the HF Trainer does.
//!
//! [`keys`] is the one table that defines every key.

pub mod keys;
pub mod plan;
pub mod raw;
pub mod steps;

pub use plan::{
    DataPlan, ExportPlan, FinetuningType, GenerationPlan, Interval, LoraPlan, LoraTarget, Packing, Plan, Resume,
    Scheduler, TrainPlan, ValSize,
};
pub use raw::{Origin, RawConfig, Setting};
pub use steps::{StepInputs, Steps};
