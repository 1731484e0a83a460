//! The OpenAI-compatible HTTP API: `GET /v1/models`, `POST /v1/chat/completions` (JSON or SSE stream, tool
//! calls), `POST /v1/load_lora_adapter` / `unload_lora_adapter` (with `--lora-dir`), `GET /health`, `GET /metrics`
//! (Prometheus).
//!
//! Requests are prepared (images decoded, prompt rendered and tokenized) a few at a time, then queue for the
//! batching thread ([`ferrotune_core::infer::batch`]), first come, first served: up to `--max-num-seqs` sequences
//! decode together, new ones joining between tokens. A client that goes away stops its generation at the next
//! token. Every failure is an OpenAI error body; bad input is a 4xx, and a panic is caught and answered with a 500.

pub mod error;
pub mod media;
pub mod reasoning;
pub mod request;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferrotune_core::chat_template::RenderOptions;
use ferrotune_core::infer::{
    BatchOptions, Batcher, Engine, FinishReason, GenerateRequest, Generation, Job, NamedAdapter, Prompt,
    SamplingParams, Sink,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;

use error::ApiError;
use ferrotune_core::tool_calls::{self, CallFormat, CallIds, StreamParser, ToolCall};
use media::MediaPolicy;
use reasoning::{Part, ThinkSplitter};
use request::{ChatRequest, ToolChoice};

/// LLaMA-Factory's defaults of `image_min_pixels` / `image_max_pixels`, which training applies too.
pub const DEFAULT_MIN_PIXELS: u64 = 32 * 32;
pub const DEFAULT_MAX_PIXELS: u64 = 768 * 768;

/// What the server was started with.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The model id clients see in `/v1/models` and in every response.
    pub served_name: String,
    /// Required as `Authorization: Bearer <key>` on `/v1/*` when set.
    pub api_key: Option<String>,
    pub media: MediaPolicy,
    /// Longest prompt + completion, in tokens.
    pub max_model_len: usize,
    /// Sampling when a request does not say (generation_config.json, then the server's flags).
    pub sampling: SamplingParams,
    /// Completion length when a request does not say (else: the rest of the context).
    pub max_new_tokens: Option<usize>,
    /// `enable_thinking` when a request does not say (else: the template's default).
    pub enable_thinking: Option<bool>,
    /// Return `<think>` text as `reasoning_content` rather than inside `content`.
    pub split_reasoning: bool,
    pub max_body_bytes: usize,
    /// Requests allowed to wait for the engine before new ones get 429.
    pub max_waiting: usize,
    /// Images one request may carry.
    pub max_images: usize,
    /// Time a request's body may take to arrive once its headers have.
    pub body_timeout: Duration,
    /// Connections served at once; more are answered 429.
    pub max_connections: usize,
    /// Time a request's head (request line and headers) may take to arrive, an idle connection's wait included.
    pub header_timeout: Duration,
    /// Sequences decoding together and prompt tokens fed between two decoding steps.
    pub batch: BatchOptions,
    /// The folder adapters loaded at run time must lie in (canonical); None: run-time loading is off.
    pub lora_dir: Option<std::path::PathBuf>,
}

/// Completion length when neither the request nor the server's `--max_new_tokens` says: a request without
/// `max_tokens` must not run to the end of a 262,144-token context.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 4096;
/// Default of [`ServerOptions::max_images`].
pub const DEFAULT_MAX_IMAGES: usize = 16;
/// Stop sequences one request may give, and the length of each in bytes (OpenAI accepts up to 4).
pub const MAX_STOP_SEQUENCES: usize = 4;
pub const MAX_STOP_BYTES: usize = 256;

impl ServerOptions {
    pub fn new(served_name: impl Into<String>, max_model_len: usize) -> Self {
        Self {
            served_name: served_name.into(),
            api_key: None,
            media: MediaPolicy {
                media_dir: None,
                allow_remote: false,
                max_bytes: 32 << 20,
                min_pixels: DEFAULT_MIN_PIXELS,
                max_pixels: DEFAULT_MAX_PIXELS,
                max_decode_pixels: media::DEFAULT_MAX_DECODE_PIXELS,
            },
            max_model_len,
            sampling: SamplingParams::default(),
            max_new_tokens: Some(DEFAULT_MAX_NEW_TOKENS),
            enable_thinking: None,
            split_reasoning: true,
            max_body_bytes: 64 << 20,
            max_waiting: 256,
            max_images: DEFAULT_MAX_IMAGES,
            body_timeout: Duration::from_secs(30),
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            batch: BatchOptions::default(),
            lora_dir: None,
        }
    }
}

/// Counters, for `/health` and the tests.
#[derive(Default, Debug)]
pub struct Stats {
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    /// Completion tokens generated, all requests together.
    pub tokens: AtomicU64,
    /// Requests read and not yet generating (preparing, or queued for the engine).
    pub waiting: AtomicUsize,
    /// Requests generating now (the batch size).
    pub running: AtomicUsize,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Time spent generating (after the queue), all requests together.
    pub generating_micros: AtomicU64,
    /// Time from a request's arrival to its first completion token.
    pub ttft: Histogram,
    /// Connections answered 429 because `max_connections` were open.
    pub refused_connections: AtomicU64,
}

