//! Benchmarks behind `ferrotune bench`: forward, LoRA training steps and decoding on a checkpoint, reporting
//! time, throughput and peak memory (RSS). Timings are measured, never asserted by tests.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::lora::{self, Init, LoraSpec, Targets};
use crate::models::qwen3_5::{Qwen3_5, VisionInput};
use crate::sys::{cpu_seconds, peak_rss_bytes};
use crate::train::batch::MicroBatch;
use crate::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::train::step::{forward_backward, GradAccum, StepOptions};
use crate::weights::FrozenFormat;

/// How the benchmarked base weights are held: their dtype, and whether frozen matrices are quantized to int8.
#[derive(Clone, Copy, Debug)]
pub struct Base {
    pub dtype: DType,
    pub int8: bool,
}

pub struct BenchReport {
    /// Where it ran ("CPU", "CUDA device 0 (…)") and the base weights' dtype.
    pub device: String,
    pub dtype: DType,
    /// Frozen matrices quantized to per-row int8 at load.
    pub int8: bool,
    pub params: usize,
    pub trainable: usize,
    pub tokens_per_sample: usize,
    pub wall_per_sample: f64,
    pub cpu_per_sample: f64,
    pub peak_rss: Option<u64>,
    /// Peak GPU memory held by tensors during the measured iterations (None on the CPU).
    pub peak_gpu: Option<u64>,
    /// Decode only: time to the first token (prefill), seconds.
    pub ttft: Option<f64>,
    /// Seconds to load the checkpoint (None for the Python anchor's reports that lack it).
    pub load_s: Option<f64>,
}

impl BenchReport {
    /// The base weights' format for tables: the dtype, or `int8` when quantized.
    pub fn dtype_label(&self) -> &'static str {
        if self.int8 {
            "int8"
        } else {
            crate::device::dtype_name(self.dtype)
        }
    }

    pub fn samples_per_second(&self) -> f64 {
        1.0 / self.wall_per_sample
    }

    pub fn tokens_per_second(&self) -> f64 {
        self.tokens_per_sample as f64 / self.wall_per_sample
    }

    /// The numbers as one JSON object (for scripts).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "device": self.device,
            "dtype": self.dtype_label(),
            "params": self.params,
            "trainable": self.trainable,
            "tokens_per_sample": self.tokens_per_sample,
            "wall_per_sample": self.wall_per_sample,
            "cpu_per_sample": self.cpu_per_sample,
            "samples_per_second": self.samples_per_second(),
            "tokens_per_second": self.tokens_per_second(),
            "peak_rss": self.peak_rss,
            "peak_gpu": self.peak_gpu,
            "ttft": self.ttft,
            "load_s": self.load_s,
        })
    }
}

/// Starts a measured section: a clean peak on the GPU and the clocks.
fn start_measure(device: &Device) -> Result<(Instant, f64)> {
    crate::device::synchronize(device)?;
    crate::device::reset_peak_memory(device);
    Ok((Instant::now(), cpu_seconds()))
}

/// Ends a measured section: waits for queued GPU work, returns (wall, CPU) seconds.
fn end_measure(device: &Device, (t0, c0): (Instant, f64)) -> Result<(f64, f64)> {
    crate::device::synchronize(device)?;
    Ok((t0.elapsed().as_secs_f64(), cpu_seconds() - c0))
}

/// Loads the model for a benchmark and times it. bf16 on the CPU means what training (`bf16: true`) and serving
/// do there: bf16 weights kept as stored, multiplied in bf16 with f32 accumulation; `int8` quantizes the frozen
/// matrices at load.
fn load(model_dir: &Path, Base { dtype, int8 }: Base, device: &Device) -> Result<(Qwen3_5, f64)> {
    let t0 = Instant::now();
    let compact = device.is_cpu() && (dtype != DType::F32 || int8);
    let compute = if compact { DType::F32 } else { dtype };
    let format = match (int8, compact) {
        (true, _) => FrozenFormat::Int8,
        (false, true) => FrozenFormat::Bf16,
        (false, false) => FrozenFormat::Compute,
    };
    let model = Qwen3_5::load_as(model_dir, compute, device, format)?;
    Ok((model, t0.elapsed().as_secs_f64()))
}

