//! `ferrotune api` as a process under hostile clients: a PNG header claiming 100,000 × 100,000 pixels, 64 images
//! in one request, a request without `max_tokens`, 1,000 stop strings, a body that never arrives and 300
//! connections at once, each answered with its 4xx / 429 while normal requests keep being answered, and the
//! server's peak memory (VmHWM) under [`PEAK_RSS_BOUND`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::cli::{adapter, tiny};

/// The bound on the server's peak resident memory through the whole hostile set (the tiny model's server
/// alone peaks near 100 MB; decoding the claimed image would take 30 GB).
const PEAK_RSS_BOUND: u64 = 512 << 20;

pub(crate) struct Server {
    child: Child,
    pub(crate) addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Peak resident memory so far, from /proc (Linux).
    fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    }
}

fn start() -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    cmd.args(["api", "--model_name_or_path"])
        .arg(tiny())
        .arg("--adapter_name_or_path")
        .arg(adapter())
        .args(["--max_new_tokens", "48", "--body-timeout-secs", "1"])
        .args(["--max-connections", "200", "--header-timeout-secs", "3"]);
    spawn(cmd)
}

/// Starts `cmd` (an `api` command line without --port) on a free port and waits until it listens.
pub(crate) fn spawn(mut cmd: Command) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = cmd
        .args(["--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ferrotune api");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t = Instant::now();
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("ferrotune api exited: {status}");
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the server did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child, addr }
}

/// Status and body of one request (`Connection: close`).
fn request(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default())
}

fn chat(addr: SocketAddr, req: &Value) -> (u16, String) {
    let body = req.to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    request(addr, &head, body.as_bytes())
}

fn normal(addr: SocketAddr) {
    let (status, body) = chat(addr, &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}));
    assert_eq!(status, 200, "a normal request: {body}");
}

fn error_of(status: u16, body: &str, want: u16, mentions: &str) {
    assert_eq!(status, want, "{body}");
    let j: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not an OpenAI error body: {body}"));
    let msg = j["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(mentions), "the error names {mentions}: {msg}");
}

/// A PNG whose header claims `w × h` pixels (valid chunks, a few bytes of data).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut v = (data.len() as u32).to_be_bytes().to_vec();
        let body: Vec<u8> = kind.iter().chain(data).copied().collect();
        v.extend(&body);
        v.extend(crc32(&body).to_be_bytes());
        v
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]));
    png.extend(chunk(b"IEND", &[]));
    png
}

fn image_part(png: &[u8]) -> Value {
    let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png));
    json!({"type": "image_url", "image_url": {"url": url}})
}

