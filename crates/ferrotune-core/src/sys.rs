//! What the operating system says about this process and its disk: peak memory, CPU time, free space. Shared by
//! training (its results and the pre-flight disk check) and the benchmarks.

use std::path::Path;

/// Sets glibc's allocator to keep freed memory for reuse: every op of a forward pass allocates its output, and with
/// the default thresholds buffers of a few hundred KB to a few MB are handed back to the kernel on free and
/// page-faulted in again on the next allocation (30% of a 100-token prefill of a 135M model). Blocks under 64 MB
/// come from the heap, and up to 256 MB of free heap is kept; peak memory stays the same (a 4B training step:
/// 9.68 GB either way). All threads share one arena: compute loops run on whichever worker of the pool picks them
/// up, and with an arena per thread the memory one run freed stayed with its worker's arena while the next run, on
/// the other worker, allocated anew (a 4B batch-8 decode bench peaked at 12.9 GB instead of 10.7 GB, at the same
/// speed). Call once at start, before threads allocate. Elsewhere than glibc, or with
/// `FERROTUNE_DEFAULT_MALLOC=1`, it does nothing.
pub fn tune_allocator() {
    if std::env::var_os("FERROTUNE_DEFAULT_MALLOC").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Spins candle's elementwise-op workers for at most 256 turns (candle's default: 25,000) before they sleep. Its
/// pool runs beside the matrix products' rayon pool on the same cores, and a worker spinning after every large
/// elementwise op (an image's vision tower has many) takes a core from the products: prefills with an image of
/// the 135M preset took 94 ms, 73 ms with this limit (100 to 1,000 alike; 0 is slower). A limit the user set in
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` stays. Call once at start, before other threads exist.
pub fn tune_threads() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "256");
    }
}

/// Peak resident set size of this process in bytes (the kernel's high-water mark), where the platform tells it
/// in a known unit (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use nix::sys::resource::{getrusage, UsageWho};
        // Linux reports `ru_maxrss` in KiB (the `VmHWM` of /proc/self/status).
        let kib = getrusage(UsageWho::RUSAGE_SELF).ok()?.max_rss();
        u64::try_from(kib).ok().map(|k| k * 1024)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Process CPU time (user + system, all threads) in seconds; 0 where the platform cannot tell.
pub fn cpu_seconds() -> f64 {
    #[cfg(unix)]
    {
        use nix::sys::resource::{getrusage, UsageWho};
        let Ok(usage) = getrusage(UsageWho::RUSAGE_SELF) else { return 0.0 };
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 * 1e-6;
        secs(usage.user_time()) + secs(usage.system_time())
    }
    #[cfg(not(unix))]
    {
        0.0
    }
}

/// Bytes an unprivileged process may still write on the filesystem holding `dir`, when the platform can tell.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        let st = nix::sys::statvfs::statvfs(dir).ok()?;
        Some(st.blocks_available() as u64 * st.fragment_size() as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_has_memory_cpu_time_and_disk() {
        // Burn a little CPU so that the clock has something to count.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
        if cfg!(target_os = "linux") {
            assert!(super::peak_rss_bytes().unwrap() > 1 << 20);
            assert!(super::cpu_seconds() > 0.0);
            assert!(super::free_bytes(&std::env::temp_dir()).is_some());
        }
    }
}