/// All parameters of the model (vision tower included).
pub fn count_params(model: &mut Qwen3_5) -> usize {
    model.params_mut().iter().map(|(_, t, _)| t.elem_count()).sum()
}

/// Options of the training benchmark.
pub struct TrainBench {
    pub seq_len: usize,
    /// Optional square image side in pixels (0: text only).
    pub image_side: usize,
    pub steps: usize,
    pub warmup: usize,
    pub rank: usize,
    pub targets: Vec<String>,
    pub checkpointing: bool,
    /// With checkpointing, the last layers whose activations are kept.
    pub keep_layers: usize,
}

/// A synthetic SFT sample: `seq_len` tokens (half prompt, half labelled), optionally one image.
fn synthetic(model: &Qwen3_5, seq_len: usize, image_side: usize, seed: u64) -> Result<MicroBatch> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let vocab = model.cfg.text.vocab_size.min(model.cfg.image_token_id as usize) as u32;
    let mut ids: Vec<u32> = (0..seq_len).map(|_| rng.random_range(0..vocab.max(2))).collect();
    let mut images = None;
    if image_side > 0 {
        let v = &model.cfg.vision;
        let g = image_side / v.patch_size;
        let g = g - g % v.spatial_merge_size;
        let n_tok = g * g / (v.spatial_merge_size * v.spatial_merge_size);
        for id in ids.iter_mut().skip(2).take(n_tok) {
            *id = model.cfg.image_token_id;
        }
        let feat = v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size;
        let px: Vec<f32> = (0..g * g * feat).map(|_| rng.random_range(-1.0..1.0)).collect();
        images = Some(VisionInput {
            pixel_values: Tensor::from_vec(px, (g * g, feat), &model.device)?,
            grids: vec![[1, g, g]],
        });
    }
    let labels: Vec<i64> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i < seq_len / 2 || t == model.cfg.image_token_id { -100 } else { t as i64 })
        .collect();
    let grids = images.as_ref().map_or(vec![], |v| v.grids.clone());
    let pos = model.rope_index(&ids, &grids)?;
    let rope = model.rope(&[&pos])?;
    Ok(MicroBatch {
        input_ids: Tensor::from_vec(ids, (1, seq_len), &model.device)?,
        labels: vec![labels],
        rope,
        images,
        image_features: None,
        segments: None,
    })
}

/// LoRA training steps (batch 1, one micro-batch per optimizer step) on `model_dir`, base weights in `dtype`
/// (LoRA weights and optimizer state in f32).
pub fn train(model_dir: &Path, opts: &TrainBench, base: Base, device: &Device) -> Result<BenchReport> {
    let (mut model, load_s) = load(model_dir, base, device)?;
    let params = count_params(&mut model);
    let spec = LoraSpec {
        r: opts.rank,
        alpha: 2.0 * opts.rank as f64,
        dropout: 0.0,
        use_rslora: false,
        targets: Targets::Modules(opts.targets.clone()),
    };
    lora::attach(model.lora_candidates(false, false), &spec, &Init::Default { seed: 0 }, device)?;
    let vars: Vec<(String, Var, bool)> =
        lora::trainable_vars(model.linears_mut()).into_iter().map(|(n, v)| (n, v, true)).collect();
    let trainable = vars.iter().map(|(_, v, _)| v.elem_count()).sum();
    let plist: Vec<Var> = vars.iter().map(|(_, v, _)| v.clone()).collect();
    let mut opt = AdamW::new(AdamWConfig::default(), vars)?;
    let mb = synthetic(&model, opts.seq_len, opts.image_side, 1)?;
    let mut acc = GradAccum::default();
    let run = |n: usize, acc: &mut GradAccum, opt: &mut AdamW| -> Result<()> {
        for _ in 0..n {
            let so = StepOptions {
                scale: 1.0,
                checkpointing: opts.checkpointing,
                keep_last: opts.keep_layers,
                train_embeddings: false,
                dropout_seed: 0,
            };
            forward_backward(&model, &mb, &plist, acc, so)?;
            let mut g = acc.take(&plist);
            clip_grad_norm(&mut g, 1.0)?;
            opt.step(&g, 1e-4)?;
        }
        Ok(())
    };
    // On the pool, as `ferrotune train` runs.
    crate::parallel::on_compute_pool(|| run(opts.warmup, &mut acc, &mut opt))?;
    let m = start_measure(device)?;
    crate::parallel::on_compute_pool(|| run(opts.steps, &mut acc, &mut opt))?;
    let (wall, cpu) = end_measure(device, m)?;
    let n = opts.steps.max(1) as f64;
    Ok(BenchReport {
        device: crate::device::describe(device),
        dtype: base.dtype,
        int8: base.int8,
        params,
        trainable,
        tokens_per_sample: opts.seq_len,
        wall_per_sample: wall / n,
        cpu_per_sample: cpu / n,
        peak_rss: peak_rss_bytes(),
        peak_gpu: crate::device::peak_memory(device),
        ttft: None,
        load_s: Some(load_s),
    })
}

