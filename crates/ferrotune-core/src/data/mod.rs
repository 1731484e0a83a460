//! The data stage: LLaMA-Factory datasets (`dataset_info.json`, alpaca / sharegpt / openai rows, images) →
//! tokenized [`Sample`]s with labels, and a [`Report`] of every row that could not be used.
//!
//! - [`info`]: dataset_info.json entries and dataset name resolution
//! - [`read`]: JSON / JSON-lines files, rows with their line numbers, JSON errors with a place and a fix
//! - [`convert`]: rows → [`Conversation`]s, placeholder checks
//! - [`media`]: image paths and sizes
//! - [`encode`]: template + images + truncation → [`Sample`]
//! - [`check`]: the whole pass over all rows ([`prepare`]) and its [`Report`]
//! - [`fuzz`]: random numeric config values run through the check, which must never panic

pub mod check;
pub mod convert;
pub mod encode;
pub mod fuzz;
pub mod info;
pub mod media;
pub mod numpy_rng;
pub mod pack;
pub mod read;

pub use check::{check_config, prepare, IssueKind, Prepared, Report, RowIssue};
pub use convert::Conversation;
pub use encode::{EncodeOptions, RowRef, Sample, IGNORE_INDEX};
pub use info::DatasetAttr;
