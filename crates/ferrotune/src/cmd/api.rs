//! `ferrotune api`: base + adapters behind an OpenAI-compatible HTTP API (see `server/`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;

use super::serving::{layered, load_engine, ModelArgs, SamplingArgs};
use crate::server::{self, media::MediaPolicy, AppState, ServerOptions};

/// Flags as LLaMA-Factory's `api` names them; a YAML file with the same keys (and `key=value` items) may come
/// first. API_HOST, API_PORT, API_KEY and API_MODEL_NAME are read when neither sets the value.
#[derive(Parser, Clone, Debug, Default)]
#[command(args_override_self = true)]
pub struct Args {
    /// A YAML file with the same keys as the flags, and/or `key=value` items.
    #[arg(value_name = "CONFIG.yaml | KEY=VALUE")]
    pub config: Vec<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on (default 8000).
    #[arg(long)]
    pub port: Option<u16>,
    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long = "api-key", alias = "api_key")]
    pub api_key: Option<String>,
    /// The model id clients see (default: the checkpoint's folder name).
    #[arg(long = "served-model-name", alias = "served_model_name")]
    pub served_model_name: Option<String>,
    /// Folder that local image paths and file:// URLs may point into (nothing else is readable).
    #[arg(long = "media-dir", alias = "media_dir", value_name = "DIR")]
    pub media_dir: Option<PathBuf>,
    /// Fetch http(s) image URLs (only from public addresses).
    #[arg(long = "allow-remote-images", alias = "allow_remote_images", num_args = 0..=1, default_missing_value = "true")]
    pub allow_remote_images: Option<bool>,
    /// Return `<think>` text as `reasoning_content` (default true); false leaves it inside `content`.
    #[arg(long = "reasoning-content", alias = "reasoning_content", num_args = 0..=1, default_missing_value = "true")]
    pub reasoning_content: Option<bool>,
    /// Largest accepted request body, in MB (images as data URLs count).
    #[arg(long = "max-body-mb", alias = "max_body_mb")]
    pub max_body_mb: Option<usize>,
    /// Largest image decoded, in pixels (width × height, read from the header before decoding; default 67108864)
    #[arg(long = "max-image-pixels", alias = "max_image_pixels")]
    pub max_image_pixels: Option<u64>,
    /// Images one request may carry (default 16)
    #[arg(long = "max-images", alias = "max_images")]
    pub max_images: Option<usize>,
    /// Requests that may wait for the model before new ones are answered 429 (default 256)
    #[arg(long = "max-waiting", alias = "max_waiting")]
    pub max_waiting: Option<usize>,
    /// Seconds a request's body may take to arrive (default 30; then 408)
    #[arg(long = "body-timeout-secs", alias = "body_timeout_secs")]
    pub body_timeout_secs: Option<u64>,
    /// Connections served at once; more are answered 429 (default 512)
    #[arg(long = "max-connections", alias = "max_connections")]
    pub max_connections: Option<usize>,
    /// Seconds a request's head may take to arrive, an idle keep-alive connection's wait included (default 10;
    /// then the connection is closed)
    #[arg(long = "header-timeout-secs", alias = "header_timeout_secs")]
    pub header_timeout_secs: Option<u64>,
    /// Sequences decoded together in one batch; more requests wait in the queue (default 16)
    #[arg(long = "max-num-seqs", alias = "max_num_seqs")]
    pub max_num_seqs: Option<usize>,
    /// Folder that adapters loaded at run time (`POST /v1/load_lora_adapter`) must lie in; without it the
    /// adapters served are those of --adapter_name_or_path
    #[arg(long = "lora-dir", alias = "lora_dir", value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,
    /// Prompt tokens fed between two decoding steps of the running sequences (default 256): smaller keeps their
    /// pace steadier while a long prompt comes in
    #[arg(long = "prefill-chunk", alias = "prefill_chunk")]
    pub prefill_chunk: Option<usize>,
}

const ENV: &[(&str, &str)] =
    &[("API_HOST", "host"), ("API_PORT", "port"), ("API_KEY", "api_key"), ("API_MODEL_NAME", "served_model_name")];

