//! What `ferrotune env` prints: version, build features, CPU and SIMD, threads, devices and dtypes.

use std::fmt::Write;

/// One `key: value` line per fact, in display order.
pub fn report() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut push = |k: &str, v: String| out.push((k.to_string(), v));
    push("ferrotune version", crate::version().to_string());
    push("target", format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS));
    let mut features = vec![];
    if cfg!(feature = "cuda") {
        features.push("cuda");
    }
    push("build features", if features.is_empty() { "cpu only".into() } else { features.join(", ") });
    push("cpu", cpu_model().unwrap_or_else(|| "unknown".into()));
    push(
        "cpu cores (available)",
        std::thread::available_parallelism().map(|n| n.get().to_string()).unwrap_or("?".into()),
    );
    push("simd", simd());
    push(
        "threads",
        match std::env::var("RAYON_NUM_THREADS") {
            Ok(v) => format!("{v} (RAYON_NUM_THREADS)"),
            Err(_) => format!("{} (all cores; set RAYON_NUM_THREADS to change)", candle_core::utils::get_num_threads()),
        },
    );
    push("memory", mem_total().unwrap_or_else(|| "unknown".into()));
    push("cuda", cuda_summary());
    push(
        "dtypes",
        "CPU computes in f32 (bf16 checkpoints are upcast: bf16 arithmetic is ~2.5x slower on CPUs); \
         on CUDA bf16 weights with f32 LoRA and optimizer state"
            .into(),
    );
    push("models", crate::models::SUPPORTED.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", "));
    out
}

/// The report as aligned text.
pub fn render() -> String {
    let rows = report();
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut s = String::new();
    for (k, v) in rows {
        let _ = writeln!(s, "- {k:<w$} : {v}");
    }
    s
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

fn mem_total() -> Option<String> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = info.lines().find(|l| l.starts_with("MemTotal"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(format!("{:.1} GiB", kb / 1024.0 / 1024.0))
}

fn simd() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut v = vec![];
        if std::is_x86_feature_detected!("avx2") {
            v.push("avx2");
        }
        if std::is_x86_feature_detected!("fma") {
            v.push("fma");
        }
        if std::is_x86_feature_detected!("avx512f") {
            v.push("avx512f (used by the f32 matmul kernels)");
        }
        if std::is_x86_feature_detected!("avx512bf16") {
            v.push("avx512bf16");
        }
        if v.is_empty() {
            "sse only".into()
        } else {
            v.join(", ")
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon".into()
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "unknown".into()
    }
}

/// GPUs as CUDA reports them, or why there are none.
pub fn cuda_summary() -> String {
    #[cfg(feature = "cuda")]
    {
        match candle_core::Device::new_cuda(0) {
            Ok(_) => {
                let n = (0..16).take_while(|&i| candle_core::Device::new_cuda(i).is_ok()).count();
                let mut s = format!("{n} device(s)");
                if let Some(smi) = nvidia_smi() {
                    s.push_str(&format!("; {smi}"));
                }
                s
            }
            Err(e) => format!("built with cuda, but no usable GPU: {e}"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        "not built in (rebuild with `--features cuda`)".into()
    }
}

#[cfg(feature = "cuda")]
fn nvidia_smi() -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().replace('\n', " | ");
    (!s.is_empty()).then_some(s)
}
