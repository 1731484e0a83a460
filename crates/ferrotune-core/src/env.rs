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
            Err(_) => format!(
                "{} (all cores; models of hidden size up to {} compute each sample on one thread, samples side by \
                 side; set RAYON_NUM_THREADS to change)",
                candle_core::utils::get_num_threads(),
                crate::device::ONE_THREAD_MAX_HIDDEN
            ),
        },
    );
    push("memory", mem_total().unwrap_or_else(|| "unknown".into()));
    for (k, v) in cuda_rows() {
        push(&k, v);
    }
    push(
        "dtypes",
        format!(
            "CPU computes in f32; bf16 base weights stay as stored, their products in bf16 ({}); \
             on CUDA bf16 weights with f32 LoRA and optimizer state",
            crate::nn::frozen::bf16_products_engine()
        ),
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

/// The CUDA driver and each GPU as CUDA reports them, or why there are none.
pub fn cuda_rows() -> Vec<(String, String)> {
    let gpus = match crate::device::gpus() {
        Ok(g) => g,
        Err(e) if cfg!(feature = "cuda") => return vec![("cuda".into(), format!("built with cuda, but {e}"))],
        Err(e) => return vec![("cuda".into(), e)],
    };
    let mut driver = String::new();
    if let Some(v) = nvidia_smi_driver() {
        driver.push_str(&format!("driver {v}, "));
    }
    if let Some((a, b)) = crate::device::driver_cuda_version() {
        driver.push_str(&format!("supports CUDA {a}.{b}, "));
    }
    let gib = |b: u64| b as f64 / (1024.0 * 1024.0 * 1024.0);
    let visible =
        std::env::var("CUDA_VISIBLE_DEVICES").map(|v| format!(" (CUDA_VISIBLE_DEVICES={v})")).unwrap_or_default();
    let mut rows = vec![("cuda".to_string(), format!("{driver}{} GPU(s) visible{visible}", gpus.len()))];
    for g in gpus {
        let (major, minor) = g.compute_capability;
        rows.push((
            format!("gpu {}", g.ordinal),
            format!(
                "{} (sm_{major}{minor}), {:.1} GiB total, {:.1} GiB free",
                g.name,
                gib(g.total_bytes),
                gib(g.free_bytes)
            ),
        ));
    }
    rows
}

/// The driver version as nvidia-smi prints it (e.g. 580.159.04), when nvidia-smi is installed.
fn nvidia_smi_driver() -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=driver_version", "--format=csv,noheader"])
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout);
    let v = s.lines().next()?.trim().to_string();
    (out.status.success() && !v.is_empty()).then_some(v)
}
