//! One micro-batch: forward, token cross-entropy, backward into the trainable tensors.
//!
//! With gradient checkpointing the decoder runs once without keeping activations, storing only each layer's
//! input; the backward pass then recomputes one layer at a time and pulls the gradient through it with the
//! vector-Jacobian product `sum(y · dy)`. Peak memory is one layer's activations instead of all of them.

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, TensorId, Var, D};

use crate::models::qwen3_5::{Qwen3_5, VisionInput};
use crate::nn::linear::seed_dropout;

/// Token ids, labels and images of one micro-batch (right-padded; labels −100 where not trained).
pub struct MicroBatch {
    /// (B, S) u32
    pub input_ids: Tensor,
    /// Unshifted labels per row, −100 on prompt and padding.
    pub labels: Vec<Vec<i64>>,
    /// M-RoPE cos/sin (B, S, rot).
    pub rope: (Tensor, Tensor),
    pub images: Option<VisionInput>,
}

impl MicroBatch {
    /// Number of label tokens after the causal shift (what the loss averages over).
    pub fn label_tokens(&self) -> usize {
        self.labels.iter().map(|row| row.iter().skip(1).filter(|&&l| l != -100).count()).sum()
    }
}

/// Gradients accumulated over micro-batches, by parameter.
#[derive(Default)]
pub struct GradAccum {
    grads: HashMap<TensorId, Tensor>,
}

impl GradAccum {
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
    /// Whether embeddings / the vision tower are trainable (full fine-tuning).
    pub train_embeddings: bool,
    /// Seed of this micro-batch's dropout masks.
    pub dropout_seed: u64,
}

/// Token embeddings with image features in place. Detached unless embeddings are trained.
fn embed(model: &Qwen3_5, mb: &MicroBatch, tracked: bool) -> Result<Tensor> {
    let feats = mb.images.as_ref().map(|v| model.image_features(v)).transpose()?;
    let emb = model.embed(&mb.input_ids, feats.as_ref())?;
    Ok(if tracked { emb } else { emb.detach() })
}

/// Final norm, head and mean cross-entropy over the shifted label positions. `h`: (B, S, D).
pub fn head_loss(model: &Qwen3_5, h: &Tensor, labels: &[Vec<i64>]) -> Result<(Tensor, usize)> {
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
    let logits = model.logits(&model.norm.forward(&picked)?)?.to_dtype(DType::F32)?; // (N, V)
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
    let picked_logit = logits.gather(&Tensor::from_vec(targets, (n, 1), dev)?, 1)?;
    let loss = (lse - picked_logit)?.sum_all()?.affine(1.0 / n as f64, 0.0)?;
    Ok((loss, n))
}

/// Forward and backward of one micro-batch; adds `scale · ∂loss/∂p` for every `params` entry to `acc`.
pub fn forward_backward(
    model: &Qwen3_5,
    mb: &MicroBatch,
    params: &[Var],
    acc: &mut GradAccum,
    opts: StepOptions,
) -> Result<StepStats> {
    let layer_seed = |i: usize| opts.dropout_seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
    if !opts.checkpointing {
        let mut x = embed(model, mb, opts.train_embeddings)?;
        for (i, layer) in model.layers.iter().enumerate() {
            seed_dropout(layer_seed(i));
            x = layer.forward(&x, &mb.rope, None, true)?;
        }
        let (loss, n) = head_loss(model, &x, &mb.labels)?;
        let value = loss.to_scalar::<f32>()? as f64;
        if n > 0 {
            let store = (loss * opts.scale)?.backward()?;
            acc.add(&store, params)?;
        }
        return Ok(StepStats { loss: value, tokens: n });
    }

    // 1. Forward without keeping activations: remember each layer's input.
    let mut inputs = vec![embed(model, mb, false)?];
    for (i, layer) in model.layers.iter().enumerate() {
        seed_dropout(layer_seed(i));
        let x = layer.forward(inputs.last().expect("non-empty"), &mb.rope, None, true)?.detach();
        inputs.push(x);
    }
    // 2. Head segment.
    let h = Var::from_tensor(inputs.last().expect("non-empty"))?;
    let (loss, n) = head_loss(model, h.as_tensor(), &mb.labels)?;
    let value = loss.to_scalar::<f32>()? as f64;
    if n == 0 {
        return Ok(StepStats { loss: value, tokens: 0 });
    }
    let store = (loss * opts.scale)?.backward()?;
    acc.add(&store, params)?;
    let mut dy = store.get(h.as_tensor()).cloned().ok_or_else(|| anyhow::anyhow!("no gradient reached the head"))?;
    drop(store);
    // 3. Layers in reverse: recompute with the same dropout masks, then VJP.
    for (i, layer) in model.layers.iter().enumerate().rev() {
        seed_dropout(layer_seed(i));
        let x = Var::from_tensor(&inputs[i])?;
        let y = layer.forward(x.as_tensor(), &mb.rope, None, true)?;
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