/// A Prometheus histogram of seconds with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; TTFT_BUCKETS.len()],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// Upper bounds of [`Histogram`]'s buckets, in seconds.
const TTFT_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

impl Histogram {
    pub fn observe(&self, secs: f64) {
        for (c, &le) in self.counts.iter().zip(&TTFT_BUCKETS) {
            if secs <= le {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros.fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The histogram in Prometheus text format under `name`.
    fn render(&self, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, le) in self.counts.iter().zip(TTFT_BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {}", c.load(Ordering::Relaxed));
        }
        let n = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {n}");
    }
}

/// Records a request's time to first token once, at its first completion token.
struct FirstToken(Option<(Arc<AppState>, Instant)>);

impl FirstToken {
    fn new(st: &Arc<AppState>, t0: Instant) -> Self {
        Self(Some((st.clone(), t0)))
    }

    fn seen(&mut self) {
        if let Some((st, t0)) = self.0.take() {
            st.stats.ttft.observe(t0.elapsed().as_secs_f64());
        }
    }
}

pub struct AppState {
    pub engine: Arc<Engine>,
    pub opts: ServerOptions,
    pub stats: Stats,
    pub batcher: Batcher,
    /// Requests decoding images and building prompts at once: one per core, so that many requests with images
    /// cannot hold every blocking thread and their decoded pictures at the same time.
    preparing: tokio::sync::Semaphore,
    started: u64,
}

impl AppState {
    pub fn new(engine: Engine, opts: ServerOptions) -> Arc<Self> {
        let engine = Arc::new(engine);
        Arc::new(Self {
            batcher: Batcher::start(engine.clone(), opts.batch),
            engine,
            opts,
            stats: Stats::default(),
            preparing: tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())),
            started: unix_now(),
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/load_lora_adapter", post(load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(unload_lora_adapter))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Serves until `shutdown` resolves, then waits for the open connections to finish.
///
/// At most `max_connections` connections are served at once; one over the cap is answered 429 and closed. A
/// connection whose request head does not arrive within `header_timeout` (an idle keep-alive connection too)
/// is closed, so that slow or silent clients cannot hold the slots.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let app = router(state.clone());
    let slots = Arc::new(tokio::sync::Semaphore::new(state.opts.max_connections.max(1)));
    // Refusals are answered a bounded number at a time: beyond that, an over-cap connection is just closed.
    let refusing = Arc::new(tokio::sync::Semaphore::new(256));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait for connections to close instead of spinning.
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            state.stats.refused_connections.fetch_add(1, Ordering::Relaxed);
            if let Ok(permit) = refusing.clone().try_acquire_owned() {
                let max = state.opts.max_connections;
                tokio::spawn(async move {
                    refuse(stream, max).await;
                    drop(permit);
                });
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new()).header_read_timeout(state.opts.header_timeout);
        let conn =
            http.serve_connection(TokioIo::new(stream), hyper_util::service::TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Answers a connection over the cap with a 429 and closes it, then reads what the client sends for a moment (a
/// socket closed with unread data resets the connection, which can lose the answer).
async fn refuse(mut stream: tokio::net::TcpStream, max: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        format!("the server has {max} connections open, its limit (set by --max-connections); retry later"),
    )
    .code("too_many_connections");
    let body = e.body().to_string();
    let head = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        let mut buf = [0u8; 4096];
        while stream.read(&mut buf).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}

/// Constant-time comparison, so the time to reject a key says nothing about how much of it matched.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = st.opts.api_key.as_deref() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        if !given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes())) {
            let msg = if given.is_some() {
                "incorrect API key provided"
            } else {
                "no API key provided; send the header `Authorization: Bearer <key>`"
            };
            return ApiError::new(StatusCode::UNAUTHORIZED, msg).code("invalid_api_key").into_response();
        }
    }
    next.run(req).await
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("unknown request URL: {method} {}", uri.path())).code("unknown_url")
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {}", uri.path()))
        .code("method_not_allowed")
}

async fn health(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "model": st.opts.served_name,
        "waiting": st.stats.waiting.load(Ordering::Relaxed),
        "completed": st.stats.completed.load(Ordering::Relaxed),
        "cancelled": st.stats.cancelled.load(Ordering::Relaxed),
        "completion_tokens": st.stats.tokens.load(Ordering::Relaxed),
    }))
}

