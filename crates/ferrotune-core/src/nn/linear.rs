//! `Linear` with an optional LoRA adapter, PEFT semantics: `y = x Wᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ`.
//!
//! The base weight is a plain tensor (frozen) unless the model is fully fine-tuned, in which case it is a
//! `Var`. The adapter matrices are always f32 `Var`s: A `[r, in]`, B `[out, r]`.

use candle_core::{DType, Result, Tensor, Var};

use super::Param;
use crate::weights::{Init, Weights};

#[derive(Clone)]
pub struct Lora {
    pub a: Var,
    pub b: Var,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
    /// Dropout probability on the adapter input (training only).
    pub dropout: f32,
}

#[derive(Clone)]
pub struct Linear {
    /// The module's checkpoint path (PEFT's module name), e.g. `model.language_model.layers.0.mlp.up_proj`.
    pub path: std::sync::Arc<str>,
    pub weight: Param,
    pub bias: Option<Param>,
    pub lora: Option<Lora>,
}

impl Linear {
    pub fn new(path: impl Into<std::sync::Arc<str>>, weight: Param, bias: Option<Param>) -> Self {
        Self { path: path.into(), weight, bias, lora: None }
    }

    /// Loads `<prefix>.weight` ([out, in]) and, when `bias`, `<prefix>.bias` ([out]). A random init draws
    /// the weight from normal(0, initializer_range) and zeroes the bias, as transformers does.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool, why: &str) -> anyhow::Result<Self> {
        let weight = w.frozen("weight", &[out_dim, in_dim], why, Init::Normal)?;
        let bias = if bias { Some(w.param("bias", &[out_dim], why, Init::Const(0.0))?) } else { None };
        Ok(Self::new(w.prefix(), weight, bias))
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// x: (.., in) -> (.., out). `train` enables the adapter's dropout.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        // Without dropout a frozen base and its adapter are one op on the CPU.
        if let Some(lora) = self.lora.as_ref().filter(|l| !(train && l.dropout > 0.0) && self.bias.is_none()) {
            if let Some(y) = super::frozen::frozen_lora_matmul(
                &x2,
                &self.weight,
                lora.a.as_tensor(),
                lora.b.as_tensor(),
                lora.scale,
            )? {
                let mut out_dims = dims;
                let last = out_dims.len() - 1;
                out_dims[last] = self.out_dim();
                return y.reshape(out_dims);
            }
        }
        // A trainable base weight (full fine-tuning) needs its gradient; a frozen one must not get one.
        let mut y = if self.weight.is_variable() {
            x2.matmul(&self.weight.t()?)?
        } else {
            super::frozen::frozen_matmul_param(&x2, &self.weight)?
        };
        // Activations keep their dtype whatever the weight's (an adapter merged into a 16-bit weight is f32).
        if y.dtype() != x.dtype() {
            y = y.to_dtype(x.dtype())?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(lora) = &self.lora {
            let xin = x2.to_dtype(DType::F32)?;
            let xin = if train && lora.dropout > 0.0 { dropout(&xin, lora.dropout)? } else { xin };
            let delta = (xin.matmul(&lora.a.as_tensor().t()?)?.matmul(&lora.b.as_tensor().t()?)? * lora.scale)?;
            y = (y.to_dtype(DType::F32)? + delta)?.to_dtype(y.dtype())?;
        }
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_dim();
        y.reshape(out_dims)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }
}

thread_local! {
    static DROPOUT_RNG: std::cell::RefCell<rand::rngs::StdRng> =
        std::cell::RefCell::new(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0));
    /// The current seed, and whether a GPU's generator still has to be reset to it.
    static DROPOUT_SEED: std::cell::Cell<(u64, bool)> = const { std::cell::Cell::new((0, true)) };
}

/// Reseeds the dropout masks. Gradient checkpointing reseeds before a segment's forward and before its
/// recomputation, so both see the same masks (as torch's checkpoint restores the RNG state).
pub fn seed_dropout(seed: u64) {
    DROPOUT_RNG.with(|r| *r.borrow_mut() = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed));
    DROPOUT_SEED.with(|s| s.set((seed, true)));
}

/// Inverted dropout with a mask from the seeded RNG.
fn dropout(x: &Tensor, p: f32) -> Result<Tensor> {
    use rand::Rng;
    let keep = 1.0 - p;
    if x.device().is_cuda() {
        // On a GPU the mask is drawn there (a host mask would be an upload as large as the activation, per
        // adapter and pass). The device generator is reset once per segment, so a checkpointed recomputation
        // draws the same masks in the same order.
        let (seed, reset) = DROPOUT_SEED.with(|s| s.get());
        if reset {
            x.device().set_seed(seed)?;
            DROPOUT_SEED.with(|s| s.set((seed, false)));
        }
        let kept = Tensor::rand(0f32, 1f32, x.shape(), x.device())?.ge(p)?;
        return x.mul(&(kept.to_dtype(x.dtype())? * (1.0 / keep as f64))?);
    }
    let n = x.elem_count();
    let mask: Vec<f32> = DROPOUT_RNG.with(|r| {
        let mut r = r.borrow_mut();
        (0..n).map(|_| if r.random::<f32>() < keep { 1.0 / keep } else { 0.0 }).collect()
    });
    x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
}
