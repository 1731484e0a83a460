//! The API over a real socket on 127.0.0.1: the tiny checkpoint with the PEFT adapter, requests written by hand
//! (HTTP/1.1, `Connection: close`), answers checked against the transformers + PEFT golden generations.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use candle_core::{DType, Device};
use ferrotune_core::infer::{AdapterMode, Engine};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn engine() -> Engine {
    let adapter = fixtures().join("golden/peft/adapter");
    Engine::load(&fixtures().join("tiny-qwen3_5"), &[adapter.as_path()], AdapterMode::Merge, DType::F32, &Device::Cpu)
        .expect("tiny checkpoint + adapter load")
}

fn data_url(file: &str) -> String {
    let bytes = std::fs::read(fixtures().join("golden/model").join(file)).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The golden case "one_image" of tools/golden/gen_generate.py: prompt and the 32 greedy tokens of
/// transformers + PEFT.
fn golden_one_image() -> (String, Vec<u32>, Vec<u32>) {
    let text = std::fs::read_to_string(fixtures().join("golden/generate.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    let c = cases.as_array().unwrap().iter().find(|c| c["name"] == "one_image").unwrap();
    let ids = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
    let question = c["messages"][0]["content"][1]["text"].as_str().unwrap().to_string();
    (question, ids(&c["prompt_ids"]), ids(&c["adapter"]))
}

fn image_request(question: &str, extra: Value) -> Value {
    let mut r = json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url("img_a.png")}},
            {"type": "text", "text": question}]}],
        "temperature": 0,
        "max_tokens": 32,
    });
    for (k, v) in extra.as_object().unwrap() {
        r[k] = v.clone();
    }
    r
}

struct Server {
    addr: std::net::SocketAddr,
    state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Starts a long prompt and returns once the model runs it: requests sent next queue up and start together.
async fn keep_busy(s: &Server) -> tokio::task::JoinHandle<Reply> {
    let long = json!({"messages": [{"role": "user", "content": "robot ".repeat(3000)}], "max_tokens": 1});
    let addr = s.addr;
    let blocker = tokio::spawn(async move { chat(addr, &long).await });
    while s.state.stats.running.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    blocker
}

async fn start(edit: impl FnOnce(&mut ServerOptions)) -> Server {
    start_with(engine(), edit).await
}

async fn start_with(engine: Engine, edit: impl FnOnce(&mut ServerOptions)) -> Server {
    let mut opts = ServerOptions::new("tiny-qwen3_5", 4096);
    edit(&mut opts);
    let state = AppState::new(engine, opts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, state.clone(), async move {
        let _ = rx.await;
    }));
    Server { addr, state, stop: Some(tx) }
}

struct Reply {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `data:` payloads of an SSE body.
    fn events(&self) -> Vec<String> {
        let text = String::from_utf8(self.body.clone()).unwrap();
        text.split("\n\n")
            .flat_map(|e| e.lines().filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))))
            .map(str::to_owned)
            .collect()
    }
}

/// Undoes `Transfer-Encoding: chunked`.
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else { return out };
        let size = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

async fn raw(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("{head}\r\nHost: test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("response head");
    let headers = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = headers.split(' ').nth(1).unwrap().parse().unwrap();
    let rest = &buf[split + 4..];
    let body =
        if headers.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_vec() };
    Reply { status, headers, body }
}

async fn get(addr: std::net::SocketAddr, path: &str, key: Option<&str>) -> Reply {
    let auth = key.map(|k| format!("\r\nAuthorization: Bearer {k}")).unwrap_or_default();
    raw(addr, &format!("GET {path} HTTP/1.1{auth}"), b"").await
}

async fn post(addr: std::net::SocketAddr, body: &[u8], key: Option<&str>) -> Reply {
    let auth = key.map(|k| format!("\r\nAuthorization: Bearer {k}")).unwrap_or_default();
    raw(addr, &format!("POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json{auth}"), body).await
}

async fn chat(addr: std::net::SocketAddr, req: &Value) -> Reply {
    post(addr, req.to_string().as_bytes(), None).await
}

