//! Parity of a device with the references: the committed fixtures (transformers logits, PEFT LoRA gradients,
//! greedy generations) and the CPU (every op of the training graph, forward and backward). `ferrotune
//! gpu-check` prints these checks on a GPU machine, the CUDA tests assert them, and the CPU tests run them on
//! the CPU so that the checks themselves stay correct where no GPU is.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};

use crate::lora::{self, Init, LoraSpec, Targets};
use crate::models::qwen3_5::{gdn, Qwen3_5, VisionInput};
use crate::nn::{frozen::frozen_matmul, ops};
use crate::train::batch::MicroBatch;
use crate::train::step::{forward_backward, GradAccum, StepOptions};

/// One measured quantity against its bound.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    /// What `measured` is: "max abs", "rel L2", "count", ...
    pub metric: &'static str,
    pub measured: f64,
    pub bound: f64,
}

impl Check {
    fn new(name: impl Into<String>, metric: &'static str, measured: f64, bound: f64) -> Self {
        Self { name: name.into(), metric, measured, bound }
    }

    pub fn passed(&self) -> bool {
        self.measured.is_finite() && self.measured <= self.bound
    }
}

/// The checks as an aligned table with a PASS/FAIL column.
pub fn render(checks: &[Check]) -> String {
    let w = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut s = String::new();
    for c in checks {
        s.push_str(&format!(
            "{:<w$}  {:<7}  {:>10.3e}  <= {:>9.1e}  {}\n",
            c.name,
            c.metric,
            c.measured,
            c.bound,
            if c.passed() { "PASS" } else { "FAIL" }
        ));
    }
    s
}

/// The fixtures folder: `given`, else `tests/fixtures` where the crate was built, else under the current folder
/// (a binary carried to another machine runs from the repository root there).
pub fn fixtures_dir(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(g) = given {
        return Ok(g.to_path_buf());
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    for dir in [built, PathBuf::from("tests/fixtures")] {
        if dir.join("tiny-qwen3_5").is_dir() {
            return Ok(dir);
        }
    }
    bail!("tests/fixtures not found: run from the repository root or pass --fixtures DIR")
}

/// Every check: ops and frozen matmul against the CPU (on another device only: the CPU against itself proves
/// nothing), logits (f32, bf16) against transformers, LoRA gradients (f32 with and without checkpointing, bf16
/// base) against PEFT, dropout replay, greedy generation.
pub fn run_all(dev: &Device, fixtures: &Path) -> Result<Vec<Check>> {
    let mut out = Vec::new();
    if !dev.is_cpu() {
        out.extend(frozen_matmul_vs_cpu(dev)?);
        out.extend(training_ops_vs_cpu(dev)?);
    }
    out.extend(logits(dev, fixtures, DType::F32)?);
    out.extend(logits(dev, fixtures, DType::BF16)?);
    for ckpt in [false, true] {
        out.extend(lora_gradients(dev, fixtures, DType::F32, ckpt)?);
    }
    out.extend(lora_gradients(dev, fixtures, DType::BF16, true)?);
    out.push(dropout_replay(dev, fixtures)?);
    out.push(greedy_generation(dev, fixtures)?);
    Ok(out)
}

fn random(shape: &[usize], lo: f32, hi: f32, seed: u64) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn cpu_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
}

/// ‖a − b‖ / ‖b‖ in f64 (a, b on any device, any float dtype).
pub fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (cpu_f32(a)?.to_dtype(DType::F64)?, cpu_f32(b)?.to_dtype(DType::F64)?);
    if a.dims() != b.dims() {
        bail!("shapes differ: {:?} vs {:?}", a.dims(), b.dims());
    }
    let d = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let n = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(d / n.max(1e-30))
}

/// max |a − b|.
pub fn max_abs(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (cpu_f32(a)?.flatten_all()?, cpu_f32(b)?.flatten_all()?);
    if a.dims() != b.dims() {
        bail!("shapes differ: {:?} vs {:?}", a.dims(), b.dims());
    }
    Ok((a - b)?.abs()?.max(0)?.to_scalar::<f32>()? as f64)
}