/// Prometheus text format: what operators scrape.
async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    use std::fmt::Write as _;
    let s = &st.stats;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: &[(&str, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in lines {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    metric(
        "ferrotune_requests_total",
        "counter",
        "Chat completion requests by outcome.",
        &[
            ("{outcome=\"completed\"}", load(&s.completed).to_string()),
            ("{outcome=\"cancelled\"}", load(&s.cancelled).to_string()),
            ("{outcome=\"error\"}", load(&s.errors).to_string()),
        ],
    );
    metric(
        "ferrotune_refused_connections_total",
        "counter",
        "Connections refused (429) because --max-connections were open.",
        &[("", load(&s.refused_connections).to_string())],
    );
    metric(
        "ferrotune_prompt_tokens_total",
        "counter",
        "Prompt tokens of finished requests.",
        &[("", load(&s.prompt_tokens).to_string())],
    );
    metric(
        "ferrotune_completion_tokens_total",
        "counter",
        "Completion tokens generated.",
        &[("", load(&s.tokens).to_string())],
    );
    metric(
        "ferrotune_generation_seconds_total",
        "counter",
        "Time spent generating after the queue (completion tokens / this = tokens per second).",
        &[("", (load(&s.generating_micros) as f64 / 1e6).to_string())],
    );
    metric(
        "ferrotune_requests_waiting",
        "gauge",
        "Requests read and waiting for the model (the queue depth).",
        &[("", s.waiting.load(Ordering::Relaxed).to_string())],
    );
    metric(
        "ferrotune_requests_running",
        "gauge",
        "Requests generating now (the batch size).",
        &[("", s.running.load(Ordering::Relaxed).to_string())],
    );
    let b = &st.batcher.stats;
    metric(
        "ferrotune_decode_steps_total",
        "counter",
        "Decoding steps, each one batch of sequences.",
        &[("", b.steps.load(Ordering::Relaxed).to_string())],
    );
    metric(
        "ferrotune_decode_rows_total",
        "counter",
        "Sequence-tokens decoded in those steps (divided by the steps: the mean batch size).",
        &[("", b.rows.load(Ordering::Relaxed).to_string())],
    );
    metric(
        "ferrotune_decode_batch_max",
        "gauge",
        "The largest batch decoded since the start.",
        &[("", b.max_rows.load(Ordering::Relaxed).to_string())],
    );
    metric(
        "ferrotune_prefill_tokens_total",
        "counter",
        "Prompt tokens fed to the model.",
        &[("", b.prefill_tokens.load(Ordering::Relaxed).to_string())],
    );
    metric(
        "ferrotune_batch_seconds_total",
        "counter",
        "Time the batching thread spent feeding prompts and decoding.",
        &[
            ("{phase=\"prefill\"}", (b.prefill_micros.load(Ordering::Relaxed) as f64 / 1e6).to_string()),
            ("{phase=\"decode\"}", (b.decode_micros.load(Ordering::Relaxed) as f64 / 1e6).to_string()),
        ],
    );
    s.ttft.render(
        "ferrotune_time_to_first_token_seconds",
        "Time from a request's arrival to its first token.",
        &mut out,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response()
}

fn model_card(st: &AppState) -> Value {
    json!({
        "id": st.opts.served_name,
        "object": "model",
        "created": st.started,
        "owned_by": "ferrotune",
        "max_model_len": st.opts.max_model_len,
    })
}

/// An adapter served by name, as vLLM lists its LoRA models (`root`: the folder, `parent`: the base).
fn adapter_card(st: &AppState, a: &NamedAdapter) -> Value {
    json!({
        "id": a.name,
        "object": "model",
        "created": st.started,
        "owned_by": "ferrotune",
        "root": a.dir.display().to_string(),
        "parent": st.opts.served_name,
        "max_model_len": st.opts.max_model_len,
    })
}

async fn list_models(State(st): State<Arc<AppState>>) -> Json<Value> {
    let mut data = vec![model_card(&st)];
    data.extend(st.engine.adapters().iter().map(|a| adapter_card(&st, a)));
    Json(json!({"object": "list", "data": data}))
}

/// The ids a request's `model` may name.
fn served_ids(st: &AppState) -> String {
    std::iter::once(st.opts.served_name.clone())
        .chain(st.engine.adapters().iter().map(|a| a.name.clone()))
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn no_such_model(st: &AppState, id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("the model `{id}` does not exist; this server serves {}", served_ids(st)),
    )
    .param("model")
    .code("model_not_found")
}

async fn get_model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if id == st.opts.served_name {
        return Json(model_card(&st)).into_response();
    }
    match st.engine.adapter(&id) {
        Some(a) => Json(adapter_card(&st, &a)).into_response(),
        None => no_such_model(&st, &id).into_response(),
    }
}

/// The adapter a request's `model` picks: None for the base's name (or no name). Another name is refused once
/// adapters are served by name; a server of one model answers whatever name is sent, as LLaMA-Factory's does.
fn pick_model(st: &AppState, model: Option<&str>) -> Result<Option<Arc<NamedAdapter>>, ApiError> {
    let Some(id) = model.filter(|m| *m != st.opts.served_name) else { return Ok(None) };
    if let Some(a) = st.engine.adapter(id) {
        return Ok(Some(a));
    }
    if st.engine.adapters().is_empty() && st.opts.lora_dir.is_none() {
        return Ok(None);
    }
    Err(no_such_model(st, id))
}

/// The JSON object of a load / unload body, with its string fields.
fn lora_body(bytes: &[u8], keys: &[&str]) -> Result<Vec<String>, ApiError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad(format!("the request body is not valid JSON: {e}")).code("invalid_json"))?;
    keys.iter()
        .map(|k| match v.get(*k) {
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
            _ => Err(ApiError::bad(format!("'{k}' must be a non-empty string")).param(*k)),
        })
        .collect()
}

