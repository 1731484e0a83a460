//! Training: AdamW, schedules, the micro-batch step (with gradient checkpointing) and the loop.

pub mod batch;
pub mod checkpoint;
pub mod optim;
pub mod run;
pub mod schedule;
pub mod state;
pub mod step;