pub fn run(args: Args) -> Result<ExitCode> {
    let args = layered::<Args>("api", &args.config, ENV)?.unwrap_or(args);
    let loaded = load_engine(&args.model, &args.sampling)?;
    let media_dir = match &args.media_dir {
        Some(d) => {
            let c = d.canonicalize().with_context(|| format!("--media-dir {}: not found", d.display()))?;
            if !c.is_dir() {
                bail!("--media-dir {}: not a folder", d.display());
            }
            Some(c)
        }
        None => None,
    };
    let mut opts =
        ServerOptions::new(args.served_model_name.clone().unwrap_or(loaded.model_name), loaded.max_model_len);
    if loaded.engine.adapter(&opts.served_name).is_some() {
        bail!(
            "the adapter name `{0}` is also the base model's name; rename the adapter (NAME=DIR) or the base \
             (--served-model-name)",
            opts.served_name
        );
    }
    if let Some(d) = &args.lora_dir {
        let c = d.canonicalize().with_context(|| format!("--lora-dir {}: not found", d.display()))?;
        if !c.is_dir() {
            bail!("--lora-dir {}: not a folder", d.display());
        }
        opts.lora_dir = Some(c);
    }
    opts.api_key = args.api_key.clone().filter(|k| !k.is_empty());
    opts.media = MediaPolicy {
        media_dir,
        allow_remote: args.allow_remote_images.unwrap_or(false),
        max_bytes: opts.media.max_bytes,
        min_pixels: loaded.pixels.0,
        max_pixels: loaded.pixels.1,
        max_decode_pixels: args.max_image_pixels.unwrap_or(opts.media.max_decode_pixels),
    };
    opts.sampling = loaded.sampling;
    // Without --max_new_tokens a request that sets no max_tokens gets the server's default cap.
    opts.max_new_tokens = loaded.max_new_tokens.or(opts.max_new_tokens);
    opts.max_images = args.max_images.unwrap_or(opts.max_images);
    opts.max_waiting = args.max_waiting.unwrap_or(opts.max_waiting);
    if let Some(secs) = args.body_timeout_secs {
        opts.body_timeout = std::time::Duration::from_secs(secs);
    }
    if let Some(secs) = args.header_timeout_secs {
        opts.header_timeout = std::time::Duration::from_secs(secs);
    }
    opts.max_connections = args.max_connections.unwrap_or(opts.max_connections);
    for (flag, v) in [
        ("--max-num-seqs", args.max_num_seqs),
        ("--prefill-chunk", args.prefill_chunk),
        ("--max-connections", args.max_connections),
    ] {
        if v == Some(0) {
            bail!("{flag} must be at least 1");
        }
    }
    opts.batch.max_seqs = args.max_num_seqs.unwrap_or(opts.batch.max_seqs);
    opts.batch.prefill_chunk = args.prefill_chunk.unwrap_or(opts.batch.prefill_chunk);
    opts.enable_thinking = loaded.enable_thinking;
    opts.split_reasoning = args.reasoning_content.unwrap_or(true);
    if let Some(mb) = args.max_body_mb {
        opts.max_body_bytes = mb << 20;
    }
    let host = args.host.clone().unwrap_or_else(|| "127.0.0.1".into());
    let port = args.port.unwrap_or(8000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host.as_str(), port))
            .await
            .with_context(|| format!("cannot listen on {host}:{port} (in use? pick another with --port)"))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "serving `{}` on http://{addr}/v1 (max context {} tokens{}{})",
            opts.served_name,
            opts.max_model_len,
            if opts.api_key.is_some() { ", API key required" } else { "" },
            match &opts.media.media_dir {
                Some(d) => format!(", local images from {}", d.display()),
                None => String::new(),
            }
        );
        if opts.api_key.is_none() && !addr.ip().is_loopback() {
            eprintln!("warning: listening on {addr} without --api-key: anyone who can reach it can use the model");
        }
        let state = AppState::new(loaded.engine, opts);
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("shutting down");
        };
        server::serve(listener, state, shutdown).await.context("HTTP server")?;
        Ok(ExitCode::SUCCESS)
    })
}