/// `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` (vLLM's names): serves one more adapter on the base,
/// read from a folder inside `--lora-dir`.
async fn load_lora_adapter(State(st): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    let Some(root) = st.opts.lora_dir.clone() else {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "loading adapters at run time is off; start the server with --lora-dir DIR (the folder adapters may be \
             loaded from)",
        )
        .into_response();
    };
    let (name, path) = match lora_body(&body, &["lora_name", "lora_path"]) {
        Ok(v) => (v[0].clone(), v[1].clone()),
        Err(e) => return e.into_response(),
    };
    if !crate::cmd::serving::valid_adapter_name(&name) || name == st.opts.served_name {
        return ApiError::bad(format!(
            "'lora_name' {name:?} must be letters, digits and -_.:/, and differ from the base's name"
        ))
        .param("lora_name")
        .into_response();
    }
    if st.engine.adapter(&name).is_some() {
        return ApiError::bad(format!("an adapter named `{name}` is already loaded; unload it first"))
            .param("lora_name")
            .into_response();
    }
    // Relative paths are inside --lora-dir; whatever the spelling, the real path must stay inside it.
    let dir = match root.join(&path).canonicalize() {
        Ok(d) if d.starts_with(&root) => d,
        Ok(_) => {
            return ApiError::new(StatusCode::FORBIDDEN, format!("'lora_path' {path:?} is outside --lora-dir"))
                .param("lora_path")
                .into_response()
        }
        Err(_) => {
            return ApiError::new(StatusCode::NOT_FOUND, format!("'lora_path' {path:?}: no such folder in --lora-dir"))
                .param("lora_path")
                .into_response()
        }
    };
    let engine = st.engine.clone();
    let n = name.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(AssertUnwindSafe(|| engine.load_adapter(&n, &dir)))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("internal error while reading the adapter")))
    })
    .await
    .unwrap_or_else(|e| Err(anyhow::anyhow!("internal error: {e}")));
    let added = loaded.and_then(|a| st.engine.add_adapter(a));
    match added {
        Ok(a) => {
            eprintln!(
                "adapter `{}` loaded: rank {}, {:.1} MB ({})",
                a.name,
                a.rank,
                a.bytes as f64 / 1e6,
                a.dir.display()
            );
            let mut card = adapter_card(&st, &a);
            card["bytes"] = a.bytes.into();
            Json(card).into_response()
        }
        Err(e) => ApiError::bad(format!("{e:#}")).param("lora_path").into_response(),
    }
}

/// `POST /v1/unload_lora_adapter {"lora_name"}`: stops serving an adapter (running requests finish with it).
async fn unload_lora_adapter(State(st): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    let name = match lora_body(&body, &["lora_name"]) {
        Ok(v) => v[0].clone(),
        Err(e) => return e.into_response(),
    };
    match st.engine.remove_adapter(&name) {
        Some(a) => {
            eprintln!("adapter `{}` unloaded", a.name);
            Json(json!({"id": a.name, "object": "model", "deleted": true})).into_response()
        }
        None => no_such_model(&st, &name).param("lora_name").into_response(),
    }
}

/// Runs `fut` as its own task so that a panic in it becomes a 500 response instead of a dropped connection; the
/// task is aborted when the caller (the connection) goes away.
async fn panic_to_500(fut: impl Future<Output = Response> + Send + 'static) -> Response {
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let task = tokio::spawn(fut);
    let _abort = AbortOnDrop(task.abort_handle());
    match task.await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("internal error: request handler failed: {e}");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error while handling the request")
                .into_response()
        }
    }
}

async fn chat_completions(State(st): State<Arc<AppState>>, body: Body) -> Response {
    panic_to_500(handle_chat(st, body)).await
}

/// A request ready to generate.
struct Prepared {
    prompt: Prompt,
    req: GenerateRequest,
    adapter: Option<Arc<NamedAdapter>>,
    opens_think: bool,
    /// How the answer's tool-call blocks become `tool_calls` (None: no tools, or `tool_choice: "none"`).
    tools: Option<Tools>,
}

/// The request's tools, for reading the answer.
#[derive(Clone)]
struct Tools {
    list: Vec<Value>,
    /// The start of a call written into the prompt by `tool_choice` "required" or a named function: the
    /// answer continues it.
    forced: String,
    /// false: only the first call block is a call.
    parallel: bool,
}

impl Tools {
    /// A whole answer's content and calls (`text`: what follows the prompt, reasoning removed).
    fn read(&self, text: &str) -> (String, Vec<ToolCall>) {
        let text = format!("{}{text}", self.forced);
        let mut ids = CallIds::random();
        if self.parallel {
            let p = tool_calls::parse(&text, &self.list, &mut ids);
            return (p.content, p.calls);
        }
        // One call at most: what follows the first block stays text.
        let (head, tail) = text.split_at(tool_calls::first_block_end(&text).unwrap_or(text.len()));
        let p = tool_calls::parse(head, &self.list, &mut ids);
        let content = format!("{}{}", p.content, tail).trim().to_string();
        (content, p.calls)
    }
}

fn random_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..24).map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0')).collect()
}

