//! One micro-batch: forward, token cross-entropy, backward into the trainable tensors; and the eval loss, with
//! the same forward.
//!
//! With gradient checkpointing the decoder runs once without keeping activations, storing only each layer's
//! input; the backward pass then recomputes one layer at a time and pulls the gradient through it with the
//! vector-Jacobian product `sum(y · dy)`. Peak memory is one layer's activations instead of all of them.

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, TensorId, Var, D};

use super::batch::{micro_batch, MicroBatch};
use crate::data::Sample;
use crate::image::ImageProcessorConfig;
use crate::models::qwen3_5::text::lm_logits;
use crate::models::qwen3_5::text::DecoderLayer;
use crate::models::qwen3_5::Qwen3_5;
use crate::nn::linear::seed_dropout;
use crate::parallel::Workers;

/// Gradients accumulated over micro-batches, by parameter.
#[derive(Default)]
pub struct GradAccum {
    grads: HashMap<TensorId, Tensor>,
}

impl GradAccum {
    /// Adds every gradient of `other` (unit by unit, in the order the caller merges them).
    pub fn merge(&mut self, other: GradAccum) -> Result<()> {
        for (id, g) in other.grads {
            let sum = match self.grads.remove(&id) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            self.grads.insert(id, sum);
        }
        Ok(())
    }

    fn add(&mut self, store: &candle_core::backprop::GradStore, params: &[Var]) -> Result<()> {
        for p in params {
            if let Some(g) = store.get(p.as_tensor()) {
                let g = g.to_dtype(DType::F32)?;
                let e = self.grads.remove(&p.id());
                self.grads.insert(
                    p.id(),
                    match e {
                        Some(prev) => (prev + g)?,
                        None => g,
                    },
                );
            }
        }
        Ok(())
    }

    /// The gradient of each parameter, in order (None when it received none), and resets the accumulator.
    pub fn take(&mut self, params: &[Var]) -> Vec<Option<Tensor>> {
        params.iter().map(|p| self.grads.remove(&p.id())).collect()
    }
}

/// What a micro-batch reports.
pub struct StepStats {
    /// Mean cross-entropy over this micro-batch's label tokens.
    pub loss: f64,
    pub tokens: usize,
}

/// Options of the backward pass.
#[derive(Clone, Copy)]
pub struct StepOptions {
    /// Multiplier of the loss before backward (1 / micro-batches in the accumulation window).
    pub scale: f64,
    pub checkpointing: bool,
    /// With checkpointing, how many layers at the end keep their activations (a memory budget's worth): they run
    /// with the head as one segment and are not recomputed.
    pub keep_last: usize,
    /// Whether embeddings / the vision tower are trainable (full fine-tuning).
    pub train_embeddings: bool,
    /// Seed of this micro-batch's dropout masks.
    pub dropout_seed: u64,
}

/// Token embeddings with image features in place. Detached unless embeddings are trained.
fn embed(model: &Qwen3_5, mb: &MicroBatch, tracked: bool) -> Result<Tensor> {
    let feats = match &mb.image_features {
        Some(f) => Some(f.clone()),
        None => mb.images.as_ref().map(|v| model.image_features(v)).transpose()?,
    };
    let emb = model.embed(&mb.input_ids, feats.as_ref())?;
    Ok(if tracked { emb } else { emb.detach() })
}

/// The whole forward of a micro-batch: embeddings, every decoder layer, mean cross-entropy over its label tokens
/// (and their number). `train` draws dropout masks; `tracked` keeps the graph into embeddings and the tower.
pub fn forward_loss(
    model: &Qwen3_5,
    mb: &MicroBatch,
    tracked: bool,
    train: bool,
    seed: u64,
) -> Result<(Tensor, usize)> {
    decoder_loss(model, mb, tracked, train.then_some(seed), true)
}

/// Embeddings, the decoder layers (dropout seeded from `dropout` when training) and the loss. Without
/// `keep_graph` each layer's output is detached: no backward can follow, and only one layer's activations are
/// alive at a time (the values are the same).
fn decoder_loss(
    model: &Qwen3_5,
    mb: &MicroBatch,
    tracked: bool,
    dropout: Option<u64>,
    keep_graph: bool,
) -> Result<(Tensor, usize)> {
    let x = run_layers(model, 0, embed(model, mb, tracked)?, mb, dropout, keep_graph)?;
    head_loss(model, &x, &mb.labels, keep_graph)
}