#[test]
fn hostile_clients_get_their_4xx_normal_ones_are_served_and_memory_stays_bounded() {
    let s = start();
    let addr = s.addr;
    normal(addr);
    // A header claiming 10^10 pixels: refused from the header, never decoded.
    let huge = json!({"messages": [{"role": "user", "content": [image_part(&png_claiming(100_000, 100_000)),
                                                                 {"type": "text", "text": "?"}]}]});
    let (st, body) = chat(addr, &huge);
    error_of(st, &body, 400, "--max-image-pixels");
    // 64 images in one request.
    let mut small = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(32, 32).write_to(&mut small, image::ImageFormat::Png).unwrap();
    let parts: Vec<Value> = (0..64).map(|_| image_part(small.get_ref())).collect();
    let (st, body) = chat(addr, &json!({"messages": [{"role": "user", "content": parts}]}));
    error_of(st, &body, 400, "--max-images");
    // No max_tokens: the server's cap (--max_new_tokens 48 here) ends it.
    let (st, body) = chat(addr, &json!({"messages": [{"role": "user", "content": "Go on."}], "temperature": 0}));
    assert_eq!(st, 200, "{body}");
    let j: Value = serde_json::from_str(&body).unwrap();
    assert!(j["usage"]["completion_tokens"].as_u64().unwrap() <= 48, "{body}");
    // 1,000 stop strings.
    let stops: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
    let (st, body) = chat(addr, &json!({"messages": [{"role": "user", "content": "Hi"}], "stop": stops}));
    error_of(st, &body, 400, "at most 4");
    // A body announced and never sent: 408 after --body-timeout-secs, while a normal request is answered.
    let slow = std::thread::spawn(move || {
        request(addr, "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n", b"{\"mess")
    });
    normal(addr);
    let (st, body) = slow.join().unwrap();
    error_of(st, &body, 408, "--body-timeout-secs");
    // 300 connections at once that send nothing: 100 over --max-connections are answered 429, the others closed
    // by the header timeout (3 s: the kernel may delay some of the 300 handshakes by a second); then normal
    // requests are served again.
    let conns: Vec<TcpStream> = (0..300).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let ends: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut out = Vec::new();
                let ok = c.read_to_end(&mut out).is_ok();
                (ok, String::from_utf8_lossy(&out).into_owned())
            })
        })
        .collect();
    let mut refused = 0;
    for e in ends {
        let (ok, text) = e.join().unwrap();
        assert!(ok, "every connection ends within the header timeout");
        if let Some(body) = text.strip_prefix("HTTP/1.1 429") {
            assert!(body.contains("--max-connections"), "{text}");
            refused += 1;
        }
    }
    assert_eq!(refused, 100, "connections over the cap of 200");
    for _ in 0..3 {
        normal(addr);
    }
    let (st, metrics) = request(addr, "GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", b"");
    assert_eq!(st, 200);
    assert!(metrics.contains("ferrotune_refused_connections_total 100"), "{metrics}");
    let peak = s.peak_rss();
    match peak {
        Some(peak) => {
            eprintln!("server peak RSS: {:.0} MB", peak as f64 / 1e6);
            assert!(peak < PEAK_RSS_BOUND, "server peak RSS {peak} B over the bound {PEAK_RSS_BOUND} B");
        }
        None => eprintln!("SKIPPED the peak-RSS check: /proc/<pid>/status is not readable on this system"),
    }
}

#[test]
fn adapters_named_in_the_yaml_file_are_served_by_name() {
    let dir = std::env::temp_dir().join(format!("ferrotune-serve-named-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let other = crate::cli::fixtures().join("golden/ferrotune_adapter");
    let yaml = dir.join("api.yaml");
    std::fs::write(
        &yaml,
        format!(
            "model_name_or_path: {}\nadapter_name_or_path:\n  robots: {}\n  docs: {}\nmax_new_tokens: 4\n",
            tiny().display(),
            adapter().display(),
            other.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    cmd.arg("api").arg(&yaml);
    let s = spawn(cmd);
    let head = "GET /v1/models HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let (status, body) = request(s.addr, head, b"");
    assert_eq!(status, 200, "{body}");
    let j: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = j["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["tiny-qwen3_5", "docs", "robots"]);
    for model in ["robots", "docs", "tiny-qwen3_5"] {
        let (status, body) = chat(s.addr, &json!({"model": model, "messages": [{"role": "user", "content": "Hi"}]}));
        assert_eq!(status, 200, "{model}: {body}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["model"], model);
    }
    let (status, body) = chat(s.addr, &json!({"model": "nobody", "messages": [{"role": "user", "content": "Hi"}]}));
    error_of(status, &body, 404, "robots");
    // Names on some entries only, and names for `chat`, are refused before anything loads.
    for args in [vec!["api".to_string()], vec!["chat".to_string(), "--prompt".to_string(), "hi".to_string()]] {
        let list = if args[0] == "api" {
            format!("robots={},{}", adapter().display(), other.display())
        } else {
            format!("robots={}", adapter().display())
        };
        let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
            .args(&args)
            .arg("--model_name_or_path")
            .arg(tiny())
            .args(["--adapter_name_or_path", &list])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("NAME=DIR"), "{args:?}: {err}");
    }
}

/// The weather tool of tests/fixtures/tool_calls, as a client sends it.
fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                       "required": ["city"]}}})
}

/// The tiny checkpoint trained on tests/fixtures/tool_calls (LLaMA-Factory's sharegpt rows with a `tools` column,
/// `function_call` and `observation` turns), once for all the tests that serve it.
pub(crate) fn tool_adapter() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        // In cargo's scratch folder for this package's tests (inside target/), trained anew each run.
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("tool-calls-adapter");
        train_tool_adapter(&dir);
        dir
    })
}