async fn handle_chat(st: Arc<AppState>, body: Body) -> Response {
    let t0 = Instant::now();
    let id = format!("chatcmpl-{}", random_id());
    // Admitted before the body is buffered and the (possibly costly) images decoded, so that a flood of requests,
    // slow ones included, is turned away cheaply.
    let Some(slot) = Slot::take(&st) else {
        let e =
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too many requests are waiting for the model; retry later")
                .code("server_busy");
        return log_error(&st, &id, t0, e).into_response();
    };
    let read = tokio::time::timeout(st.opts.body_timeout, axum::body::to_bytes(body, st.opts.max_body_bytes));
    let Ok(read) = read.await else {
        let e = ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s (set by --body-timeout-secs)",
                st.opts.body_timeout.as_secs()
            ),
        )
        .code("request_timeout");
        return log_error(&st, &id, t0, e).into_response();
    };
    let bytes = match read {
        Ok(b) => b,
        Err(e) => {
            let too_big = std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("length limit"));
            let err = if too_big {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is larger than {} bytes", st.opts.max_body_bytes),
                )
            } else {
                ApiError::bad(format!("cannot read the request body: {e}"))
            };
            return log_error(&st, &id, t0, err).into_response();
        }
    };
    let parsed = std::panic::catch_unwind(|| ChatRequest::parse(&bytes)).unwrap_or_else(|_| {
        Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error while reading the request"))
    });
    let r = match parsed {
        Ok(r) => r,
        Err(e) => return log_error(&st, &id, t0, e).into_response(),
    };
    if let Err(e) = check_limits(&r, &st.opts) {
        return log_error(&st, &id, t0, e).into_response();
    }
    let adapter = match pick_model(&st, r.model.as_deref()) {
        Ok(a) => a,
        Err(e) => return log_error(&st, &id, t0, e).into_response(),
    };
    let model = adapter.as_ref().map_or_else(|| st.opts.served_name.clone(), |a| a.name.clone());
    let engine = st.engine.clone();
    let opts = st.opts.clone();
    let stream = r.stream;
    let include_usage = r.include_usage;
    let prepared = match st.preparing.acquire().await {
        Ok(_permit) => tokio::task::spawn_blocking(move || {
            std::panic::catch_unwind(AssertUnwindSafe(|| prepare(&engine, &opts, r, adapter))).unwrap_or_else(|_| {
                Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error while building the prompt"))
            })
        })
        .await
        .unwrap_or_else(|e| Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e}")))),
        Err(_) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down")),
    };
    let p = match prepared {
        Ok(p) => p,
        Err(e) => return log_error(&st, &id, t0, e).into_response(),
    };
    let chunk = ChunkMaker { id: id.clone(), created: unix_now(), model };
    if stream {
        stream_response(st, slot, p, chunk, include_usage, t0)
    } else {
        complete_response(st, slot, p, chunk, t0).await
    }
}

/// The per-request limits that need no decoding: images per request, stop sequences.
fn check_limits(r: &ChatRequest, opts: &ServerOptions) -> Result<(), ApiError> {
    if r.images.len() > opts.max_images {
        return Err(ApiError::bad(format!(
            "the request carries {} images; this server takes at most {} a request (set by --max-images)",
            r.images.len(),
            opts.max_images
        ))
        .param("messages")
        .code("too_many_images"));
    }
    if r.stop.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::bad(format!(
            "{} stop sequences given; at most {MAX_STOP_SEQUENCES} are accepted",
            r.stop.len()
        ))
        .param("stop"));
    }
    if let Some((i, s)) = r.stop.iter().enumerate().find(|(_, s)| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad(format!(
            "stop sequence {i} is {} bytes long; each may be at most {MAX_STOP_BYTES} bytes",
            s.len()
        ))
        .param(format!("stop[{i}]")));
    }
    Ok(())
}

fn log_error(st: &AppState, id: &str, t0: Instant, e: ApiError) -> ApiError {
    st.stats.errors.fetch_add(1, Ordering::Relaxed);
    eprintln!("{id} {} {:.3}s error: {}", e.status.as_u16(), t0.elapsed().as_secs_f64(), e.message);
    e
}