/// Decoder layers `first..` on `x`, both halves of each, dropout seeded per half from `dropout` when training;
/// without `keep_graph` each half's output is detached.
fn run_layers(
    model: &Qwen3_5,
    first: usize,
    mut x: Tensor,
    mb: &MicroBatch,
    dropout: Option<u64>,
    keep_graph: bool,
) -> Result<Tensor> {
    for (i, layer) in model.layers.iter().enumerate().skip(first) {
        for half in [Half::Mixer, Half::Mlp] {
            if let Some(seed) = dropout {
                seed_dropout(half_seed(seed, i, half));
            }
            x = half.forward(layer, &x, mb, dropout.is_some())?;
            if !keep_graph {
                x = x.detach();
            }
        }
    }
    Ok(x)
}

/// The two residual halves of a decoder layer: the unit of gradient checkpointing, so that a backward holds the
/// activations of one half (at the 4B shapes an MLP's or a mixer's take hundreds of megabytes) rather than both.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Half {
    Mixer,
    Mlp,
}

impl Half {
    fn forward(self, layer: &DecoderLayer, x: &Tensor, mb: &MicroBatch, train: bool) -> Result<Tensor> {
        Ok(match self {
            Half::Mixer => layer.forward_mixer(x, &mb.rope, None, train, mb.segments.as_ref())?,
            Half::Mlp => layer.forward_mlp(x, train)?,
        })
    }
}

/// Dropout seed of one half of a layer (a recomputation reseeds with it, so it draws the same masks).
fn half_seed(seed: u64, layer: usize, half: Half) -> u64 {
    seed.wrapping_mul(1_000_003).wrapping_add(2 * layer as u64 + (half == Half::Mlp) as u64)
}

/// Final norm, head and mean cross-entropy over the shifted label positions. `h`: (B, S, D). Without
/// `want_grad` the returned loss carries no gradient to `h` (evaluation).
pub fn head_loss(model: &Qwen3_5, h: &Tensor, labels: &[Vec<i64>], want_grad: bool) -> Result<(Tensor, usize)> {
    let (b, s, d) = h.dims3()?;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (bi, row) in labels.iter().enumerate() {
        if row.len() != s {
            bail!("labels row {bi} has {} entries for a sequence of {s}", row.len());
        }
        for p in 0..s.saturating_sub(1) {
            let t = row[p + 1];
            if t != -100 {
                if t < 0 || t as usize >= model.cfg.text.vocab_size {
                    bail!("label {t} at row {bi}, position {} is outside the vocabulary", p + 1);
                }
                rows.push((bi * s + p) as u32);
                targets.push(t as u32);
            }
        }
    }
    let n = rows.len();
    if n == 0 {
        return Ok((Tensor::zeros((), DType::F32, h.device())?, 0));
    }
    let dev = h.device();
    let picked = h.reshape((b * s, d))?.index_select(&Tensor::from_vec(rows, n, dev)?, 0)?;
    let hn = model.norm.forward(&picked)?;
    if !model.head().is_variable() {
        let budget = if crate::nn::frozen::widens_per_call(model.head()) {
            LOGIT_BLOCK_ELEMS_WIDENING
        } else {
            LOGIT_BLOCK_ELEMS
        };
        let block = (budget / model.head().dim(0)?.max(1)).max(8);
        return Ok((blockwise_cross_entropy(&hn, model.head(), &targets, want_grad, block)?, n));
    }
    // A trained head needs its own gradient: the whole graph.
    let logits = model.logits(&hn)?.to_dtype(DType::F32)?; // (N, V)
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
    let picked_logit = logits.gather(&Tensor::from_vec(targets, (n, 1), dev)?, 1)?;
    let loss = (lse - picked_logit)?.sum_all()?.affine(1.0 / n as f64, 0.0)?;
    Ok((loss, n))
}