/// `ferrotune train tools/tool_calls_train.yaml`, the documented recipe, with its paths made absolute.
fn train_tool_adapter(out: &std::path::Path) {
    let fixtures = crate::cli::fixtures();
    let yaml = fixtures.join("../../tools/tool_calls_train.yaml");
    let run = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .arg("train")
        .arg(&yaml)
        .arg(format!("model_name_or_path={}", tiny().display()))
        .arg(format!("dataset_dir={}", fixtures.join("tool_calls").display()))
        .arg(format!("output_dir={}", out.display()))
        .output()
        .unwrap();
    assert!(run.status.success(), "ferrotune train: {}", String::from_utf8_lossy(&run.stderr));
}

/// A model trained on tool-calling rows answers through the API with OpenAI `tool_calls` (whole and streamed),
/// then answers from the tool's result: the LLaMA-Factory data format, the template written by training and the
/// server's tool rendering and parsing, end to end.
#[test]
fn a_model_trained_on_tool_calls_calls_its_tool_through_the_api() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    cmd.args(["api", "--model_name_or_path"]).arg(tiny()).arg("--adapter_name_or_path").arg(tool_adapter());
    let s = spawn(cmd);
    let ask = |city: &str| json!({"role": "user", "content": format!("What is the weather in {city}?")});
    for (city, answer) in
        [("Paris", "It is sunny in Paris, 21 degrees."), ("Oslo", "It is snowing in Oslo, 4 degrees.")]
    {
        let (status, body) =
            chat(s.addr, &json!({"messages": [ask(city)], "tools": [weather_tool()], "temperature": 0}));
        assert_eq!(status, 200, "{body}");
        let j: Value = serde_json::from_str(&body).unwrap();
        let choice = &j["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{j}");
        assert!(choice["message"]["content"].is_null(), "{j}");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(choice["message"]["tool_calls"].as_array().unwrap().len(), 1, "{j}");
        assert!(call["id"].as_str().unwrap().starts_with("call_") && call["type"] == "function", "{j}");
        assert_eq!(call["function"]["name"], "get_weather");
        let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": city}));
        // Streamed: the same call, as one tool_calls delta.
        let (status, body) = chat(
            s.addr,
            &json!({"messages": [ask(city)], "tools": [weather_tool()], "temperature": 0, "stream": true}),
        );
        assert_eq!(status, 200, "{body}");
        let (mut deltas, mut finish) = (Vec::new(), Value::Null);
        for line in body.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|l| *l != "[DONE]") {
            let e: Value = serde_json::from_str(line).unwrap();
            deltas.extend(e["choices"][0]["delta"]["tool_calls"].as_array().cloned().unwrap_or_default());
            assert!(e["choices"][0]["delta"]["content"].as_str().unwrap_or("").is_empty(), "{line}");
            if !e["choices"][0]["finish_reason"].is_null() {
                finish = e["choices"][0]["finish_reason"].clone();
            }
        }
        assert_eq!(finish, "tool_calls");
        assert_eq!(deltas.len(), 1, "{body}");
        assert_eq!((&deltas[0]["index"], &deltas[0]["function"]), (&json!(0), &call["function"]));
        // Turn two: the call and its result in the history (arguments as the JSON string clients send).
        let result = if city == "Paris" {
            r#"{"temperature": 21, "sky": "sunny"}"#
        } else {
            r#"{"temperature": 4, "sky": "snowing"}"#
        };
        let history = json!([ask(city), {"role": "assistant", "content": null, "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": call["id"], "content": result}]);
        let (status, body) = chat(s.addr, &json!({"messages": history, "tools": [weather_tool()], "temperature": 0}));
        assert_eq!(status, 200, "{body}");
        let j: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(j["choices"][0]["message"]["content"], answer, "{j}");
        assert_eq!(j["choices"][0]["finish_reason"], "stop");
        assert!(j["choices"][0]["message"].get("tool_calls").is_none(), "{j}");
    }
    // tool_choice "none": the call block the model writes stays text.
    let (status, body) = chat(
        s.addr,
        &json!({"messages": [ask("Lima")], "tools": [weather_tool()], "tool_choice": "none", "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    let j: Value = serde_json::from_str(&body).unwrap();
    assert!(j["choices"][0]["message"]["content"].as_str().unwrap().contains("<function=get_weather>"), "{j}");
    assert_eq!(j["choices"][0]["finish_reason"], "stop");
}