/// The frozen-weight matmul (a custom op with its own device kernels) against a CPU f32 product of the same
/// rounded inputs, forward and dX, in f32 and bf16; and the weight must receive no gradient.
pub fn frozen_matmul_vs_cpu(dev: &Device) -> Result<Vec<Check>> {
    let (m, n, k) = (67, 80, 96);
    let x = random(&[m, k], -1.0, 1.0, 1)?;
    let w = random(&[n, k], -1.0, 1.0, 2)?;
    let r = random(&[m, n], -1.0, 1.0, 3)?;
    let mut out = Vec::new();
    // f32: reduction order only. bf16: the product and dX are rounded to 8 mantissa bits (2^-9 relative).
    for (dtype, bound) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
        let round = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_dtype(DType::F32)?) };
        let (xr, wr) = (round(&x)?, round(&w)?);
        let want_y = xr.matmul(&wr.t()?)?;
        let want_dx = round(&r)?.matmul(&wr)?;
        let xv = Var::from_tensor(&xr.to_device(dev)?)?;
        let wd = w.to_dtype(dtype)?.to_device(dev)?;
        let y = frozen_matmul(xv.as_tensor(), &wd)?;
        let grads = (y.to_dtype(DType::F32)? * r.to_device(dev)?)?.sum_all()?.backward()?;
        let dx = grads.get(xv.as_tensor()).context("frozen matmul: no gradient reached x")?;
        let name = format!("frozen matmul {}", crate::device::dtype_name(dtype));
        out.push(Check::new(format!("{name}: forward"), "rel L2", rel_l2(&y, &want_y)?, bound));
        out.push(Check::new(format!("{name}: dX"), "rel L2", rel_l2(dx, &want_dx)?, bound));
        let leaked = grads.get(&wd).is_some() as u8 as f64;
        out.push(Check::new(format!("{name}: weight gradients kept"), "count", leaked, 0.0));
    }
    Ok(out)
}

type OpFn = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>>;

/// `f` on the CPU and on `dev` (f32), the output and the gradient of every input compared: the worst rel L2.
fn op_vs_cpu(dev: &Device, inputs: &[Tensor], f: &OpFn) -> Result<f64> {
    let run = |d: &Device| -> Result<(Tensor, Vec<Tensor>)> {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&t.to_device(d)?)).collect::<Result<_, _>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts)?;
        let w = random(y.dims(), -1.0, 1.0, 99)?.to_device(d)?;
        let grads = (y.to_dtype(DType::F32)? * w)?.sum_all()?.backward()?;
        let gs = ts
            .iter()
            .enumerate()
            .map(|(i, t)| grads.get(t).cloned().with_context(|| format!("input {i} received no gradient")))
            .collect::<Result<Vec<_>>>()?;
        Ok((y, gs))
    };
    let (y_cpu, g_cpu) = run(&Device::Cpu)?;
    let (y_dev, g_dev) = run(dev)?;
    let mut worst = rel_l2(&y_dev, &y_cpu)?;
    for (a, b) in g_dev.iter().zip(&g_cpu) {
        worst = worst.max(rel_l2(a, b)?);
    }
    Ok(worst)
}

