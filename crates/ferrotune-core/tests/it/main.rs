//! The integration tests of ferrotune-core, in one binary (each file under tests/ would link separately).

mod common;
mod config;
mod data;
mod template;
