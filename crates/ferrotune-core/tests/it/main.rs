//! The crate's one integration-test binary (each file under tests/ would link candle separately).

mod chat;
mod common;
mod config;
#[cfg(feature = "cuda")]
mod cuda;
mod data;
mod demo;
mod eval;
mod export;
mod generate;
mod gguf;
mod image;
mod loading;
mod metrics;
mod model;
mod packing;
mod parity;
mod template;
mod tools;
mod train;
mod train_run;