/// Each composite op of the model's training graph on `dev` against the CPU, forward and backward, in f32.
pub fn training_ops_vs_cpu(dev: &Device) -> Result<Vec<Check>> {
    let (b, s, h, d) = (2, 37, 4, 32);
    let x = random(&[b, s, d], -2.0, 2.0, 10)?;
    let wv = random(&[d], 0.5, 1.5, 11)?;
    let gate = random(&[b, s, d], -2.0, 2.0, 12)?;
    let q = random(&[b, h, s, d], -1.0, 1.0, 13)?;
    let k = random(&[b, h, s, d], -1.0, 1.0, 14)?;
    let v = random(&[b, h, s, d], -1.0, 1.0, 15)?;
    let cos = random(&[b, s, d / 2], -1.0, 1.0, 16)?;
    let sin = random(&[b, s, d / 2], -1.0, 1.0, 17)?;
    let (n, dk, dv) = (3, 16, 8);
    let gq = random(&[n, 150, dk], -1.0, 1.0, 18)?;
    let gk = random(&[n, 150, dk], -1.0, 1.0, 19)?;
    let gv = random(&[n, 150, dv], -1.0, 1.0, 20)?;
    let ga = random(&[n, 150], -2.0, 2.0, 21)?;
    let gb = random(&[n, 150], -2.0, 2.0, 22)?;
    let conv_w = random(&[d, 4], -0.5, 0.5, 23)?;
    let logits = random(&[9, 50], -4.0, 4.0, 24)?;
    let table = random(&[50, d], -1.0, 1.0, 25)?;
    // Delta-rule inputs as the model derives them: l2-normalised q/k, g = −softplus(a), beta = sigmoid(b).
    let delta = |t: &[Tensor], chunked: bool| -> candle_core::Result<Tensor> {
        let (q, k) = gdn::prepare_qk(&t[0], &t[1])?;
        let g = ops::softplus(&t[3])?.neg()?;
        let beta = ops::sigmoid(&t[4])?;
        let (o, st) = if chunked {
            gdn::delta_rule_chunked(&q, &k, &t[2], &g, &beta, None)?
        } else {
            gdn::delta_rule_recurrent(&q, &k, &t[2], &g, &beta, None)?
        };
        Tensor::cat(&[&o.flatten_all()?, &st.flatten_all()?], 0)
    };
    let cases: Vec<(&str, Vec<Tensor>, OpFn)> = vec![
        ("rms_norm (1 + w)", vec![x.clone(), wv.clone()], Box::new(|t| ops::rms_norm_1p(&t[0], &t[1], 1e-6))),
        (
            "gated rms_norm",
            vec![x.clone(), wv.clone(), gate.clone()],
            Box::new(|t| ops::rms_norm_gated(&t[0], &t[1], &t[2], 1e-6)),
        ),
        (
            "layer_norm",
            vec![x.clone(), wv.clone(), gate.narrow(0, 0, 1)?.narrow(1, 0, 1)?.flatten_all()?],
            Box::new(|t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-6)),
        ),
        (
            "rope (partial)",
            vec![q.clone(), cos.clone(), sin.clone()],
            Box::new(|t| ops::apply_rope(&t[0], &t[1].unsqueeze(1)?, &t[2].unsqueeze(1)?)),
        ),
        (
            "causal attention",
            vec![q.clone(), k.clone(), v.clone()],
            Box::new(move |t| {
                let mask = ops::causal_mask(s, 0, t[0].device())?;
                ops::attention(&t[0], &t[1], &t[2], 0.2, Some(&mask))
            }),
        ),
        ("gelu (tanh), silu", vec![x.clone()], Box::new(|t| ops::gelu_tanh(&t[0])? + t[0].silu()?)),
        (
            "causal conv1d + silu",
            vec![x.clone(), conv_w],
            Box::new(|t| Ok(gdn::causal_conv1d_silu(&t[0], &t[1], None)?.0)),
        ),
        (
            "delta rule (chunked)",
            vec![gq.clone(), gk.clone(), gv.clone(), ga.clone(), gb.clone()],
            Box::new(move |t| delta(t, true)),
        ),
        ("delta rule (recurrent)", vec![gq, gk, gv, ga, gb], Box::new(move |t| delta(t, false))),
        (
            "cross-entropy (gather, logsumexp)",
            vec![logits],
            Box::new(|t| {
                let targets = Tensor::new(&[[3u32], [0], [49], [7], [7], [12], [1], [30], [2]], t[0].device())?;
                let max = t[0].max_keepdim(D::Minus1)?.detach();
                let lse = (t[0].broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
                lse - t[0].gather(&targets, 1)?
            }),
        ),
        (
            "embedding rows (index_select)",
            vec![table],
            Box::new(|t| t[0].index_select(&Tensor::new(&[4u32, 4, 0, 49, 17], t[0].device())?, 0)),
        ),
    ];
    // f32 on both sides: the only differences are reduction orders (~1e-6 relative).
    cases.iter().map(|(name, inputs, f)| Ok(Check::new(*name, "rel L2", op_vs_cpu(dev, inputs, f)?, 1e-4))).collect()
}

struct Case {
    name: String,
    t: HashMap<String, Tensor>,
}

fn model_cases(fixtures: &Path) -> Result<Vec<Case>> {
    let dir = fixtures.join("golden/model");
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json"))?)?;
    index
        .as_array()
        .context("cases.json: not a list")?
        .iter()
        .map(|c| {
            let name = c["name"].as_str().context("cases.json: case without a name")?.to_string();
            let t = candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)?;
            Ok(Case { name, t })
        })
        .collect()
}