/// Logits [`blockwise_cross_entropy`] computes at a time: 32 MB of f32; 256 MB where each product widens the
/// whole head (int8, or bf16 without AMX), so that the head is converted once or twice, not once per few rows.
const LOGIT_BLOCK_ELEMS: usize = 8 << 20;
const LOGIT_BLOCK_ELEMS_WIDENING: usize = 64 << 20;

/// Mean cross-entropy of `hn · headᵀ` (N, V) against `targets` for a frozen head, a block of rows at a time: with
/// Qwen3.5's 248,320-token vocabulary a few hundred rows of logits and the graph's copies of them (shifted, exp,
/// their gradients) take a gigabyte. The head has no gradient, so each block's gradient with respect to `hn`,
/// (softmax − one-hot) · W / N, is computed at once and the logits dropped; the result's value is the loss and its
/// gradient with respect to `hn` is that, through `Σ (hn − stop_grad(hn)) · dhn`, which is zero in value.
fn blockwise_cross_entropy(
    hn: &Tensor,
    head: &crate::nn::Param,
    targets: &[u32],
    want_grad: bool,
    block: usize,
) -> Result<Tensor> {
    let dev = hn.device();
    let n = targets.len();
    let fixed = hn.detach();
    if let Some(loss) = blockwise_cross_entropy_cpu(hn, &fixed, head, targets, want_grad, block)? {
        return Ok(loss);
    }
    let mut sum = 0f64;
    let mut grads = Vec::new();
    for r0 in (0..n).step_by(block) {
        let r = block.min(n - r0);
        let logits = lm_logits(&fixed.narrow(0, r0, r)?, head)?.to_dtype(DType::F32)?; // (r, V)
        let t = Tensor::from_slice(&targets[r0..r0 + r], (r, 1), dev)?;
        let picked = logits.gather(&t, 1)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let e = logits.broadcast_sub(&max)?.exp()?;
        drop(logits);
        let z = e.sum_keepdim(D::Minus1)?;
        let nll = ((z.log()? + max)? - picked)?;
        sum += nll.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        if want_grad {
            let p = e.broadcast_div(&z)?;
            drop(e);
            let g = p.scatter_add(&t, &Tensor::full(-1f32, (r, 1), dev)?, 1)?.affine(1.0 / n as f64, 0.0)?;
            grads.push(crate::nn::frozen::frozen_input_grad(&g, head)?);
        }
    }
    let loss = Tensor::new((sum / n as f64) as f32, dev)?;
    if !want_grad {
        return Ok(loss);
    }
    let dhn = Tensor::cat(&grads, 0)?;
    let zero = ((hn.to_dtype(DType::F32)? - fixed.to_dtype(DType::F32)?)? * dhn)?.sum_all()?;
    Ok((zero + loss)?)
}

/// [`blockwise_cross_entropy`] on the CPU for f32 rows and a frozen head: each block's logits are one vector whose
/// softmax and gradient are formed in place, a pass or two per row, where the tensor ops make five copies of it.
/// None where the head's products do not run on the CPU kernels.
fn blockwise_cross_entropy_cpu(
    hn: &Tensor,
    fixed: &Tensor,
    head: &crate::nn::Param,
    targets: &[u32],
    want_grad: bool,
    block: usize,
) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    if !hn.device().is_cpu() || hn.dtype() != DType::F32 {
        return Ok(None);
    }
    let (n, d) = fixed.dims2()?;
    let v = head.dim(0)?;
    let h = fixed.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let mut dh = if want_grad { vec![0f32; n * d] } else { Vec::new() };
    let mut sum = 0f64;
    for r0 in (0..n).step_by(block) {
        let r = block.min(n - r0);
        let Some(mut logits) = crate::nn::frozen::cpu_xwt(&h[r0 * d..(r0 + r) * d], r, d, head)? else {
            return Ok(None);
        };
        let mut nll = vec![0f32; r];
        logits
            .par_chunks_mut(v)
            .zip(nll.par_iter_mut())
            .zip(&targets[r0..r0 + r])
            .for_each(|((row, out), &t)| cross_entropy_row(row, t as usize, want_grad, 1.0 / n as f32, out));
        sum += nll.iter().map(|&x| x as f64).sum::<f64>();
        if want_grad {
            let Some(g) = crate::nn::frozen::cpu_gw(&logits, r, v, head)? else { return Ok(None) };
            dh[r0 * d..(r0 + r) * d].copy_from_slice(&g);
        }
    }
    let dev = hn.device();
    let loss = Tensor::new((sum / n as f64) as f32, dev)?;
    if !want_grad {
        return Ok(Some(loss));
    }
    let dhn = Tensor::from_vec(dh, (n, d), dev)?;
    let zero = ((hn - fixed)? * dhn)?.sum_all()?;
    Ok(Some((zero + loss)?))
}