fn log_done(st: &AppState, id: &str, t0: Instant, wait: Duration, g: &Generation, cancelled: bool) {
    let counter = if cancelled { &st.stats.cancelled } else { &st.stats.completed };
    counter.fetch_add(1, Ordering::Relaxed);
    st.stats.tokens.fetch_add(g.token_ids.len() as u64, Ordering::Relaxed);
    st.stats.prompt_tokens.fetch_add(g.prompt_tokens as u64, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let gen_secs = (secs - wait.as_secs_f64()).max(1e-9);
    st.stats.generating_micros.fetch_add((gen_secs * 1e6) as u64, Ordering::Relaxed);
    eprintln!(
        "{id} 200 prompt={} completion={} finish={} {:.3}s (queued {:.3}s, {:.1} tok/s){}",
        g.prompt_tokens,
        g.token_ids.len(),
        if g.finish_reason == FinishReason::Cancelled { "cancelled" } else { g.finish_reason.as_openai() },
        secs,
        wait.as_secs_f64(),
        g.token_ids.len() as f64 / gen_secs,
        if cancelled { " cancelled: client went away" } else { "" }
    );
}

/// Decodes the images, renders and tokenizes the prompt, checks the context length and settles the sampling.
fn prepare(
    engine: &Engine,
    opts: &ServerOptions,
    mut r: ChatRequest,
    adapter: Option<Arc<NamedAdapter>>,
) -> Result<Prepared, ApiError> {
    let images = r.images.iter().map(|i| media::load(&i.url, &opts.media, &i.param)).collect::<Result<Vec<_>, _>>()?;
    // An empty assistant message at the end asks for a plain answer, not a continuation.
    let final_text = if r.continue_final { text_of(r.messages.last()) } else { String::new() };
    if r.continue_final && final_text.trim().is_empty() {
        r.messages.pop();
        r.continue_final = false;
    }
    let mut ro = RenderOptions {
        add_generation_prompt: !r.continue_final,
        enable_thinking: r.enable_thinking.or(opts.enable_thinking),
        extra: r.template_kwargs.clone(),
    };
    let template = engine.template_for(adapter.as_deref());
    let format = CallFormat::of_template(&template.source);
    if !r.tools.is_empty() {
        if format.is_none() {
            return Err(ApiError::bad(format!(
                "'tools' given, but the chat template ({}) writes no tool calls: this model was not trained to call \
                 functions",
                template.path.display()
            ))
            .param("tools")
            .code("unsupported_parameter"));
        }
        ro.extra.insert("tools".into(), Value::Array(r.tools.clone()));
    }
    let mut text = template
        .render(&Value::Array(r.messages), &ro)
        .map_err(|e| ApiError::bad(format!("{e:#}")).param("messages").code("invalid_conversation"))?;
    let mut tools = None;
    if !r.tools.is_empty() && r.tool_choice != ToolChoice::None {
        let mut forced = String::new();
        let name = match &r.tool_choice {
            ToolChoice::Function(n) => Some(Some(n.as_str())),
            ToolChoice::Required => Some(None),
            _ => None,
        };
        let forced_prefix = format.zip(name).filter(|_| !r.continue_final);
        if let Some(f) = forced_prefix.map(|(format, name)| tool_calls::forced_call_prefix(format, name)) {
            // A call is the answer: a think block the prompt opened closes empty first.
            if ThinkSplitter::prompt_opens_think(&text) {
                text.push_str("\n</think>\n\n");
            }
            text.push_str(&f);
            forced = f;
        }
        tools = Some(Tools { list: r.tools.clone(), forced, parallel: r.parallel_tool_calls });
    }
    if r.continue_final {
        // As transformers' continue_final_message: the prompt ends where the final message's text ends.
        let tail = final_text.trim_end();
        match text.rfind(tail) {
            Some(i) => text.truncate(i + tail.len()),
            None => {
                return Err(ApiError::bad(
                    "the chat template does not render the final assistant message verbatim, so it cannot be continued",
                )
                .param("messages"))
            }
        }
    }
    let opens_think = ThinkSplitter::prompt_opens_think(&text);
    let prompt = engine
        .prompt_from_text(&text, &images)
        .map_err(|e| ApiError::bad(format!("{e:#}")).param("messages").code("invalid_prompt"))?;
    let n = prompt.ids.len();
    let limit = opts.max_model_len;
    if n >= limit {
        return Err(ApiError::bad(format!(
            "this model's maximum context length is {limit} tokens, but the messages have {n} tokens; \
             shorten them (or send fewer or smaller images)"
        ))
        .param("messages")
        .code("context_length_exceeded"));
    }
    let max_tokens = match r.max_tokens {
        Some(m) if n + m > limit => {
            return Err(ApiError::bad(format!(
                "this model's maximum context length is {limit} tokens, but {} were requested ({n} in the messages, \
                 {m} in the completion); reduce the messages or max_tokens",
                n + m
            ))
            .param("max_tokens")
            .code("context_length_exceeded"))
        }
        Some(m) => m,
        None => opts.max_new_tokens.unwrap_or(limit).min(limit - n),
    };
    let mut s = opts.sampling.clone();
    if let Some(t) = r.temperature {
        s.temperature = t;
    }
    if let Some(p) = r.top_p {
        s.top_p = p;
    }
    if let Some(k) = r.top_k {
        s.top_k = k;
    }
    if let Some(p) = r.repetition_penalty {
        s.repetition_penalty = p;
    }
    if let Some(p) = r.presence_penalty {
        s.presence_penalty = p;
    }
    if let Some(p) = r.frequency_penalty {
        s.frequency_penalty = p;
    }
    if r.seed.is_some() {
        s.seed = r.seed;
    }
    Ok(Prepared { prompt, req: GenerateRequest { sampling: s, max_tokens, stop: r.stop }, adapter, opens_think, tools })
}

fn text_of(msg: Option<&Value>) -> String {
    match msg.and_then(|m| m.get("content")) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect(),
        _ => String::new(),
    }
}

/// A request admitted to the queue: it counts in `waiting` from when it is read until it gets the engine or
/// ends, and the server turns new requests away while `max_waiting` are counted.
struct Slot(Arc<AppState>);