/// Forward passes of one sequence (no gradients).
pub fn forward(
    model_dir: &Path,
    seq_len: usize,
    image_side: usize,
    iters: usize,
    base: Base,
    device: &Device,
) -> Result<BenchReport> {
    let (mut model, load_s) = load(model_dir, base, device)?;
    let params = count_params(&mut model);
    let mb = synthetic(&model, seq_len, image_side, 2)?;
    let go = || -> Result<()> {
        let feats = mb.images.as_ref().map(|v| model.image_features(v)).transpose()?;
        let emb = model.embed(&mb.input_ids, feats.as_ref())?;
        let (h, _) = model.decode(&emb, &mb.rope, None, false)?;
        model.logits(&h.narrow(1, seq_len - 1, 1)?)?;
        Ok(())
    };
    go()?;
    let m = start_measure(device)?;
    for _ in 0..iters {
        go()?;
    }
    let (wall, cpu) = end_measure(device, m)?;
    let n = iters.max(1) as f64;
    Ok(BenchReport {
        device: crate::device::describe(device),
        dtype: base.dtype,
        int8: base.int8,
        params,
        trainable: 0,
        tokens_per_sample: seq_len,
        wall_per_sample: wall / n,
        cpu_per_sample: cpu / n,
        peak_rss: peak_rss_bytes(),
        peak_gpu: crate::device::peak_memory(device),
        ttft: None,
        load_s: Some(load_s),
    })
}

