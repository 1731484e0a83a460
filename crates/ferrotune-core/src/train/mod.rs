//! Training: AdamW, schedules, the micro-batch step (with gradient checkpointing) and the loop.

pub mod optim;
pub mod schedule;
pub mod state;
pub mod step;