impl Slot {
    fn take(st: &Arc<AppState>) -> Option<Slot> {
        let before = st.stats.waiting.fetch_add(1, Ordering::SeqCst);
        let slot = Slot(st.clone());
        (before < st.opts.max_waiting).then_some(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.stats.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a request as running until dropped.
struct Running(Arc<AppState>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.stats.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sets its flag when dropped: the non-streaming handler holds one, and the connection dropping the handler
/// (the client went away) tells the generating thread to stop.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A request's bookkeeping in the batcher: counted as waiting until it starts, then as running; its time to
/// first token, and its log line at the end.
struct Tracker {
    st: Arc<AppState>,
    id: String,
    t0: Instant,
    queued: Instant,
    slot: Option<Slot>,
    running: Option<Running>,
    wait: Option<Duration>,
    first: FirstToken,
}

impl Tracker {
    fn new(st: &Arc<AppState>, slot: Slot, id: &str, t0: Instant) -> Self {
        Self {
            st: st.clone(),
            id: id.to_string(),
            t0,
            queued: Instant::now(),
            slot: Some(slot),
            running: None,
            wait: None,
            first: FirstToken::new(st, t0),
        }
    }

    fn started(&mut self) {
        self.slot = None;
        self.st.stats.running.fetch_add(1, Ordering::SeqCst);
        self.running = Some(Running(self.st.clone()));
        self.wait = Some(self.queued.elapsed());
    }

    /// Logs how the request ended; None when it never started (its client left while it was queued).
    fn end(&mut self, outcome: Result<Generation, anyhow::Error>) -> Option<Result<Generation, ApiError>> {
        self.running = None;
        let Some(wait) = self.wait else {
            self.st.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            eprintln!("{} cancelled while queued: client went away", self.id);
            return None;
        };
        Some(match outcome {
            Ok(g) => {
                log_done(&self.st, &self.id, self.t0, wait, &g, g.finish_reason == FinishReason::Cancelled);
                Ok(g)
            }
            Err(e) => {
                let e = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("generation failed: {e:#}"));
                Err(log_error(&self.st, &self.id, self.t0, e))
            }
        })
    }
}

/// The non-streaming request's side of the batcher: the answer goes back in one piece.
struct WholeAnswer {
    tr: Tracker,
    gone: Arc<AtomicBool>,
    tx: tokio::sync::oneshot::Sender<Result<Generation, ApiError>>,
}

impl Sink for WholeAnswer {
    fn gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }

    fn started(&mut self) {
        self.tr.started();
    }

    fn text(&mut self, _piece: &str) -> bool {
        self.tr.first.seen();
        !self.gone()
    }

    fn done(mut self: Box<Self>, outcome: anyhow::Result<Generation>) {
        let out = self.tr.end(outcome).unwrap_or_else(|| Err(ApiError::new(StatusCode::BAD_REQUEST, "cancelled")));
        let _ = self.tx.send(out);
    }
}

async fn complete_response(st: Arc<AppState>, slot: Slot, p: Prepared, chunk: ChunkMaker, t0: Instant) -> Response {
    let flag = Arc::new(AtomicBool::new(false));
    let _drop = DropFlag(flag.clone());
    let opens_think = p.opens_think;
    let tools = p.tools.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sink = WholeAnswer { tr: Tracker::new(&st, slot, &chunk.id, t0), gone: flag, tx };
    st.batcher.submit(Job { prompt: p.prompt, req: p.req, adapter: p.adapter, sink: Box::new(sink) });
    let g = match rx.await {
        Ok(Ok(g)) => g,
        Ok(Err(e)) => return e.into_response(),
        Err(_) => {
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error: generation ended early")
                .into_response()
        }
    };
    let mut message = json!({"role": "assistant", "content": g.text});
    if st.opts.split_reasoning {
        let (reasoning, content) = ThinkSplitter::split_all(opens_think, &g.text);
        message["content"] = content.into();
        if !reasoning.is_empty() {
            message["reasoning_content"] = reasoning.into();
        }
    }
    let mut finish = g.finish_reason.as_openai();
    if let Some(tools) = &tools {
        let (content, calls) = tools.read(message["content"].as_str().unwrap_or(""));
        if !calls.is_empty() {
            message["content"] = if content.is_empty() { Value::Null } else { content.into() };
            message["tool_calls"] = calls.iter().map(ToolCall::to_openai).collect();
            if g.finish_reason == FinishReason::Stop {
                finish = "tool_calls";
            }
        } else if !tools.forced.is_empty() {
            // A forced call that did not come out whole is text, its opening from the prompt included.
            message["content"] = content.into();
        }
    }
    Json(json!({
        "id": chunk.id,
        "object": "chat.completion",
        "created": chunk.created,
        "model": chunk.model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": usage(&g),
    }))
    .into_response()
}

fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.token_ids.len(),
        "total_tokens": g.prompt_tokens + g.token_ids.len(),
    })
}

/// Builds `chat.completion.chunk` events that share one id, creation time and model.
#[derive(Clone)]
struct ChunkMaker {
    id: String,
    created: u64,
    model: String,
}

impl ChunkMaker {
    fn event(&self, delta: Value, finish: Option<&str>, with_usage: bool) -> Event {
        let mut c = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if with_usage {
            c["usage"] = Value::Null; // OpenAI: null on every chunk but the last when usage is asked for
        }
        Event::default().data(c.to_string())
    }

    fn usage_event(&self, g: &Generation) -> Event {
        Event::default().data(
            json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage(g),
            })
            .to_string(),
        )
    }
}

/// The streaming request's side of the batcher: each piece of text becomes a chunk event.
struct Streamed {
    tr: Tracker,
    tx: mpsc::UnboundedSender<Event>,
    chunk: ChunkMaker,
    splitter: Option<ThinkSplitter>,
    include_usage: bool,
    /// Content goes through it when the request has tools: call blocks become `tool_calls` deltas.
    calls: Option<StreamedCalls>,
}

