//! The crate's one integration-test binary (one link of candle instead of one per file).

mod chat;
mod common;
mod demo;
mod eval;
mod generate;
mod image;
mod loading;
mod metrics;
mod model;
mod train;