/// Greedy decoding after a prompt of `prompt_len` tokens: time to first token and per-token time with the
/// per-layer cache (KV for attention layers, recurrent state for Gated-DeltaNet layers). `batch` sequences (of the
/// same prompt) decode together, one row each, as the server's batches do; the per-token figures then count every
/// sequence's tokens.
/// With `adapters` = (n, rank): n random adapters of that rank on every decoder linear, served side by side (row i
/// of the batch takes adapter i mod n), as a server's requests for several adapters decode together.
pub fn decode(
    model_dir: &Path,
    prompt_len: usize,
    new_tokens: usize,
    batch: usize,
    adapters: Option<(usize, usize)>,
    base: Base,
    device: &Device,
) -> Result<BenchReport> {
    use crate::models::qwen3_5::Cache;
    use crate::nn::{with_row_adapters, AdapterWeights, RowAdapter};
    let (mut model, load_s) = load(model_dir, base, device)?;
    let params = count_params(&mut model);
    let lora: Vec<std::sync::Arc<AdapterWeights>> = match adapters {
        Some((n, r)) => (0..n)
            .map(|_| {
                let modules = model
                    .lora_candidates(false, false)
                    .into_iter()
                    .map(|(path, l)| {
                        let a = Tensor::randn(0f32, 0.02, (r, l.in_dim()), device)?;
                        let b = Tensor::randn(0f32, 0.02, (l.out_dim(), r), device)?;
                        Ok((path, crate::nn::LoraMatrices::new(a, b)?))
                    })
                    .collect::<Result<_>>()?;
                Ok(std::sync::Arc::new(AdapterWeights { modules, scale: 2.0 }))
            })
            .collect::<Result<_>>()?,
        None => vec![],
    };
    let groups = || -> Vec<RowAdapter> {
        (0..lora.len())
            .map(|k| RowAdapter { rows: Some((k..batch).step_by(lora.len()).collect()), adapter: lora[k].clone() })
            .filter(|g| g.rows.as_ref().is_some_and(|r| !r.is_empty()))
            .collect()
    };
    let mb = synthetic(&model, prompt_len, 0, 3)?;
    // (time to first token, decoding seconds, decoding CPU seconds): prefill's CPU time stays out of the per-token
    // figure.
    let run = || -> Result<(f64, f64, f64)> {
        let t0 = Instant::now();
        let mut cache = Cache::new(model.layers.len());
        let emb = model.embed(&mb.input_ids, None)?;
        let (h, _) = model.decode(&emb, &mb.rope, Some(&mut cache), false)?;
        let logits: Vec<f32> =
            model.logits(&h.narrow(1, prompt_len - 1, 1)?)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let ttft = t0.elapsed().as_secs_f64();
        // Each sequence its own cache, as the server's are (clones would share the key/value storage).
        let mut caches = (0..batch).map(|_| cache.fork()).collect::<Result<Vec<_>>>()?;
        let mut tokens = vec![crate::infer::sample::argmax(&logits); batch];
        let (t1, c1) = (Instant::now(), cpu_seconds());
        for _ in 0..new_tokens {
            let rope = model.rope_rows(&caches.iter().map(|c| c.seen as i64).collect::<Vec<_>>())?;
            let emb = model.embed(&Tensor::from_vec(tokens.clone(), (batch, 1), device)?, None)?;
            let mut rows: Vec<&mut Cache> = caches.iter_mut().collect();
            let h = with_row_adapters(groups(), || model.decode_rows(&emb, &rope, &mut rows))?;
            let logits = model.logits(&h)?.reshape((batch, ()))?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            tokens = logits.iter().map(|l| crate::infer::sample::argmax(l)).collect();
        }
        Ok((ttft, t1.elapsed().as_secs_f64(), cpu_seconds() - c1))
    };
    // On the pool, as the server's batching loop runs.
    let in_pool = || crate::parallel::on_compute_pool(run);
    in_pool()?;
    let m = start_measure(device)?;
    let (ttft, secs, cpu) = in_pool()?;
    end_measure(device, m)?;
    let n = (new_tokens * batch).max(1) as f64;
    Ok(BenchReport {
        device: crate::device::describe(device),
        dtype: base.dtype,
        int8: base.int8,
        params,
        trainable: 0,
        tokens_per_sample: 1,
        wall_per_sample: secs / n,
        cpu_per_sample: cpu / n,
        peak_rss: peak_rss_bytes(),
        peak_gpu: crate::device::peak_memory(device),
        ttft: Some(ttft),
        load_s: Some(load_s),
    })
}

/// One row of `bench kernels`.
pub struct KernelRow {
    pub name: String,
    pub seconds: f64,
    /// Multiply-adds × 2 per second, or None for a pure memory pass.
    pub gflops: Option<f64>,
    /// Bytes of weights (or of the buffer) read per second.
    pub gbytes: f64,
}

