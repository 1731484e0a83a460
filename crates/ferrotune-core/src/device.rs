//! Device selection (`--device cpu|cuda|cuda:N|auto`) and what CUDA reports about the GPUs.
//!
//! `cuda:N` counts the GPUs that `CUDA_VISIBLE_DEVICES` leaves visible (the driver applies it), so
//! `CUDA_VISIBLE_DEVICES=3 ferrotune ... --device cuda` runs on physical GPU 3.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// Text hidden size up to which one CPU compute thread runs a sample faster than several: each operation is too
/// small to pay for handing work to other threads (`ferrotune train` of the demo's LoRA, one epoch, hidden size 192:
/// 19 s on one thread against 32 s on two, on a 2-core machine). The other cores then take other samples
/// ([`crate::parallel`]).
pub const ONE_THREAD_MAX_HIDDEN: usize = 256;

/// The text hidden size of a checkpoint's `config.json` (nested `text_config` or flat) when it is at most
/// [`ONE_THREAD_MAX_HIDDEN`]; `None` for a larger model or an unreadable config (its loader reports that).
pub fn small_model_hidden(config: &[u8]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(config).ok()?;
    let h = v.get("text_config").and_then(|t| t.get("hidden_size")).or_else(|| v.get("hidden_size"))?.as_u64()?;
    (h as usize <= ONE_THREAD_MAX_HIDDEN).then_some(h as usize)
}

/// A device request, before any GPU is touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    /// The first GPU when this build has CUDA and one is usable, else the CPU.
    Auto,
}

impl std::str::FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        Ok(match s.as_str() {
            "cpu" => DeviceSpec::Cpu,
            "cuda" | "gpu" => DeviceSpec::Cuda(0),
            "auto" => DeviceSpec::Auto,
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => DeviceSpec::Cuda(n),
                _ => bail!("device {s:?}: expected cpu, cuda, cuda:N or auto"),
            },
        })
    }
}

/// Parses and opens a device: `cpu`, `cuda` (= `cuda:0`), `cuda:N` or `auto`.
pub fn parse_device(spec: &str) -> Result<Device> {
    open(spec.parse()?)
}

/// Opens the requested device. An explicit CUDA request fails with the reason when no GPU is usable; `auto`
/// falls back to the CPU.
pub fn open(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => cuda(n),
        DeviceSpec::Auto => Ok(if cfg!(feature = "cuda") { cuda(0).unwrap_or(Device::Cpu) } else { Device::Cpu }),
    }
}

#[cfg(feature = "cuda")]
fn cuda(n: usize) -> Result<Device> {
    let dev = Device::new_cuda(n).map_err(|e| {
        // The driver's reason is the message; candle's backtrace (captured under RUST_BACKTRACE) is noise here.
        let e = match e {
            candle_core::Error::WithBacktrace { inner, .. } => *inner,
            e => e,
        };
        anyhow::anyhow!(
            "no usable GPU for cuda:{n}: {e}{}",
            match std::env::var("CUDA_VISIBLE_DEVICES") {
                Ok(v) => format!(" (CUDA_VISIBLE_DEVICES={v:?} limits which GPUs are visible)"),
                Err(_) => String::new(),
            }
        )
    })?;
    cuda_impl::keep_pool_memory(&dev);
    Ok(dev)
}

#[cfg(not(feature = "cuda"))]
fn cuda(n: usize) -> Result<Device> {
    bail!(
        "cuda:{n} asked for, but this ferrotune was built without CUDA: build it with `--features cuda` (README, \
         section GPU) or use --device cpu"
    )
}

/// One line about a device: "CPU" or "CUDA device 0 (NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB)".
pub fn describe(dev: &Device) -> String {
    match dev {
        Device::Cpu => "CPU".into(),
        #[cfg(feature = "cuda")]
        Device::Cuda(c) => {
            let ctx = c.cuda_stream().context().clone();
            let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
            let cc = ctx.compute_capability().map(|(a, b)| format!("sm_{a}{b}")).unwrap_or_default();
            let mem = ctx.total_mem().map(|b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)).unwrap_or_default();
            format!("CUDA device {} ({name}, {cc}, {mem})", ctx.ordinal())
        }
        #[allow(unreachable_patterns)]
        other => format!("{:?}", other.location()),
    }
}

/// A GPU as the driver reports it.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// Every visible GPU, or why there are none.
pub fn gpus() -> std::result::Result<Vec<GpuInfo>, String> {
    #[cfg(feature = "cuda")]
    {
        cuda_impl::gpus()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("not built in (rebuild with `--features cuda`)".into())
    }
}