/// Pixel values as transformers computes them from uint8 levels: (k/255 − 0.5)/0.5 in f32.
fn pixel_values(levels: &Tensor, dev: &Device) -> Result<Tensor> {
    let k = levels.to_dtype(DType::F32)?;
    Ok(((k * (1.0f64 / 255.0))? - 0.5)?.affine(2.0, 0.0)?.to_device(dev)?)
}

/// Logits of the tiny checkpoint on `dev` against transformers'. f32: max abs ≤ 1e-4 (as on the CPU). bf16:
/// both sides round every op to 8 mantissa bits in their own order, so the bound is twice transformers' own
/// bf16-vs-f32 distance (the CPU bf16 test's rule).
pub fn logits(dev: &Device, fixtures: &Path, dtype: DType) -> Result<Vec<Check>> {
    let model = Qwen3_5::load(&fixtures.join("tiny-qwen3_5"), dtype, dev)?;
    let mut out = Vec::new();
    for c in model_cases(fixtures)? {
        let ids: Vec<u32> = c.t["input_ids"].to_vec1::<i64>()?.into_iter().map(|x| x as u32).collect();
        let images = match c.t.get("pixel_levels") {
            Some(levels) => {
                let grids: Vec<Vec<i64>> = c.t["image_grid_thw"].to_vec2()?;
                let grids = grids.iter().map(|g| [g[0] as usize, g[1] as usize, g[2] as usize]).collect();
                Some(VisionInput { pixel_values: pixel_values(levels, dev)?, grids })
            }
            None => None,
        };
        let (hidden, _) = model.forward_sequence(&ids, images.as_ref(), false)?;
        let (want, bound) = match dtype {
            DType::F32 => (&c.t["logits_tail"], 1e-4),
            _ => (&c.t["logits_tail_bf16"], 2.0 * max_abs(&c.t["logits_tail_bf16"], &c.t["logits_tail"])?),
        };
        let tail = want.dim(0)?;
        let got = model.logits(&hidden.squeeze(0)?.narrow(0, ids.len() - tail, tail)?)?;
        let name = format!("logits {} {}", crate::device::dtype_name(dtype), c.name);
        out.push(Check::new(name, "max abs", max_abs(&got, want)?, bound));
    }
    Ok(out)
}

/// The PEFT gradient fixtures: samples, inits and gradients for the target sets `qkvo` and `all`.
struct PeftFixtures {
    dir: PathBuf,
    samples: HashMap<String, Tensor>,
    meta: serde_json::Value,
    grads: serde_json::Value,
}