struct StreamedCalls {
    parser: StreamParser,
    /// Calls sent so far.
    sent: usize,
    /// false: after the first call, the rest is text.
    parallel: bool,
    /// The one call allowed without `parallel` is out.
    one_done: bool,
}

impl Streamed {
    fn send(&mut self, parts: Vec<(Part, String)>) -> bool {
        parts.into_iter().all(|(part, text)| match part {
            Part::Reasoning => self.delta(json!({ "reasoning_content": text })),
            Part::Content => self.content(&text, false),
        })
    }

    fn delta(&self, delta: Value) -> bool {
        self.tx.send(self.chunk.event(delta, None, self.include_usage)).is_ok()
    }

    /// Content text, through the tool-call parser when there is one (`last`: flush what it holds).
    fn content(&mut self, text: &str, last: bool) -> bool {
        let deltas = match self.calls.as_mut() {
            Some(c) => c.feed(text, last),
            None if text.is_empty() => vec![],
            None => vec![json!({ "content": text })],
        };
        deltas.into_iter().all(|d| self.delta(d))
    }
}

impl StreamedCalls {
    /// The deltas of the next content text: text and whole calls (`last`: flush what the parser holds).
    fn feed(&mut self, text: &str, last: bool) -> Vec<Value> {
        let is_call = |e: &tool_calls::Event| matches!(e, tool_calls::Event::Call { .. });
        let mut events = Vec::new();
        if self.parallel {
            events = self.parser.push(text);
        } else {
            // One call at most: the text goes in up to each `>` (where a block can close); once the call is out,
            // what the parser holds and all that follows is text.
            for seg in text.split_inclusive('>') {
                if self.one_done {
                    events.push(tool_calls::Event::Text(seg.to_string()));
                    continue;
                }
                let got = self.parser.push(seg);
                self.one_done = got.iter().any(is_call);
                events.extend(got);
                if self.one_done {
                    events.extend(self.parser.finish());
                }
            }
        }
        if last && !self.one_done {
            events.extend(self.parser.finish());
        }
        let mut deltas = Vec::new();
        for e in events {
            match e {
                tool_calls::Event::Text(t) if t.is_empty() => {}
                tool_calls::Event::Text(t) => deltas.push(json!({ "content": t })),
                tool_calls::Event::Call { index, call } => {
                    self.sent += 1;
                    deltas.push(json!({ "tool_calls": [call.to_openai_delta(index)] }));
                }
            }
        }
        deltas
    }
}

impl Sink for Streamed {
    fn gone(&self) -> bool {
        self.tx.is_closed()
    }

    fn started(&mut self) {
        self.tr.started();
    }

    fn text(&mut self, piece: &str) -> bool {
        self.tr.first.seen();
        let parts = match self.splitter.as_mut() {
            Some(s) => s.push(piece),
            None if piece.is_empty() => vec![],
            None => vec![(Part::Content, piece.to_string())],
        };
        // Text held back by the splitter sends nothing, so the closed channel is checked as well.
        self.send(parts) && !self.tx.is_closed()
    }

    fn done(mut self: Box<Self>, outcome: anyhow::Result<Generation>) {
        match self.tr.end(outcome) {
            Some(Ok(g)) => {
                if let Some(rest) = self.splitter.as_mut().map(|s| s.finish()) {
                    self.send(rest);
                }
                self.content("", true);
                let called = self.calls.as_ref().is_some_and(|c| c.sent > 0);
                let finish = if called && g.finish_reason == FinishReason::Stop {
                    "tool_calls"
                } else {
                    g.finish_reason.as_openai()
                };
                let _ = self.tx.send(self.chunk.event(json!({}), Some(finish), self.include_usage));
                if self.include_usage {
                    let _ = self.tx.send(self.chunk.usage_event(&g));
                }
            }
            Some(Err(e)) => {
                let _ = self.tx.send(Event::default().data(e.body().to_string()));
            }
            None => {}
        }
        let _ = self.tx.send(Event::default().data("[DONE]"));
    }
}

fn stream_response(
    st: Arc<AppState>,
    slot: Slot,
    p: Prepared,
    chunk: ChunkMaker,
    include_usage: bool,
    t0: Instant,
) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<Event>();
    // The role comes first, as OpenAI sends it, before the request may wait for the engine.
    let _ = tx.send(chunk.event(json!({"role": "assistant", "content": ""}), None, include_usage));
    let splitter = st.opts.split_reasoning.then(|| ThinkSplitter::new(p.opens_think));
    let calls = p.tools.as_ref().map(|t| {
        let mut parser = StreamParser::new(t.list.clone(), CallIds::random());
        // The forced opening of a call is held by the parser until the block closes.
        let held = parser.push(&t.forced);
        debug_assert!(held.is_empty());
        StreamedCalls { parser, sent: 0, parallel: t.parallel, one_done: false }
    });
    let sink = Streamed { tr: Tracker::new(&st, slot, &chunk.id, t0), tx, chunk, splitter, include_usage, calls };
    st.batcher.submit(Job { prompt: p.prompt, req: p.req, adapter: p.adapter, sink: Box::new(sink) });
    let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(Ok::<Event, Infallible>);
    // Comments every few seconds keep proxies from timing out while queued, and reveal a closed connection.
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(5))).into_response()
}