/// The CUDA version the driver supports, e.g. (13, 0), when a driver is loaded.
pub fn driver_cuda_version() -> Option<(i32, i32)> {
    #[cfg(feature = "cuda")]
    {
        cuda_impl::driver_version()
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

/// Peak bytes held by tensors on `dev` since the last [`reset_peak_memory`]: the high-water mark of the CUDA
/// device's stream-ordered memory pool, where candle allocates (like torch's `max_memory_allocated`; the CUDA
/// context and cuBLAS workspace are not counted). None on the CPU.
pub fn peak_memory(dev: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = dev {
        return cuda_impl::pool_attr(c, cuda_impl::Attr::UsedHigh);
    }
    let _ = dev;
    None
}

/// Starts a new peak measurement for [`peak_memory`].
pub fn reset_peak_memory(dev: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = dev {
        cuda_impl::reset_used_high(c);
    }
    let _ = dev;
}

/// The name transformers uses for a dtype in config.json (and what logs and reports print).
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        DType::U8 => "uint8",
        DType::U32 => "uint32",
        DType::I64 => "int64",
        _ => "unknown",
    }
}

/// Waits until the device has finished the queued work (timings of asynchronous GPU work need it).
pub fn synchronize(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda_impl {
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaContext};
    use candle_core::cuda_backend::CudaDevice;

    use super::GpuInfo;

    pub fn gpus() -> std::result::Result<Vec<GpuInfo>, String> {
        let n = CudaContext::device_count().map_err(|e| format!("no usable GPU: {e}"))?;
        if n == 0 {
            return Err("no usable GPU: the driver reports 0 devices".into());
        }
        (0..n as usize)
            .map(|i| {
                let ctx = CudaContext::new(i).map_err(|e| format!("GPU {i}: {e}"))?;
                let (free, total) = ctx.mem_get_info().map_err(|e| format!("GPU {i}: {e}"))?;
                Ok(GpuInfo {
                    ordinal: i,
                    name: ctx.name().unwrap_or_else(|_| "unknown".into()),
                    compute_capability: ctx.compute_capability().unwrap_or((0, 0)),
                    total_bytes: total as u64,
                    free_bytes: free as u64,
                })
            })
            .collect()
    }

    pub fn driver_version() -> Option<(i32, i32)> {
        let mut v: std::ffi::c_int = 0;
        // SAFETY: writes one int; fails cleanly (non-zero result) when no driver is loaded.
        let r = unsafe { sys::cuDriverGetVersion(&mut v) };
        (r == sys::CUresult::CUDA_SUCCESS && v > 0).then_some((v / 1000, (v % 1000) / 10))
    }

    fn pool(dev: &CudaDevice) -> Option<sys::CUmemoryPool> {
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread().ok()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: writes one handle for a valid device of a live context.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(pool)
    }

    pub enum Attr {
        UsedHigh,
    }

    pub fn pool_attr(dev: &CudaDevice, attr: Attr) -> Option<u64> {
        let pool = pool(dev)?;
        let a = match attr {
            Attr::UsedHigh => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        };
        let mut v: u64 = 0;
        // SAFETY: this attribute is a cuuint64_t.
        let r = unsafe { sys::cuMemPoolGetAttribute(pool, a, &mut v as *mut u64 as *mut std::ffi::c_void) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    pub fn reset_used_high(dev: &CudaDevice) {
        if let Some(pool) = pool(dev) {
            let mut zero: u64 = 0;
            // SAFETY: the high-water attributes may only be reset to zero, which this does.
            unsafe {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut zero as *mut u64 as *mut std::ffi::c_void,
                );
            }
        }
    }

    /// Keeps freed memory in the pool instead of returning it to the driver at every synchronisation (each
    /// `to_scalar` is one): without it every training step would unmap and map its activations again.
    pub fn keep_pool_memory(dev: &candle_core::Device) {
        let candle_core::Device::Cuda(c) = dev else { return };
        if let Some(pool) = pool(c) {
            let mut keep: u64 = u64::MAX;
            // SAFETY: the release threshold is a cuuint64_t.
            unsafe {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut keep as *mut u64 as *mut std::ffi::c_void,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_thread_only_for_small_models() {
        assert_eq!(small_model_hidden(br#"{"text_config": {"hidden_size": 192}, "hidden_size": 4096}"#), Some(192));
        assert_eq!(small_model_hidden(br#"{"hidden_size": 256}"#), Some(256));
        // A wider model, and configs that say nothing usable.
        assert_eq!(small_model_hidden(br#"{"text_config": {"hidden_size": 1024}}"#), None);
        assert_eq!(small_model_hidden(br#"{"model_type": "qwen3_5"}"#), None);
        assert_eq!(small_model_hidden(b"not json"), None);
    }

    #[test]
    fn specs_parse() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        let e = "cuda:x".parse::<DeviceSpec>().unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda, cuda:N or auto"), "{e}");
        assert!("tpu".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn cpu_and_auto_open_without_a_gpu() {
        assert!(matches!(parse_device("cpu").unwrap(), Device::Cpu));
        assert_eq!(describe(&Device::Cpu), "CPU");
        assert_eq!(peak_memory(&Device::Cpu), None);
        // `auto` never fails: CPU here unless a GPU is usable.
        parse_device("auto").unwrap();
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let e = parse_device("cuda:1").unwrap_err().to_string();
        assert!(e.contains("built without CUDA") && e.contains("--features cuda"), "{e}");
    }
}