/// The machine's peaks and the frozen-weight kernels at the shapes of `sizes` (one MLP projection, hidden →
/// intermediate): f32 FMA peak (registers only) and read bandwidth (a pass over 1 GiB), then the products of
/// `m` rows with f32, bf16 (exact, and with bf16 products: AMX where the CPU has it) and int8 weights, and the
/// products of decoding one sequence and batches of 8 and 16.
pub fn kernels(hidden: usize, inter: usize, m: usize, reps: usize) -> Result<Vec<KernelRow>> {
    let mut rows = Vec::new();
    let threads = rayon::current_num_threads();
    // FMA peak: independent accumulator chains per thread, long enough to hide latency.
    let iters = 20_000_000usize;
    let t0 = Instant::now();
    let total: f32 = rayon::broadcast(|_| fma_loop(iters)).into_iter().sum();
    let s = t0.elapsed().as_secs_f64();
    let flops = (threads * iters * FMA_CHAINS * FMA_WIDTH * 2) as f64;
    std::hint::black_box(total);
    let name = format!("f32 FMA peak ({threads} threads, registers only)");
    rows.push(KernelRow { name, seconds: s, gflops: Some(flops / s / 1e9), gbytes: 0.0 });
    if crate::nn::amx::available() {
        let steps = 2_000_000usize;
        let t0 = Instant::now();
        rayon::broadcast(|_| crate::nn::amx::peak_loop(steps));
        let s = t0.elapsed().as_secs_f64();
        let flops = (threads * steps) as f64 * crate::nn::amx::PEAK_FLOPS_PER_STEP;
        let name = format!("AMX bf16 peak ({threads} threads, tiles only)");
        rows.push(KernelRow { name, seconds: s, gflops: Some(flops / s / 1e9), gbytes: 0.0 });
    }
    if crate::nn::dpbf16::available() {
        let steps = 50_000_000usize;
        let t0 = Instant::now();
        let total: f32 = rayon::broadcast(|_| crate::nn::dpbf16::peak_loop(steps)).into_iter().sum();
        let s = t0.elapsed().as_secs_f64();
        std::hint::black_box(total);
        let flops = (threads * steps) as f64 * crate::nn::dpbf16::PEAK_FLOPS_PER_STEP;
        let name = format!("AVX512-BF16 peak ({threads} threads, registers only)");
        rows.push(KernelRow { name, seconds: s, gflops: Some(flops / s / 1e9), gbytes: 0.0 });
    }
    // Read bandwidth.
    // XOR of u64 words: vectorises fully, so the pass is limited by memory, not by adds.
    let buf: Vec<u64> = (0..(1u64 << 27)).collect();
    let t0 = Instant::now();
    let mut acc = 0u64;
    for _ in 0..reps {
        use rayon::prelude::*;
        acc ^= buf.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, &x| a ^ x)).reduce(|| 0, |a, b| a ^ b);
    }
    let s = t0.elapsed().as_secs_f64() / reps as f64;
    std::hint::black_box(acc);
    let gbytes = 8.0 * buf.len() as f64 / s / 1e9;
    rows.push(KernelRow { name: "read bandwidth (a pass over 1 GiB)".into(), seconds: s, gflops: None, gbytes });
    drop(buf);
    let dev = Device::Cpu;
    let w32 = Tensor::randn(0f32, 0.02, (inter, hidden), &dev)?;
    let w16 = w32.to_dtype(DType::BF16)?;
    let w8 = crate::nn::Param::new("w", w16.clone()).quantize_int8()?;
    let mut wbf = crate::nn::Param::new("w", w16.clone());
    wbf.bf16_products = true;
    let bf_label = if crate::nn::amx::available() {
        "bf16, bf16 products on AMX"
    } else if crate::nn::dpbf16::available() {
        "bf16, bf16 products on AVX512-BF16"
    } else {
        "bf16, bf16 products"
    };
    let weights = [
        ("f32", crate::nn::Param::new("w", w32)),
        ("bf16", crate::nn::Param::new("w", w16)),
        (bf_label, wbf),
        ("int8", w8),
    ];
    // Bytes a product reads per weight element: the matrix and, for int8, the per-row scale.
    let bytes_of = |p: &crate::nn::Param| {
        p.dtype().size_in_bytes() as f64 + if p.scales.is_some() { 4.0 / hidden as f64 } else { 0.0 }
    };
    for rows_m in [m, 1, 8, 16] {
        let x = Tensor::randn(0f32, 1.0, (rows_m, hidden), &dev)?;
        for (label, w) in &weights {
            crate::nn::frozen::frozen_matmul_param(&x, w)?;
            let t0 = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(crate::nn::frozen::frozen_matmul_param(&x, w)?);
            }
            let s = t0.elapsed().as_secs_f64() / reps as f64;
            let flops = 2.0 * (rows_m * hidden * inter) as f64;
            rows.push(KernelRow {
                name: format!("x ({rows_m}×{hidden}) · W{label} ({inter}×{hidden})ᵀ"),
                seconds: s,
                gflops: Some(flops / s / 1e9),
                gbytes: bytes_of(w) * (hidden * inter) as f64 / s / 1e9,
            });
        }
        // The input gradient of training: G (m×inter) · W.
        if rows_m == m && m > 1 {
            let g = Tensor::randn(0f32, 1.0, (rows_m, inter), &dev)?;
            for (label, w) in &weights {
                crate::nn::frozen::frozen_input_grad(&g, w)?;
                let t0 = Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(crate::nn::frozen::frozen_input_grad(&g, w)?);
                }
                let s = t0.elapsed().as_secs_f64() / reps as f64;
                rows.push(KernelRow {
                    name: format!("input gradient G ({rows_m}×{inter}) · W{label}"),
                    seconds: s,
                    gflops: Some(2.0 * (rows_m * hidden * inter) as f64 / s / 1e9),
                    gbytes: bytes_of(w) * (hidden * inter) as f64 / s / 1e9,
                });
            }
        }
    }
    // Decoding reads every weight from memory once a step: the same products over a ring of copies larger than
    // any cache, so that each product streams its weight from memory (the rows above find it in cache).
    let (_, wbf) = &weights[2];
    let bytes = bytes_of(wbf) * (hidden * inter) as f64;
    let copies = ((512u64 << 20) as f64 / bytes).ceil().max(2.0) as usize;
    let ring = (0..copies)
        .map(|_| {
            let mut p = crate::nn::Param::new("w", wbf.tensor.copy()?);
            p.bf16_products = wbf.bf16_products;
            Ok(p)
        })
        .collect::<Result<Vec<_>>>()?;
    for rows_m in [1, 8, 16] {
        let x = Tensor::randn(0f32, 1.0, (rows_m, hidden), &dev)?;
        for w in &ring {
            std::hint::black_box(crate::nn::frozen::frozen_matmul_param(&x, w)?);
        }
        let t0 = Instant::now();
        for _ in 0..reps {
            for w in &ring {
                std::hint::black_box(crate::nn::frozen::frozen_matmul_param(&x, w)?);
            }
        }
        let s = t0.elapsed().as_secs_f64() / (reps * copies) as f64;
        rows.push(KernelRow {
            name: format!("x ({rows_m}×{hidden}) · W{bf_label} ({inter}×{hidden})ᵀ from memory"),
            seconds: s,
            gflops: Some(2.0 * (rows_m * hidden * inter) as f64 / s / 1e9),
            gbytes: bytes / s / 1e9,
        });
    }
    Ok(rows)
}

const FMA_CHAINS: usize = 12;
#[cfg(target_arch = "x86_64")]
const FMA_WIDTH: usize = 16;
#[cfg(not(target_arch = "x86_64"))]
const FMA_WIDTH: usize = 1;

/// `iters` rounds of [`FMA_CHAINS`] independent fused multiply-adds on [`FMA_WIDTH`] f32 lanes.
fn fma_loop(iters: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { fma_avx512(iters) };
        }
    }
    fma_plain(iters)
}

/// Written so that each chain is one vector register once compiled for AVX-512.
#[inline(always)]
fn fma_plain(iters: usize) -> f32 {
    let mut acc = [1f32; FMA_CHAINS * FMA_WIDTH];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn fma_avx512(iters: usize) -> f32 {
    fma_plain(iters)
}