impl PeftFixtures {
    fn load(fixtures: &Path) -> Result<Self> {
        let dir = fixtures.join("golden/peft");
        let json = |n: &str| -> Result<serde_json::Value> {
            let p = dir.join(n);
            serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| format!("{}", p.display()))?)
                .with_context(|| format!("{}", p.display()))
        };
        Ok(Self {
            samples: candle_core::safetensors::load(dir.join("samples.safetensors"), &Device::Cpu)?,
            meta: json("samples.json")?,
            grads: json("grads.json")?,
            dir,
        })
    }

    fn st(&self, name: &str) -> Result<HashMap<String, Tensor>> {
        Ok(candle_core::safetensors::load(self.dir.join(name), &Device::Cpu)?)
    }

    fn targets(&self, set: &str) -> Vec<String> {
        self.grads["targets"][set]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }

    /// Sample `i` as a micro-batch on the model's device.
    fn micro_batch(&self, model: &Qwen3_5, i: usize) -> Result<MicroBatch> {
        let dev = &model.device;
        let ids: Vec<u32> =
            self.samples[&format!("input_ids.{i}")].to_vec1::<i64>()?.iter().map(|&x| x as u32).collect();
        let labels: Vec<i64> = self.samples[&format!("labels.{i}")].to_vec1()?;
        let pool: Vec<usize> = self.meta[i]["images"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_u64().map(|x| x as usize)).collect())
            .unwrap_or_default();
        let images = if pool.is_empty() {
            None
        } else {
            let levels: Vec<Tensor> = pool.iter().map(|k| self.samples[&format!("pool_levels.{k}")].clone()).collect();
            let grids = pool
                .iter()
                .map(|k| {
                    let g: Vec<i64> = self.samples[&format!("pool_grid.{k}")].to_vec1()?;
                    Ok([g[0] as usize, g[1] as usize, g[2] as usize])
                })
                .collect::<Result<Vec<_>>>()?;
            Some(VisionInput { pixel_values: pixel_values(&Tensor::cat(&levels, 0)?, dev)?, grids })
        };
        let grids = images.as_ref().map_or(vec![], |v| v.grids.clone());
        let pos = model.rope_index(&ids, &grids)?;
        let rope = model.rope(&[&pos])?;
        let n = ids.len();
        Ok(MicroBatch {
            input_ids: Tensor::from_vec(ids, (1, n), dev)?,
            labels: vec![labels],
            rope,
            images,
            image_features: None,
            segments: None,
        })
    }

    /// The tiny model on `dev` with the fixture's LoRA init on `set`; the adapter vars with their PEFT names.
    fn lora_model(
        &self,
        fixtures: &Path,
        set: &str,
        dtype: DType,
        dropout: f32,
        dev: &Device,
    ) -> Result<(Qwen3_5, Vec<(String, Var)>)> {
        let mut model = Qwen3_5::load(&fixtures.join("tiny-qwen3_5"), dtype, dev)?;
        let init = self.st(&format!("init_{set}.safetensors"))?;
        let spec = LoraSpec {
            r: self.grads["rank"].as_u64().context("grads.json: rank")? as usize,
            alpha: self.grads["alpha"].as_f64().context("grads.json: alpha")?,
            dropout,
            use_rslora: false,
            targets: Targets::Modules(self.targets(set)),
        };
        let adapted = lora::attach(model.lora_candidates(false, false), &spec, &Init::From(&init), dev)?;
        if adapted.len() * 2 != init.len() {
            bail!("{set}: {} modules adapted, the PEFT init has {}", adapted.len(), init.len() / 2);
        }
        let vars = lora::trainable_vars(model.linears_mut());
        Ok((model, vars))
    }
}

/// bf16 base weights against PEFT's f32 gradients: the fixtures hold no bf16 reference, so the bounds are twice
/// what ferrotune's CPU bf16 path measures on them (rel L2 of all LoRA gradients together 0.020 for `qkvo`,
/// 0.075 for `all`; worst single tensor 0.027 / 0.15, a tiny `in_proj_a/b` gradient). They catch a lost or wrong
/// gradient (rel ≈ 1), not a precision loss; the f32 checks carry the exactness.
pub const BF16_GLOBAL_BOUND: f64 = 0.15;
pub const BF16_GRADIENT_BOUND: f64 = 0.3;

/// Loss and every LoRA gradient of one micro-batch (sample 0, with an image) against PEFT, for the target sets
/// `qkvo` and `all`. f32: loss rel ≤ 1e-5, worst gradient rel L2 ≤ 1e-4. bf16 base: loss rel ≤ 2e-2 (CPU
/// measures 5.6e-3), gradients within [`BF16_GLOBAL_BOUND`] and [`BF16_GRADIENT_BOUND`].
pub fn lora_gradients(dev: &Device, fixtures: &Path, dtype: DType, checkpointing: bool) -> Result<Vec<Check>> {
    let fx = PeftFixtures::load(fixtures)?;
    let (loss_bound, grad_bound) = if dtype == DType::F32 { (1e-5, 1e-4) } else { (2e-2, BF16_GRADIENT_BOUND) };
    let mut out = Vec::new();
    for set in ["qkvo", "all"] {
        let (model, vars) = fx.lora_model(fixtures, set, dtype, 0.0, dev)?;
        let want = fx.st(&format!("grads_{set}.safetensors"))?;
        let want_loss = fx.grads["loss"][set].as_f64().context("grads.json: loss")?;
        let mb = fx.micro_batch(&model, 0)?;
        let params: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        let mut acc = GradAccum::default();
        let opts = StepOptions { scale: 1.0, checkpointing, keep_last: 0, train_embeddings: false, dropout_seed: 0 };
        let stats = forward_backward(&model, &mb, &params, &mut acc, opts)?;
        let grads = acc.take(&params);
        let mut worst = 0f64;
        let (mut d2, mut n2) = (0f64, 0f64);
        for ((name, _), g) in vars.iter().zip(&grads) {
            let g = g.as_ref().with_context(|| format!("{set}: {name} received no gradient"))?;
            let w = want.get(name).with_context(|| format!("grads_{set}: no {name}"))?;
            let r = rel_l2(g, w)?;
            let nw = cpu_f32(w)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            d2 += r * r * nw;
            n2 += nw;
            worst = worst.max(r);
        }
        let name = format!(
            "LoRA {set} {}{}",
            crate::device::dtype_name(dtype),
            if checkpointing { ", checkpointed" } else { "" }
        );
        out.push(Check::new(format!("{name}: loss"), "rel", (stats.loss - want_loss).abs() / want_loss, loss_bound));
        out.push(Check::new(format!("{name}: worst of {} gradients", vars.len()), "rel L2", worst, grad_bound));
        if dtype != DType::F32 {
            let global = (d2 / n2.max(1e-30)).sqrt();
            out.push(Check::new(format!("{name}: all gradients together"), "rel L2", global, BF16_GLOBAL_BOUND));
        }
    }
    Ok(out)
}

