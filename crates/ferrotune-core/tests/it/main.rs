//! The crate's one integration-test binary (each file under tests/ would link candle separately).

mod chat;
mod common;
mod config;
mod data;
mod generate;
mod image;
mod loading;
mod model;
mod template;
mod train;
mod train_run;