crate::nn::amx::wide_fn! {
    /// One row of logits: its negative log-likelihood of `t` into `out` and, with `grad`, the row replaced by
    /// (softmax − one-hot(t)) · `scale`.
    fn cross_entropy_row(row: &mut [f32], t: usize, grad: bool, scale: f32, out: &mut f32) {
        let mut m = [f32::NEG_INFINITY; 16];
        let chunks = row.chunks_exact(16);
        let rest = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        for c in chunks {
            for l in 0..16 {
                m[l] = m[l].max(c[l]);
            }
        }
        let max = m.iter().fold(rest, |a, &x| a.max(x));
        let picked = row[t];
        let mut acc = [0f32; 16];
        let mut tail = 0f32;
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            for l in 0..16 {
                let e = crate::nn::fused::exp(c[l] - max);
                acc[l] += e;
                c[l] = e;
            }
        }
        for x in chunks.into_remainder() {
            let e = crate::nn::fused::exp(*x - max);
            tail += e;
            *x = e;
        }
        for w in [8, 4, 2, 1] {
            for l in 0..w {
                acc[l] += acc[l + w];
            }
        }
        let z = acc[0] + tail;
        *out = z.ln() + max - picked;
        if grad {
            let c = scale / z;
            for x in row.iter_mut() {
                *x *= c;
            }
            row[t] -= scale;
        }
    }
}

/// Forward and backward of one micro-batch; adds `scale · ∂loss/∂p` for every `params` entry to `acc`.
pub fn forward_backward(
    model: &Qwen3_5,
    mb: &MicroBatch,
    params: &[Var],
    acc: &mut GradAccum,
    opts: StepOptions,
) -> Result<StepStats> {
    if !opts.checkpointing {
        let (loss, n) = forward_loss(model, mb, opts.train_embeddings, true, opts.dropout_seed)?;
        let value = loss.to_scalar::<f32>()? as f64;
        if n > 0 {
            let store = (loss * opts.scale)?.backward()?;
            acc.add(&store, params)?;
        }
        return Ok(StepStats { loss: value, tokens: n });
    }

    // 1. Forward without keeping activations: remember the input of each recomputed layer half.
    let split = model.layers.len() - opts.keep_last.min(model.layers.len());
    let halves: Vec<(&DecoderLayer, Half, usize)> =
        model.layers[..split].iter().enumerate().flat_map(|(i, l)| [(l, Half::Mixer, i), (l, Half::Mlp, i)]).collect();
    let mut inputs = vec![embed(model, mb, false)?];
    for &(layer, half, i) in &halves {
        seed_dropout(half_seed(opts.dropout_seed, i, half));
        let x = half.forward(layer, inputs.last().expect("non-empty"), mb, true)?.detach();
        inputs.push(x);
    }
    // 2. Head segment: the kept layers and the loss, with their graph.
    let h = Var::from_tensor(&inputs.pop().expect("non-empty"))?;
    let x = run_layers(model, split, h.as_tensor().clone(), mb, Some(opts.dropout_seed), true)?;
    let (loss, n) = head_loss(model, &x, &mb.labels, true)?;
    drop(x);
    let value = loss.to_scalar::<f32>()? as f64;
    if n == 0 {
        return Ok(StepStats { loss: value, tokens: 0 });
    }
    let store = (loss * opts.scale)?.backward()?;
    acc.add(&store, params)?;
    let mut dy = store.get(h.as_tensor()).cloned().ok_or_else(|| anyhow::anyhow!("no gradient reached the head"))?;
    drop((store, h));
    // 3. Halves in reverse: recompute with the same dropout masks, then VJP; each input is dropped once used.
    for &(layer, half, i) in halves.iter().rev() {
        seed_dropout(half_seed(opts.dropout_seed, i, half));
        let x = Var::from_tensor(&inputs.pop().expect("one input per half"))?;
        let y = half.forward(layer, x.as_tensor(), mb, true)?;
        let store = (y * &dy)?.sum_all()?.backward()?;
        acc.add(&store, params)?;
        dy = store.get(x.as_tensor()).cloned().ok_or_else(|| anyhow::anyhow!("no gradient reached layer {i}"))?;
    }
    // 4. Embeddings and vision tower, when trained.
    if opts.train_embeddings {
        let emb = embed(model, mb, true)?;
        let store = (emb * &dy)?.sum_all()?.backward()?;
        acc.add(&store, params)?;
    }
    Ok(StepStats { loss: value, tokens: n })
}