/// With LoRA dropout, the checkpointed step (which recomputes each layer) must draw the same masks as the plain
/// one: equal gradients.
pub fn dropout_replay(dev: &Device, fixtures: &Path) -> Result<Check> {
    let fx = PeftFixtures::load(fixtures)?;
    let (model, vars) = fx.lora_model(fixtures, "all", DType::F32, 0.1, dev)?;
    let mb = fx.micro_batch(&model, 0)?;
    let params: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut grads = Vec::new();
    // Plain, every layer recomputed, and the last layer kept (its activations in the head segment).
    for (checkpointing, keep_last) in [(false, 0), (true, 0), (true, 1)] {
        let mut acc = GradAccum::default();
        let opts = StepOptions { scale: 1.0, checkpointing, keep_last, train_embeddings: false, dropout_seed: 7 };
        forward_backward(&model, &mb, &params, &mut acc, opts)?;
        grads.push(acc.take(&params));
    }
    let mut worst = 0f64;
    for other in &grads[1..] {
        for (a, b) in grads[0].iter().zip(other) {
            match (a, b) {
                (Some(a), Some(b)) => worst = worst.max(rel_l2(b, a)?),
                _ => bail!("dropout replay: a LoRA tensor received no gradient"),
            }
        }
    }
    Ok(Check::new("LoRA dropout: checkpointed = plain", "rel L2", worst, 1e-5))
}

/// Greedy generation (base, and with the PEFT adapter merged) on `dev` in f32: tokens that differ from
/// transformers' greedy `generate`.
pub fn greedy_generation(dev: &Device, fixtures: &Path) -> Result<Check> {
    use crate::chat_template::RenderOptions;
    use crate::infer::{AdapterMode, Engine, GenerateRequest, SamplingParams};
    let text = std::fs::read_to_string(fixtures.join("golden/generate.json"))?;
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().map(|a| a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect()).unwrap_or_default()
    };
    let adapter = fixtures.join("golden/peft/adapter");
    let mut differing = 0usize;
    for (key, adapters) in [("base", vec![]), ("adapter", vec![adapter.as_path()])] {
        let e = Engine::load(&fixtures.join("tiny-qwen3_5"), &adapters, AdapterMode::Merge, DType::F32, dev)?;
        for c in &cases {
            let images = c["images"]
                .as_array()
                .map(|a| a.iter().filter_map(|f| f.as_str()).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .map(|f| crate::image::load_image(&fixtures.join("golden/model").join(f)))
                .collect::<Result<Vec<_>>>()?;
            let opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
            let prompt = e.prompt(&c["messages"], &images, &opts)?;
            let req = GenerateRequest { sampling: SamplingParams::default(), max_tokens: 32, stop: vec![] };
            let g = e.generate(&prompt, &req, |_| true)?;
            let want = ids(&c[key]);
            differing += want.len().abs_diff(g.token_ids.len());
            differing += g.token_ids.iter().zip(&want).filter(|(a, b)| a != b).count();
        }
    }
    Ok(Check::new("greedy generation vs transformers", "tokens", differing as f64, 0.0))
}
