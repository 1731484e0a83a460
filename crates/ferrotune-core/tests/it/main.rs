//! The crate's one integration-test binary (one link of candle instead of one per file).

mod chat;
mod common;
mod export;
mod generate;
mod image;
mod loading;
mod model;
mod train;