/// Mean eval loss as HF computes it: the mean of each batch's mean token loss. The forward
/// is training's, without dropout and without a graph. On a CPU each sample is computed alone (on `workers`) and
/// a batch's mean is put together from its samples' token counts.
pub fn evaluate(
    model: &Qwen3_5,
    processor: &ImageProcessorConfig,
    samples: &[Sample],
    batch_size: usize,
    pad_id: u32,
    workers: &Workers,
) -> Result<(f64, f64)> {
    let t0 = std::time::Instant::now();
    let batches: Vec<&[Sample]> = samples.chunks(batch_size.max(1)).collect();
    let units: Vec<(usize, Vec<&Sample>)> = if model.device.is_cpu() {
        batches.iter().enumerate().flat_map(|(j, b)| b.iter().map(move |s| (j, vec![s]))).collect()
    } else {
        batches.iter().enumerate().map(|(j, b)| (j, b.iter().collect())).collect()
    };
    let losses = workers.map(&units, |(_, refs)| {
        let mb = micro_batch(model, processor, refs, pad_id, None)?;
        let (loss, tokens) = decoder_loss(model, &mb, false, None, false)?;
        Ok((loss.to_scalar::<f32>()? as f64, tokens))
    })?;
    // (Σ tokens · loss, Σ tokens) per batch.
    let mut per_batch = vec![(0.0, 0usize); batches.len()];
    for ((j, _), (loss, tokens)) in units.iter().zip(losses) {
        per_batch[*j].0 += loss * tokens as f64;
        per_batch[*j].1 += tokens;
    }
    // transformers 5 repeats each batch's loss `per_device_eval_batch_size` times, a short last batch included, and
    // averages: the mean of the batch losses.
    let (mut sum, mut n) = (0.0, 0usize);
    for (weighted, tokens) in per_batch {
        if tokens > 0 {
            sum += weighted / tokens as f64;
            n += 1;
        }
    }
    Ok((if n > 0 { sum / n as f64 } else { f64::NAN }, t0.elapsed().as_secs_f64()))
}

/// A piece of an accumulation window that one worker computes: a whole micro-batch, or one sample of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Unit {
    /// Indices of its samples (into the training set).
    pub samples: Vec<usize>,
    /// Which micro-batch of the window it belongs to.
    pub batch: usize,
    /// Weight of its mean loss in its micro-batch's loss: its share of the micro-batch's label tokens (1 for a
    /// whole micro-batch). Before backward the loss is also divided by the window's number of micro-batches.
    pub weight: f64,
    pub dropout_seed: u64,
}

/// The units of one accumulation window. With `split`, every sample of a micro-batch is its own unit, weighted by
/// its share of the micro-batch's label tokens: the micro-batch's loss is the mean over all its label tokens, so
/// these units' gradients sum to exactly the micro-batch's gradient (rows never see each other: attention and the
/// Gated-DeltaNet recurrence are causal and padding sits on the right). Samples without label tokens add nothing
/// and are left out. `seed(j)` is micro-batch j's dropout seed; its first sample keeps it.
pub fn window_units(
    batches: &[&[usize]],
    label_tokens: impl Fn(usize) -> usize,
    split: bool,
    seed: impl Fn(usize) -> u64,
) -> Vec<Unit> {
    let mut units = Vec::new();
    for (j, batch) in batches.iter().enumerate() {
        let total: usize = batch.iter().map(|&i| label_tokens(i)).sum();
        if !split || batch.len() == 1 || total == 0 {
            units.push(Unit { samples: batch.to_vec(), batch: j, weight: 1.0, dropout_seed: seed(j) });
            continue;
        }
        for (k, &i) in batch.iter().enumerate() {
            let n = label_tokens(i);
            if n == 0 {
                continue;
            }
            let weight = n as f64 / total as f64;
            units.push(Unit { samples: vec![i], batch: j, weight, dropout_seed: seed(j) ^ ((k as u64) << 40) });
        }
    }
    units
}