/// Asserts an OpenAI error body with the status and (when given) the param.
fn assert_error(r: &Reply, status: u16, param: Option<&str>) -> Value {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    let e = &j["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{j}");
    assert!(e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(), "{j}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{j}");
    }
    j
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_unknown_routes() {
    let s = start(|_| {}).await;
    let r = get(s.addr, "/v1/models", None).await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["object"], "list");
    assert_eq!(j["data"][0]["id"], "tiny-qwen3_5");
    assert_eq!(j["data"][0]["object"], "model");
    assert_eq!(get(s.addr, "/v1/models/tiny-qwen3_5", None).await.json()["id"], "tiny-qwen3_5");
    assert_error(&get(s.addr, "/v1/models/gpt-3.5-turbo", None).await, 404, Some("model"));
    assert_eq!(get(s.addr, "/health", None).await.json()["status"], "ok");
    assert_error(&get(s.addr, "/v1/nothing", None).await, 404, None);
    assert_error(&get(s.addr, "/v1/chat/completions", None).await, 405, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_request_equals_transformers_and_stream_equals_non_stream() {
    // Think text left in `content`, so the answer is exactly the decoded golden tokens.
    let s = start(|o| o.split_reasoning = false).await;
    let (question, prompt_ids, golden) = golden_one_image();
    let want = s.state.engine.tokenizer.decode(&golden, true).unwrap();

    let t = Instant::now();
    let r = chat(s.addr, &image_request(&question, json!({}))).await;
    let latency = t.elapsed();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    assert_eq!(j["object"], "chat.completion");
    assert_eq!(j["model"], "tiny-qwen3_5");
    assert!(j["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &j["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], want.as_str(), "greedy answer over HTTP = transformers + PEFT");
    assert_eq!(choice["finish_reason"], "length", "32 tokens of 32: a length stop");
    assert_eq!(j["usage"]["prompt_tokens"], prompt_ids.len());
    assert_eq!(j["usage"]["completion_tokens"], 32);
    assert_eq!(j["usage"]["total_tokens"], prompt_ids.len() + 32);
    eprintln!("non-streaming, 1 image, 32 tokens: {:.0} ms", latency.as_secs_f64() * 1e3);

    let r = chat(s.addr, &image_request(&question, json!({"stream": true, "stream_options": {"include_usage": true}})))
        .await;
    assert_eq!(r.status, 200);
    assert!(r.headers.to_ascii_lowercase().contains("content-type: text/event-stream"), "{}", r.headers);
    let events = r.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let id = chunks[0]["id"].clone();
    assert!(chunks.iter().all(|c| c["id"] == id && c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 32);
    let last = &chunks[chunks.len() - 2];
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    let middle = &chunks[1..chunks.len() - 2];
    assert!(middle.len() > 1, "content arrives in several chunks");
    assert!(middle.iter().all(|c| c["choices"][0]["finish_reason"].is_null() && c["usage"].is_null()));
    let streamed: String = middle.iter().map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap()).collect();
    assert_eq!(streamed, want, "streamed greedy answer = non-streamed");

    // A stop string inside the answer ends it right before, with finish_reason "stop".
    let stop: String = want.chars().skip(5).take(2).collect();
    let j = chat(s.addr, &image_request(&question, json!({"stop": [stop.clone()]}))).await.json();
    let content = j["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(j["choices"][0]["finish_reason"], "stop");
    assert!(want.starts_with(content) && !content.contains(&stop), "{content:?} / {stop:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_content_split_and_thinking_switch() {
    let s = start(|_| {}).await;
    let (question, _, golden) = golden_one_image();
    let want = s.state.engine.tokenizer.decode(&golden, true).unwrap();
    // The template opens `<think>`; this random model never closes it, so the whole answer is reasoning.
    let j = chat(s.addr, &image_request(&question, json!({}))).await.json();
    let m = &j["choices"][0]["message"];
    let (r, c) = ThinkSplitter::split_all(true, &want);
    assert_eq!(m["reasoning_content"], r.as_str());
    assert_eq!(m["content"], c.as_str());
    let events = chat(s.addr, &image_request(&question, json!({"stream": true}))).await.events();
    let streamed: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["reasoning_content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(streamed, r);
    // enable_thinking false (per request): the template closes the block, everything is content.
    for extra in [json!({"chat_template_kwargs": {"enable_thinking": false}}), json!({"enable_thinking": false})] {
        let j = chat(s.addr, &image_request(&question, extra)).await.json();
        let m = &j["choices"][0]["message"];
        assert!(m.get("reasoning_content").is_none(), "{m}");
        assert!(!m["content"].as_str().unwrap().is_empty());
        assert!(j["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_on_v1() {
    let s = start(|o| o.api_key = Some("sekret".into())).await;
    let j = assert_error(&get(s.addr, "/v1/models", None).await, 401, None);
    assert_eq!(j["error"]["code"], "invalid_api_key");
    assert_error(&get(s.addr, "/v1/models", Some("wrong")).await, 401, None);
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).to_string();
    assert_error(&post(s.addr, body.as_bytes(), None).await, 401, None);
    assert_eq!(get(s.addr, "/v1/models", Some("sekret")).await.status, 200);
    assert_eq!(post(s.addr, body.as_bytes(), Some("sekret")).await.status, 200);
    assert_eq!(get(s.addr, "/health", None).await.status, 200, "health needs no key");
}

fn one_image(url: &str) -> Value {
    json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}],
        "max_tokens": 2, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_images_only_under_media_dir() {
    let media = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures().join("golden/model/img_b.png"), media.path().join("robot.png")).unwrap();
    std::fs::copy(fixtures().join("golden/model/img_b.png"), outside.path().join("secret.png")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(outside.path().join("secret.png"), media.path().join("link.png")).unwrap();
    let root = media.path().canonicalize().unwrap();
    let s = start(|o| o.media.media_dir = Some(root.clone())).await;
    let inside = root.join("robot.png");
    for url in [inside.display().to_string(), format!("file://{}", inside.display()), "robot.png".to_string()] {
        let r = chat(s.addr, &one_image(&url)).await;
        assert_eq!(r.status, 200, "{url}: {}", String::from_utf8_lossy(&r.body));
    }
    let param = "messages[0].content[0].image_url.url";
    let secret = outside.path().join("secret.png").display().to_string();
    for url in [
        secret.clone(),
        format!("file://{secret}"),
        "../../../../../../etc/passwd".to_string(),
        format!("{}/../{}", root.display(), "x.png"),
        "/etc/passwd".to_string(),
        #[cfg(unix)]
        "link.png".to_string(),
    ] {
        let j = assert_error(&chat(s.addr, &one_image(&url)).await, 403, Some(param));
        assert_eq!(j["error"]["code"], "path_outside_media_dir", "{url}");
    }
    assert_error(&chat(s.addr, &one_image("missing.png")).await, 400, Some(param));
    // Without --media-dir no local path is read.
    let s2 = start(|_| {}).await;
    assert_error(&chat(s2.addr, &one_image(&inside.display().to_string())).await, 403, Some(param));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_urls_refused_unless_allowed_and_never_to_private_addresses() {
    let s = start(|_| {}).await;
    let j = assert_error(&chat(s.addr, &one_image("https://example.com/robot.png")).await, 400, None);
    assert_eq!(j["error"]["code"], "remote_images_disabled");
    let s = start(|o| o.media.allow_remote = true).await;
    // The server's own address: loopback, refused before any connection.
    let url = format!("http://{}/health", s.addr);
    let j = assert_error(&chat(s.addr, &one_image(&url)).await, 403, None);
    assert_eq!(j["error"]["code"], "url_not_public");
    assert_error(&chat(s.addr, &one_image("http://169.254.169.254/latest/meta-data")).await, 403, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_openai_error() {
    let s = start(|o| {
        o.max_model_len = 20;
        o.max_body_bytes = 1 << 20;
    })
    .await;
    let param = "messages[0].content[0].image_url.url";
    let j = assert_error(&post(s.addr, b"{\"messages\": [", None).await, 400, None);
    assert_eq!(j["error"]["code"], "invalid_json");
    assert_error(&post(s.addr, b"[1, 2]", None).await, 400, None);
    let j = assert_error(&chat(s.addr, &one_image("data:image/png;base64,!!not*base64!!")).await, 400, Some(param));
    assert_eq!(j["error"]["code"], "invalid_image");
    let junk = base64::engine::general_purpose::STANDARD.encode(b"GIF89a but not really an image");
    assert_error(&chat(s.addr, &one_image(&format!("data:image/gif;base64,{junk}"))).await, 400, Some(param));
    assert_error(&chat(s.addr, &one_image("data:image/png,rawbytes")).await, 400, Some(param));
    let cases = [
        (
            json!({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}]}),
            "messages[0].content[0].type",
        ),
        (json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "warm"}), "temperature"),
        (json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}), "max_tokens"),
        (json!({"messages": [{"role": "user", "content": "hi"}], "n": 3}), "n"),
        (json!({"messages": [{"role": "user", "content": "hi"}], "stop": 7}), "stop"),
        (json!({"messages": [{"role": "wizard", "content": "hi"}]}), "messages[0].role"),
        (json!({"messages": []}), "messages"),
        (json!({"model": "x"}), "messages"),
        (json!({"messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
            "tools[0].function",
        ),
        (json!({"messages": [{"role": "user", "content": "hi"}], "tools": {"type": "function"}}), "tools"),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "retrieval", "function": {"name": "f"}}]}),
            "tools[0].type",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": ""}}]}),
            "tools[0].function.name",
        ),
        (json!({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}), "tool_choice"),
        (json!({"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]}), "functions"),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "tools": [weather_tool()],
                   "tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
            "tool_choice.function.name",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "tools": [weather_tool()], "tool_choice": "sometimes"}),
            "tool_choice",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "",
                   "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "x"}]}),
            "messages[1].tool_calls[0].function.arguments",
        ),
        // Too long for --max-model-len 20: the image alone takes more tokens; then the completion.
        (one_image(&data_url("img_a.png")), "messages"),
        (json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}), "max_tokens"),
        // The template refuses a system message after the first turn.
        (
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                              {"role": "system", "content": "late"}, {"role": "user", "content": "x"}]}),
            "messages",
        ),
    ];
    for (body, param) in cases {
        assert_error(&chat(s.addr, &body).await, 400, Some(param));
    }
    let big = vec![b' '; 2 << 20];
    assert_error(&post(s.addr, &big, None).await, 413, None);
    // Still serving after all that.
    let ok = chat(s.addr, &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})).await;
    assert_eq!(ok.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_merge_same_role_and_continue_a_prefix() {
    let s = start(|_| {}).await;
    let img = data_url("img_c.png");
    let split = json!({"max_tokens": 3, "temperature": 0, "messages": [
        {"role": "system", "content": "You describe robots."},
        {"role": "user", "content": "Here is one."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": "A robot."},
        {"role": "user", "content": [{"type": "text", "text": "More?"}]}]});
    let r = chat(s.addr, &split).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // The same conversation with the two user messages written as one gives the same prompt.
    let merged = json!({"max_tokens": 3, "temperature": 0, "messages": [
        {"role": "system", "content": "You describe robots."},
        {"role": "user", "content": [{"type": "text", "text": "Here is one."}, {"type": "text", "text": "\n\n"},
                                     {"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": "A robot."},
        {"role": "user", "content": "More?"}]});
    let a = r.json();
    let b = chat(s.addr, &merged).await.json();
    assert_eq!(a["usage"]["prompt_tokens"], b["usage"]["prompt_tokens"]);
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
    // A final assistant message is continued: no new assistant turn is opened.
    let plain = json!({"max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]});
    let prefix = json!({"max_tokens": 2, "temperature": 0, "enable_thinking": false, "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The robot"}]});
    let p0 = chat(s.addr, &plain).await.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    let p1 = chat(s.addr, &prefix).await.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    let n_prefix = s.state.engine.tokenizer.encode("<think>\n\n</think>\n\nThe robot").unwrap().len() as u64;
    // `<think>\n` of the generation prompt is replaced by the closed block + the prefix.
    assert_eq!(p1, p0 - s.state.engine.tokenizer.encode("<think>\n").unwrap().len() as u64 + n_prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_clients_are_all_answered() {
    let s = start(|_| {}).await;
    let t = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let addr = s.addr;
            tokio::spawn(async move {
                let mut req = json!({"messages": [{"role": "user", "content": format!("Client {i}")}],
                                     "max_tokens": 4, "temperature": 0, "stream": i % 2 == 0});
                if i % 4 == 1 {
                    req["messages"][0]["content"] = json!([{"type": "image_url", "image_url": {"url": data_url("img_b.png")}},
                                                          {"type": "text", "text": "Client"}]);
                }
                chat(addr, &req).await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "client {i}: {}", String::from_utf8_lossy(&r.body));
        if i % 2 == 0 {
            assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
        } else {
            assert_eq!(r.json()["usage"]["completion_tokens"], 4);
        }
    }
    assert_eq!(s.state.stats.completed.load(Ordering::Relaxed), 16);
    eprintln!("16 concurrent requests of 4 tokens: {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
}

/// Eight different requests (text and images, greedy and seeded sampling, a stop string, streamed and not) run
/// together give each the answer it gets alone, token for token, and were decoded as one batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_decoded_together_answer_as_they_do_alone() {
    let s = start(|o| o.batch.prefill_chunk = 4096).await;
    let requests: Vec<Value> = (0..8)
        .map(|i| {
            let mut r = json!({"messages": [{"role": "user", "content": format!("Describe robot number {i}.")}],
                               "max_tokens": 40, "temperature": 0, "stream": i % 3 == 0});
            if i % 2 == 1 {
                let img = if i % 4 == 1 { "img_a.png" } else { "img_b.png" };
                r["messages"][0]["content"] = json!([{"type": "image_url", "image_url": {"url": data_url(img)}},
                                                      {"type": "text", "text": format!("What is robot {i} doing?")}]);
            }
            if i == 2 || i == 5 {
                r["temperature"] = json!(0.9);
                r["seed"] = json!(1000 + i);
            }
            if i == 6 {
                r["stop"] = json!(["the"]);
            }
            r
        })
        .collect();
    // The text and token count of an answer, streamed or not.
    let answer = |r: &Reply, streamed: bool| -> (String, u64) {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        if !streamed {
            let j = r.json();
            let text = j["choices"][0]["message"]["content"].as_str().unwrap_or("").to_string();
            return (text, j["usage"]["completion_tokens"].as_u64().unwrap());
        }
        let mut text = String::new();
        let mut tokens = 0;
        for e in r.events().iter().filter(|e| e.as_str() != "[DONE]") {
            let j: Value = serde_json::from_str(e).unwrap();
            if let Some(c) = j["choices"][0]["delta"]["content"].as_str() {
                text.push_str(c);
            }
            if let Some(n) = j["usage"]["completion_tokens"].as_u64() {
                tokens = n;
            }
        }
        (text, tokens)
    };
    let mut alone = Vec::new();
    for r in &requests {
        let mut r = r.clone();
        r["stream_options"] = json!({"include_usage": true});
        alone.push(answer(&chat(s.addr, &r).await, r["stream"] == true));
    }
    assert_eq!(s.state.batcher.stats.max_rows.load(Ordering::Relaxed), 1, "one at a time so far");
    // A long prompt keeps the model busy while the eight are prepared and queue up, so that they start together.
    let blocker = keep_busy(&s).await;
    let tasks: Vec<_> = requests
        .iter()
        .map(|r| {
            let (addr, mut r) = (s.addr, r.clone());
            r["stream_options"] = json!({"include_usage": true});
            tokio::spawn(async move {
                let streamed = r["stream"] == true;
                (chat(addr, &r).await, streamed)
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let (reply, streamed) = t.await.unwrap();
        let together = answer(&reply, streamed);
        assert!(alone[i].1 > 0, "request {i} generated nothing");
        assert_eq!(together, alone[i], "request {i}: batched answer differs from its answer alone");
    }
    assert_eq!(blocker.await.unwrap().status, 200);
    let widest = s.state.batcher.stats.max_rows.load(Ordering::Relaxed);
    assert!(widest >= 4, "the eight requests should have decoded together, the widest batch was {widest}");
    eprintln!("widest batch: {widest} rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_stops_its_generation() {
    let s = start(|_| {}).await;
    let max = 3000;
    let body = json!({"messages": [{"role": "user", "content": "Talk forever."}], "max_tokens": max,
                      "temperature": 0, "stream": true, "enable_thinking": false})
    .to_string();
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(body.as_bytes()).await.unwrap();
    // Read the role chunk and two more, then hang up.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&got).matches("data: ").count() < 3 {
        let n = sock.read(&mut buf).await.unwrap();
        assert!(n > 0, "stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    drop(sock);
    let t = Instant::now();
    while s.state.stats.cancelled.load(Ordering::Relaxed) == 0 {
        assert!(t.elapsed() < Duration::from_secs(60), "generation did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tokens = s.state.stats.tokens.load(Ordering::Relaxed);
    assert!(tokens < max as u64 / 2, "{tokens} tokens generated after the client left");
    // The engine is free again.
    let r = chat(s.addr, &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_500_error_body() {
    let r = panic_to_500(async { panic!("boom") }).await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    let j: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["error"]["type"], "server_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_and_frees_up() {
    // One sequence at a time, so that a second request has to wait in the queue.
    let s = start(|o| {
        o.max_waiting = 1;
        o.batch.max_seqs = 1;
    })
    .await;
    // A long stream holds the engine...
    let body =
        json!({"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 3000, "stream": true}).to_string();
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    let head = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n", body.len());
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(body.as_bytes()).await.unwrap();
    let mut buf = [0u8; 4096];
    assert!(sock.read(&mut buf).await.unwrap() > 0);
    let t = Instant::now();
    while s.state.stats.running.load(Ordering::SeqCst) == 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "the stream did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...one request waits for it...
    let addr = s.addr;
    let second = tokio::spawn(async move {
        chat(addr, &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})).await
    });
    let t = Instant::now();
    while s.state.stats.waiting.load(Ordering::Relaxed) == 0 {
        assert!(t.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...and the next one is turned away.
    let j = assert_error(&chat(s.addr, &json!({"messages": [{"role": "user", "content": "hi"}]})).await, 429, None);
    assert_eq!(j["error"]["code"], "server_busy");
    drop(sock);
    assert_eq!(second.await.unwrap().status, 200);
    assert_eq!(s.state.stats.waiting.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_streaming_client_that_leaves_stops_too() {
    let s = start(|_| {}).await;
    let max = 3000;
    let body = json!({"messages": [{"role": "user", "content": "Go on."}], "max_tokens": max, "temperature": 0,
                      "enable_thinking": false})
    .to_string();
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    let head = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n", body.len());
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(body.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(sock);
    let t = Instant::now();
    while s.state.stats.cancelled.load(Ordering::Relaxed) == 0 {
        assert_eq!(s.state.stats.completed.load(Ordering::Relaxed), 0, "the request ran to its end");
        assert!(t.elapsed() < Duration::from_secs(60), "generation did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tokens = s.state.stats.tokens.load(Ordering::Relaxed);
    assert!(tokens < max as u64 / 2, "{tokens} tokens generated after the client left");
}

fn png_data_url(w: u32, h: u32) -> String {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes.into_inner()))
}

async fn prompt_tokens(addr: std::net::SocketAddr, url: String) -> u64 {
    let r = chat(
        addr,
        &json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}], "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["usage"]["prompt_tokens"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_images_are_pre_resized_as_in_training() {
    // With image_max_pixels 128×128, a 1024×1024 image is served as 128×128 (16 tokens), as training sees it;
    // without, the tiny checkpoint's processor alone would cap it at 65536 pixels (64 tokens).
    let s = start(|o| o.media.max_pixels = 128 * 128).await;
    let big = prompt_tokens(s.addr, png_data_url(1024, 1024)).await;
    assert_eq!(big, prompt_tokens(s.addr, png_data_url(128, 128)).await);
    let loose = start(|o| o.media.max_pixels = 1 << 30).await;
    assert_eq!(prompt_tokens(loose.addr, png_data_url(1024, 1024)).await, big + 64 - 16);
}

/// A small PNG whose header claims `w × h` pixels (chunks with correct CRCs, a few bytes of image data): what a
/// client sends to make a server allocate `w·h·3` bytes.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        let body = [kind, data].concat();
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    // 8-bit RGB, deflate, no filter method, no interlace.
    chunk(b"IHDR", &[&w.to_be_bytes()[..], &h.to_be_bytes()[..], &[8, 2, 0, 0, 0]].concat());
    chunk(b"IDAT", &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    png
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_a_4xx_naming_the_limit_and_normal_ones_go_on() {
    let s = start(|_| {}).await;
    let param = "messages[0].content[0].image_url.url";
    // A 100,000 × 100,000 header: refused from the header, before any decoding.
    assert_eq!(ferrotune_core::image::image_dimensions(&png_claiming(100_000, 100_000)), Some((100_000, 100_000)));
    // Decoding it anyway stops at the decoder's limits instead of allocating 30 GB.
    assert!(ferrotune_core::image::decode_image_within(&png_claiming(100_000, 100_000), "x", 1 << 20).is_err());
    let huge = base64::engine::general_purpose::STANDARD.encode(png_claiming(100_000, 100_000));
    let r = chat(s.addr, &one_image(&format!("data:image/png;base64,{huge}"))).await;
    let j = assert_error(&r, 400, Some(param));
    assert_eq!(j["error"]["code"], "image_too_large");
    assert!(j["error"]["message"].as_str().unwrap().contains("--max-image-pixels"), "{j}");
    // 64 images in one request: refused before any is decoded.
    let parts: Vec<Value> =
        (0..64).map(|_| json!({"type": "image_url", "image_url": {"url": data_url("img_a.png")}})).collect();
    let r = chat(s.addr, &json!({"messages": [{"role": "user", "content": parts}], "max_tokens": 1})).await;
    let j = assert_error(&r, 400, Some("messages"));
    assert_eq!(j["error"]["code"], "too_many_images");
    assert!(j["error"]["message"].as_str().unwrap().contains("--max-images"), "{j}");
    // 1,000 stop strings, and one too long.
    let stops: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
    let hi = |extra: Value| {
        let mut r = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    };
    assert_error(&chat(s.addr, &hi(json!({"stop": stops}))).await, 400, Some("stop"));
    assert_error(&chat(s.addr, &hi(json!({"stop": ["x".repeat(MAX_STOP_BYTES + 1)]}))).await, 400, Some("stop[0]"));
    // The image placeholder typed as text, with no image: bad input, not a failure inside the model.
    let r = chat(s.addr, &hi(json!({"messages": [{"role": "user", "content": "look <|image_pad|> here"}]}))).await;
    assert!((400..500).contains(&r.status), "{} {}", r.status, String::from_utf8_lossy(&r.body));
    // Still serving, and four stop strings are fine.
    let ok = chat(s.addr, &hi(json!({"stop": ["a", "b", "c", "d"]}))).await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_max_tokens_stops_at_the_servers_cap() {
    assert_eq!(ServerOptions::new("m", 262_144).max_new_tokens, Some(DEFAULT_MAX_NEW_TOKENS));
    let s = start(|o| {
        o.max_new_tokens = Some(3);
        o.sampling.temperature = 1.0;
        o.sampling.seed = Some(1);
    })
    .await;
    // Sampling with a stop-free prompt: only the cap can end it early (or an end-of-turn token, rarely).
    let r =
        chat(s.addr, &json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 1.0, "seed": 1})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    assert!(j["usage"]["completion_tokens"].as_u64().unwrap() <= 3, "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_tokens_and_time_to_first_token() {
    let s = start(|_| {}).await;
    let ok = chat(s.addr, &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}))
        .await;
    assert_eq!(ok.status, 200);
    let tokens = ok.json()["usage"]["completion_tokens"].as_u64().unwrap();
    assert_error(&chat(s.addr, &json!({"messages": []})).await, 400, Some("messages"));
    let r = get(s.addr, "/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(r.headers.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{}", r.headers);
    let text = String::from_utf8(r.body).unwrap();
    let value = |line: &str| -> f64 {
        let l = text.lines().find(|l| l.starts_with(line)).unwrap_or_else(|| panic!("no {line} in\n{text}"));
        l.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(value("ferrotune_requests_total{outcome=\"completed\"}"), 1.0);
    assert_eq!(value("ferrotune_requests_total{outcome=\"error\"}"), 1.0);
    assert_eq!(value("ferrotune_completion_tokens_total"), tokens as f64);
    assert!(value("ferrotune_prompt_tokens_total") > 0.0);
    assert_eq!(value("ferrotune_requests_running"), 0.0);
    assert_eq!(value("ferrotune_requests_waiting"), 0.0);
    assert_eq!(value("ferrotune_time_to_first_token_seconds_count"), 1.0);
    assert_eq!(value("ferrotune_time_to_first_token_seconds_bucket{le=\"+Inf\"}"), 1.0);
    assert!(value("ferrotune_generation_seconds_total") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_times_out_while_others_are_served() {
    let s = start(|o| o.body_timeout = Duration::from_millis(500)).await;
    // Headers promise 100 bytes; 10 arrive, then nothing.
    let mut slow = TcpStream::connect(s.addr).await.unwrap();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(b"{\"messages").await.unwrap();
    // A normal client meanwhile.
    let ok = chat(s.addr, &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})).await;
    assert_eq!(ok.status, 200);
    let mut buf = Vec::new();
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut buf)).await.expect("answered").unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("--body-timeout-secs"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(s.state.stats.waiting.load(Ordering::Relaxed), 0, "the slow request left the queue");
}

/// 300 connections at once that send nothing: those over --max-connections are answered 429 at once, the others
/// are closed when the header timeout passes, and then a normal request is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_over_the_cap_get_429_and_silent_ones_are_closed() {
    let s = start(|o| {
        o.max_connections = 200;
        // Long enough that the 300 handshakes (which the kernel may delay by a second) all fall inside it.
        o.header_timeout = Duration::from_secs(3);
    })
    .await;
    let t = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..300 {
        conns.push(TcpStream::connect(s.addr).await.unwrap());
    }
    let results: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let read = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut buf)).await;
                (read.is_ok(), String::from_utf8_lossy(&buf).into_owned(), Instant::now())
            })
        })
        .collect();
    let (mut refused, mut closed) = (0, 0);
    for r in results {
        let (ended, text, when) = r.await.unwrap();
        assert!(ended, "every connection ends: refused at once, or closed after the header timeout");
        if text.starts_with("HTTP/1.1 429") {
            assert!(text.contains("--max-connections") && text.contains("too_many_connections"), "{text}");
            refused += 1;
        } else {
            // Whatever a silent connection gets (nothing, or a 408), it is closed by the header timeout.
            assert!(when.duration_since(t) >= Duration::from_millis(2900), "closed after {:?}", when - t);
            closed += 1;
        }
    }
    assert_eq!((refused, closed), (100, 200));
    assert!(t.elapsed() < Duration::from_secs(8), "all 300 ended in {:?}", t.elapsed());
    let r = chat(s.addr, &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let m = String::from_utf8(get(s.addr, "/metrics", None).await.body).unwrap();
    assert!(m.contains("ferrotune_refused_connections_total 100"), "{m}");
}

/// The tiny checkpoint with `adapters` (name, folder under golden/) served by name.
fn named_engine(adapters: &[(&str, &str)]) -> Engine {
    let e = Engine::load(&fixtures().join("tiny-qwen3_5"), &[], AdapterMode::Merge, DType::F32, &Device::Cpu).unwrap();
    for (name, dir) in adapters {
        e.add_adapter(e.load_adapter(name, &fixtures().join("golden").join(dir)).unwrap()).unwrap();
    }
    e
}

async fn post_to(addr: std::net::SocketAddr, path: &str, body: &Value) -> Reply {
    raw(addr, &format!("POST {path} HTTP/1.1\r\nContent-Type: application/json"), body.to_string().as_bytes()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_model_name_answers_with_its_adapter_alone_or_batched() {
    let s = start_with(named_engine(&[("peft", "peft/adapter"), ("ours", "ferrotune_adapter")]), |o| {
        o.batch.prefill_chunk = 4096;
        o.split_reasoning = false;
    })
    .await;
    let j = get(s.addr, "/v1/models", None).await.json();
    let ids: Vec<&str> = j["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["tiny-qwen3_5", "ours", "peft"]);
    assert_eq!(j["data"][2]["parent"], "tiny-qwen3_5");
    assert_eq!(get(s.addr, "/v1/models/ours", None).await.json()["id"], "ours");
    // References: the checkpoint with each adapter as its only branch (as `chat --adapter-mode separate` loads it),
    // and without any.
    let (question, _, _) = golden_one_image();
    let reference = |dir: Option<&str>| {
        let adapters: Vec<PathBuf> = dir.map(|d| fixtures().join("golden").join(d)).into_iter().collect();
        let refs: Vec<&std::path::Path> = adapters.iter().map(PathBuf::as_path).collect();
        let e = Engine::load(&fixtures().join("tiny-qwen3_5"), &refs, AdapterMode::Separate, DType::F32, &Device::Cpu)
            .unwrap();
        let messages = json!([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]);
        let img = ferrotune_core::image::load_image(&fixtures().join("golden/model/img_a.png")).unwrap();
        let opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
        let prompt = e.prompt(&messages, &[img], &opts).unwrap();
        let req = GenerateRequest { sampling: SamplingParams::default(), max_tokens: 32, stop: vec![] };
        e.generate(&prompt, &req, |_| true).unwrap().text
    };
    let cases = [
        ("tiny-qwen3_5", reference(None)),
        ("peft", reference(Some("peft/adapter"))),
        ("ours", reference(Some("ferrotune_adapter"))),
    ];
    assert!(cases[0].1 != cases[1].1 && cases[1].1 != cases[2].1, "the adapters change the answer: {cases:?}");
    let text = |r: &Reply| -> String {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string()
    };
    for (model, want) in &cases {
        let r = chat(s.addr, &image_request(&question, json!({"model": model}))).await;
        assert_eq!(r.json()["model"], *model);
        assert_eq!(&text(&r), want, "model {model} alone");
    }
    // All three at once, twice each: one batch of rows with different adapters.
    let blocker = keep_busy(&s).await;
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let (addr, model) = (s.addr, cases[i % 3].0);
            let req = image_request(&question, json!({"model": model}));
            tokio::spawn(async move { chat(addr, &req).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(text(&r), cases[i % 3].1, "model {} batched", cases[i % 3].0);
    }
    assert_eq!(blocker.await.unwrap().status, 200);
    assert!(s.state.batcher.stats.max_rows.load(Ordering::Relaxed) >= 3, "the requests decoded together");
    assert_error(&chat(s.addr, &image_request(&question, json!({"model": "nobody"}))).await, 404, Some("model"));
    // Run-time loading is off without --lora-dir.
    let load = json!({"lora_name": "again", "lora_path": "peft/adapter"});
    assert_error(&post_to(s.addr, "/v1/load_lora_adapter", &load).await, 403, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_and_unload_at_run_time_only_from_the_lora_dir() {
    let root = fixtures().join("golden").canonicalize().unwrap();
    let s = start_with(named_engine(&[]), |o| o.lora_dir = Some(root)).await;
    let (question, _, _) = golden_one_image();
    // Before: the name is unknown (adapters may be loaded, so names are checked).
    assert_error(&chat(s.addr, &image_request(&question, json!({"model": "again"}))).await, 404, Some("model"));
    let r = post_to(s.addr, "/v1/load_lora_adapter", &json!({"lora_name": "again", "lora_path": "peft/adapter"})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["bytes"].as_u64().unwrap() > 0);
    let base = chat(s.addr, &image_request(&question, json!({"model": "tiny-qwen3_5"}))).await;
    let with = chat(s.addr, &image_request(&question, json!({"model": "again"}))).await;
    assert!(base.status == 200 && with.status == 200, "{}", String::from_utf8_lossy(&with.body));
    let (base, with) = (base.json(), with.json());
    assert_eq!(with["model"], "again");
    assert_ne!(with["choices"][0]["message"], base["choices"][0]["message"], "the loaded adapter changes the answer");
    for (body, status, param) in [
        (json!({"lora_name": "again", "lora_path": "peft/adapter"}), 400, "lora_name"),
        (json!({"lora_name": "x", "lora_path": "../tiny-qwen3_5"}), 403, "lora_path"),
        (json!({"lora_name": "x", "lora_path": "/etc"}), 403, "lora_path"),
        (json!({"lora_name": "x", "lora_path": "no/such/folder"}), 404, "lora_path"),
        (json!({"lora_name": "x", "lora_path": "model"}), 400, "lora_path"),
        (json!({"lora_name": "tiny-qwen3_5", "lora_path": "peft/adapter"}), 400, "lora_name"),
        (json!({"lora_name": "bad name", "lora_path": "peft/adapter"}), 400, "lora_name"),
        (json!({"lora_path": "peft/adapter"}), 400, "lora_name"),
    ] {
        assert_error(&post_to(s.addr, "/v1/load_lora_adapter", &body).await, status, Some(param));
    }
    let ids = |j: Value| {
        j["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    assert_eq!(ids(get(s.addr, "/v1/models", None).await.json()), ["tiny-qwen3_5", "again"]);
    let r = post_to(s.addr, "/v1/unload_lora_adapter", &json!({"lora_name": "again"})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(ids(get(s.addr, "/v1/models", None).await.json()), ["tiny-qwen3_5"]);
    assert_error(
        &post_to(s.addr, "/v1/unload_lora_adapter", &json!({"lora_name": "again"})).await,
        404,
        Some("lora_name"),
    );
    assert_error(&chat(s.addr, &image_request(&question, json!({"model": "again"}))).await, 404, Some("model"));
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"}},
            "required": ["city"]}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_reach_the_prompt_and_a_forced_call_is_its_start() {
    let s = start(|o| o.split_reasoning = false).await;
    let ask = |extra: Value| {
        let mut r =
            json!({"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 3, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    };
    let tokens = |r: &Reply| {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let engine = engine();
    let count = |text: &str| engine.tokenizer.encode(text).unwrap().len() as u64;
    // The prompt the template writes with the tools (checked against transformers in the core tests).
    let messages = json!([{"role": "user", "content": "Weather in Paris?"}]);
    let mut opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
    let plain = tokens(&chat(s.addr, &ask(json!({}))).await);
    assert_eq!(plain, count(&engine.template.render(&messages, &opts).unwrap()));
    opts.extra.insert("tools".into(), json!([weather_tool()]));
    let with_tools = engine.template.render(&messages, &opts).unwrap();
    assert!(with_tools.contains("<tools>") && with_tools.contains("get_weather"));
    assert_eq!(tokens(&chat(s.addr, &ask(json!({"tools": [weather_tool()]}))).await), count(&with_tools));
    // "none" keeps the tools in the prompt (the conversation may refer to them); calls are not read.
    let none = chat(s.addr, &ask(json!({"tools": [weather_tool()], "tool_choice": "none"}))).await;
    assert_eq!(tokens(&none), count(&with_tools));
    // A named function: the prompt ends with the call's opening (the think block the prompt opened closed
    // empty), so the model writes the arguments.
    let named =
        json!({"tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
    let forced = format!("{}\n</think>\n\n<tool_call>\n<function=get_weather>\n", with_tools);
    assert!(with_tools.ends_with("<think>\n"), "the tiny template opens a think block");
    assert_eq!(tokens(&chat(s.addr, &ask(named)).await), count(&forced));
    let required = format!("{}\n</think>\n\n<tool_call>\n<function=", with_tools);
    let r = chat(s.addr, &ask(json!({"tools": [weather_tool()], "tool_choice": "required"}))).await;
    assert_eq!(tokens(&r), count(&required));
    // The random model does not finish the call in 3 tokens: the unclosed block is text, not an error.
    let j = r.json();
    assert_eq!(j["choices"][0]["finish_reason"], "length");
    assert!(j["choices"][0]["message"]["content"].as_str().unwrap().starts_with("<tool_call>\n<function="), "{j}");
    assert!(j["choices"][0]["message"].get("tool_calls").is_none());
}

/// A made-up completion read as the non-streaming response reads it, and streamed in `pieces` pieces: (content,
/// calls without their ids) each.
fn read_both(tools: &Tools, text: &str, pieces: usize) -> [(String, Vec<Value>); 2] {
    let plain = |mut c: Value| {
        c.as_object_mut().unwrap().remove("id");
        c.as_object_mut().unwrap().remove("index");
        c
    };
    let (content, calls) = tools.read(text);
    let whole = (content, calls.iter().map(|c| plain(c.to_openai())).collect());
    let mut parser = StreamParser::new(tools.list.clone(), CallIds::seeded(1));
    assert!(parser.push(&tools.forced).is_empty());
    let mut sc = StreamedCalls { parser, sent: 0, parallel: tools.parallel, one_done: false };
    let chars: Vec<char> = text.chars().collect();
    let mut deltas = Vec::new();
    for piece in chars.chunks(chars.len().div_ceil(pieces).max(1)) {
        deltas.extend(sc.feed(&piece.iter().collect::<String>(), false));
    }
    deltas.extend(sc.feed("", true));
    let (mut content, mut calls) = (String::new(), Vec::new());
    for (i, d) in deltas.iter().enumerate() {
        content.push_str(d["content"].as_str().unwrap_or(""));
        for c in d["tool_calls"].as_array().into_iter().flatten() {
            assert_eq!(c["index"], calls.len(), "delta {i}: calls are numbered from 0");
            assert!(c["id"].as_str().unwrap().starts_with("call_"));
            calls.push(plain(c.clone()));
        }
    }
    [whole, (content.trim().to_string(), calls)]
}

#[test]
fn answers_with_call_blocks_become_tool_calls_whole_and_streamed() {
    let tools = |forced: &str, parallel: bool| Tools { list: vec![weather_tool()], forced: forced.into(), parallel };
    let call = |city: &str, days: i64| {
        format!("<tool_call>\n<function=get_weather>\n<parameter=city>\n{city}\n</parameter>\n<parameter=days>\n{days}\n</parameter>\n</function>\n</tool_call>")
    };
    let want = |city: &str, days: i64| {
        json!({"type": "function", "function": {"name": "get_weather",
               "arguments": json!({"city": city, "days": days}).to_string()}})
    };
    let two = format!("Let me check.\n\n{}\n{}", call("Paris", 2), call("Oslo", 1));
    for pieces in [1, 3, 17, two.len()] {
        // Two calls after some text.
        for got in read_both(&tools("", true), &two, pieces) {
            assert_eq!(got, ("Let me check.".to_string(), vec![want("Paris", 2), want("Oslo", 1)]), "{pieces} pieces");
        }
        // parallel_tool_calls: false — the second block stays text.
        for got in read_both(&tools("", false), &two, pieces) {
            assert_eq!(got, (format!("Let me check.\n{}", call("Oslo", 1)), vec![want("Paris", 2)]), "{pieces} pieces");
        }
        // A forced call's opening is in the prompt: the answer continues it.
        let rest = "<parameter=city>\nLima\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>";
        for got in read_both(&tools("<tool_call>\n<function=get_weather>\n", true), rest, pieces) {
            assert_eq!(got, (String::new(), vec![want("Lima", 3)]), "{pieces} pieces");
        }
        // A broken block is text.
        let broken = "Sure <tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</tool_call> done";
        for got in read_both(&tools("", true), broken, pieces) {
            assert_eq!(got, (broken.to_string(), vec![]), "{pieces} pieces");
        }
    }
}