/// Forward and backward of a window's units on `workers`, `workers.count()` units at a time; each unit's gradient
/// is added to `acc` in unit order, so the sum is the same for any number of workers. Returns each micro-batch's
/// loss, or None when `stop` was set between units (the partial window's gradients are then incomplete).
#[allow(clippy::too_many_arguments)]
pub fn window_backward(
    model: &Qwen3_5,
    units: &[Unit],
    n_batches: usize,
    build: &(dyn Fn(&Qwen3_5, &[usize]) -> Result<MicroBatch> + Sync),
    params: &[Var],
    acc: &mut GradAccum,
    opts: StepOptions,
    workers: &Workers,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Option<Vec<f64>>> {
    let mut losses = vec![0.0; n_batches];
    for chunk in units.chunks(workers.count().max(1)) {
        let done = workers.map(chunk, |u| {
            let mb = build(model, &u.samples)?;
            let mut local = GradAccum::default();
            let so = StepOptions { scale: u.weight / n_batches as f64, dropout_seed: u.dropout_seed, ..opts };
            let st = forward_backward(model, &mb, params, &mut local, so)?;
            Ok((local, st.loss))
        })?;
        for (u, (local, loss)) in chunk.iter().zip(done) {
            acc.merge(local)?;
            losses[u.batch] += u.weight * loss;
        }
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
    }
    Ok(Some(losses))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The blockwise loss and its gradient against candle's autograd through the whole log-softmax.
    #[test]
    fn blockwise_cross_entropy_matches_the_full_graph() {
        let dev = Device::Cpu;
        let (n, d, v) = (21, 16, 50);
        // Values a bf16 copy holds exactly, so both dtypes of the head give the same products.
        let w = Tensor::randn(0f32, 0.5, (v, d), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % v as u32).collect();
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), &dev).unwrap()).unwrap();
        let logits = h.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let logp = log_softmax(&logits);
        let t = Tensor::from_slice(&targets, (n, 1), &dev).unwrap();
        let want = (logp.gather(&t, 1).unwrap().sum_all().unwrap() * (-1.0 / n as f64)).unwrap();
        let want_grad = want.backward().unwrap().get(h.as_tensor()).unwrap().clone();
        for dtype in [DType::F32, DType::BF16] {
            let head = crate::nn::Param::new("w", w.to_dtype(dtype).unwrap());
            for block in [4, 8, 64] {
                let got = blockwise_cross_entropy(h.as_tensor(), &head, &targets, true, block).unwrap();
                let tol = 1e-5;
                let (a, b) = (got.to_scalar::<f32>().unwrap(), want.to_scalar::<f32>().unwrap());
                assert!((a - b).abs() < tol * b.abs().max(1.0), "{dtype:?}, block {block}: loss {a} vs {b}");
                let g = got.backward().unwrap().get(h.as_tensor()).unwrap().clone();
                let err = (&g - &want_grad).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let scale = want_grad.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(err < tol * scale, "{dtype:?}, block {block}: gradient off by {err} (max {scale})");
                let plain = blockwise_cross_entropy(h.as_tensor(), &head, &targets, false, block).unwrap();
                assert_eq!(plain.to_scalar::<f32>().unwrap(), a, "the loss without a gradient is the same value");
            }
        }
    }

    fn log_softmax(x: &Tensor) -> Tensor {
        let max = x.max_keepdim(D::Minus1).unwrap().detach();
        let shifted = x.broadcast_sub(&max).unwrap();
        let lse = shifted.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap();
        shifted.broadcast_sub(&lse).unwrap()
    }
}
