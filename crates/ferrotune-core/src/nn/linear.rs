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
    /// Bᵀ [r, out] of a fixed adapter (served, not trained): decoding rows multiply with it.
    pub bt: Option<Tensor>,
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

    /// x: (.., in) -> (.., out). `train` enables the adapter's dropout. Without an adapter of its own, the
    /// adapters chosen for the rows of this thread's products ([`with_row_adapters`]) apply.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let y = match &self.lora {
            Some(l) => {
                let rows_lora = l.bt.as_ref().filter(|_| !train).map(|bt| RowLora {
                    rows: None,
                    a: l.a.as_tensor(),
                    b: l.b.as_tensor(),
                    bt,
                    scale: l.scale,
                });
                match rows_lora.map(|g| self.decoding_rows(&x2, &[g])).transpose()?.flatten() {
                    Some(y) => y,
                    None => {
                        self.forward_lora(&x2, train, Some((l.a.as_tensor(), l.b.as_tensor(), l.scale, l.dropout)))?
                    }
                }
            }
            None => match ROW_ADAPTERS.with(|g| self.forward_row_adapters(&x2, &g.borrow()))? {
                Some(y) => y,
                None => self.forward_lora(&x2, train, None)?,
            },
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_dim();
        y.reshape(out_dims)
    }

    /// `x2` (rows, in) through the base and the adapter `(A, B, scale, dropout)` if any: (rows, out).
    fn forward_lora(&self, x2: &Tensor, train: bool, lora: Option<(&Tensor, &Tensor, f64, f32)>) -> Result<Tensor> {
        // Without dropout a frozen base and its adapter are one op on the CPU.
        if let Some((a, b, scale, _)) = lora.filter(|l| !(train && l.3 > 0.0) && self.bias.is_none()) {
            if let Some(y) = super::frozen::frozen_lora_matmul(x2, &self.weight, a, b, scale)? {
                return Ok(y);
            }
        }
        // A trainable base weight (full fine-tuning) needs its gradient; a frozen one must not get one.
        let mut y = if self.weight.is_variable() {
            x2.matmul(&self.weight.t()?)?
        } else {
            super::frozen::frozen_matmul_param(x2, &self.weight)?
        };
        // Activations keep their dtype whatever the weight's (an adapter merged into a 16-bit weight is f32).
        if y.dtype() != x2.dtype() {
            y = y.to_dtype(x2.dtype())?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some((a, b, scale, p)) = lora {
            let xin = x2.to_dtype(DType::F32)?;
            let xin = if train && p > 0.0 { dropout(&xin, p)? } else { xin };
            let delta = (xin.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?;
            y = (y.to_dtype(DType::F32)? + delta)?.to_dtype(y.dtype())?;
        }
        Ok(y)
    }

    /// The products of rows that several adapters share out: None when none of them adapts this module. Every
    /// row gets the numbers it would get with its adapter as this module's own branch (inference only).
    fn forward_row_adapters(&self, x2: &Tensor, groups: &[RowAdapter]) -> Result<Option<Tensor>> {
        let used: Vec<RowLora> = groups
            .iter()
            .filter_map(|g| {
                g.adapter.modules.get(&*self.path).map(|m| RowLora {
                    rows: g.rows.as_deref(),
                    a: &m.a,
                    b: &m.b,
                    bt: &m.bt,
                    scale: g.adapter.scale,
                })
            })
            .collect();
        let Some(first) = used.first() else { return Ok(None) };
        if let Some(y) = self.decoding_rows(x2, &used)? {
            return Ok(Some(y));
        }
        if first.rows.is_none() {
            // A whole prompt: the single-branch op.
            return self.forward_lora(x2, false, Some((first.a, first.b, first.scale, 0.0))).map(Some);
        }
        // Elsewhere (a GPU): the base product, plus each group's adapter product on its rows.
        let mut y = self.forward_lora(x2, false, None)?.to_dtype(DType::F32)?;
        for g in &used {
            let rows = g.rows.unwrap_or(&[]);
            let idx = Tensor::from_vec(rows.iter().map(|&i| i as u32).collect::<Vec<_>>(), rows.len(), x2.device())?;
            let xg = x2.index_select(&idx, 0)?.to_dtype(DType::F32)?;
            let delta = (xg.matmul(&g.a.t()?)?.matmul(g.bt)? * g.scale)?;
            y = y.index_add(&idx, &delta, 0)?;
        }
        y.to_dtype(x2.dtype()).map(Some)
    }

    /// A decoding batch on the CPU (f32, at most [`super::stream::STREAM_ROWS`] rows, no bias): the base product of
    /// every row, then each group's adapter product added to its rows, each output summed in one order whatever
    /// the other rows; None elsewhere.
    fn decoding_rows(&self, x2: &Tensor, groups: &[RowLora]) -> Result<Option<Tensor>> {
        let (m, k) = x2.dims2()?;
        let n = self.out_dim();
        if !(x2.device().is_cpu() && x2.dtype() == DType::F32 && self.bias.is_none() && m <= super::stream::STREAM_ROWS)
        {
            return Ok(None);
        }
        let xv = x2.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let Some(mut y) = super::frozen::cpu_xwt(&xv, m, k, &self.weight)? else { return Ok(None) };
        // Each group's down-projection u = x Aᵀ (small), and which group and row of it each batch row is.
        let mut ups: Vec<(Vec<f32>, usize, f32)> = Vec::with_capacity(groups.len());
        let mut of_row: Vec<Option<(usize, usize)>> = vec![None; m];
        let mut bts = Vec::with_capacity(groups.len());
        for (gn, g) in groups.iter().enumerate() {
            let rows: Vec<usize> = g.rows.map_or_else(|| (0..m).collect(), <[usize]>::to_vec);
            let r = g.a.dim(0)?;
            let xg: Vec<f32> = rows.iter().flat_map(|&i| xv[i * k..(i + 1) * k].iter().copied()).collect();
            let (sa, la) = g.a.storage_and_layout();
            let candle_core::Storage::Cpu(ca) = &*sa else { return Ok(None) };
            let av = super::fused::f32_slice(ca, la, "LoRA A")?;
            ups.push((
                super::stream::stream_rows(&xg, rows.len(), k, super::mixed::Packed::F32(av), r),
                r,
                g.scale as f32,
            ));
            for (gi, &i) in rows.iter().enumerate() {
                of_row[i] = Some((gn, gi));
            }
            bts.push(g.bt.storage_and_layout());
        }
        let mut btv = Vec::with_capacity(groups.len());
        for (sb, lb) in &bts {
            let candle_core::Storage::Cpu(cb) = &**sb else { return Ok(None) };
            btv.push(super::fused::f32_slice(cb, lb, "LoRA Bᵀ")?);
        }
        // The up-projections row by row, on the pool: the adapter's part of each output in one order, as
        // [`super::stream::lora_up`] sums it, then scaled into the base product.
        let add = |(i, yi): (usize, &mut [f32])| {
            if let Some((gn, gi)) = of_row[i] {
                let (u, r, scale) = &ups[gn];
                let v = super::stream::lora_up(&u[gi * r..(gi + 1) * r], 1, *r, btv[gn], n);
                for (y, v) in yi.iter_mut().zip(&v) {
                    *y += scale * v;
                }
            }
        };
        if m * n * ups.first().map_or(0, |u| u.1) >= 1 << 16 {
            use rayon::prelude::*;
            y.par_chunks_mut(n).enumerate().for_each(add);
        } else {
            y.chunks_mut(n).enumerate().for_each(add);
        }
        Ok(Some(Tensor::from_vec(y, (m, n), x2.device())?))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }
}

/// One adapter's rows of a product: A [r, in], B [out, r] and Bᵀ [r, out], scale.
struct RowLora<'a> {
    /// None: every row.
    rows: Option<&'a [usize]>,
    a: &'a Tensor,
    b: &'a Tensor,
    bt: &'a Tensor,
    scale: f64,
}

/// One module's adapter matrices, f32.
#[derive(Debug)]
pub struct LoraMatrices {
    /// [r, in]
    pub a: Tensor,
    /// [out, r]
    pub b: Tensor,
    /// Bᵀ [r, out], for decoding rows.
    pub bt: Tensor,
}

impl LoraMatrices {
    pub fn new(a: Tensor, b: Tensor) -> Result<Self> {
        let bt = b.t()?.contiguous()?;
        Ok(Self { a: a.contiguous()?, b, bt })
    }
}

/// An adapter's matrices by module, served beside others on one base (its modules keep no branch of their own).
#[derive(Debug)]
pub struct AdapterWeights {
    /// Module path -> its matrices.
    pub modules: std::collections::HashMap<String, LoraMatrices>,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
}

/// Which rows of the next products an adapter applies to.
#[derive(Clone, Debug)]
pub struct RowAdapter {
    /// Row indices of the products' input (one per sequence of a decoding batch); None: every row.
    pub rows: Option<Vec<usize>>,
    pub adapter: std::sync::Arc<AdapterWeights>,
}

/// Runs `f` with `groups` choosing the adapter of each row of this thread's linear products (modules without an
/// adapter of their own). The models call their linears on the calling thread, so the choice reaches every one.
pub fn with_row_adapters<R>(groups: Vec<RowAdapter>, f: impl FnOnce() -> R) -> R {
    struct Restore(Vec<RowAdapter>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = std::mem::take(&mut self.0);
            ROW_ADAPTERS.with(|g| *g.borrow_mut() = prev);
        }
    }
    let _restore = Restore(ROW_ADAPTERS.with(|g| std::mem::replace(&mut *g.borrow_mut(), groups)));
    f()
}

thread_local! {
    static ROW_ADAPTERS: std::cell::RefCell<Vec<RowAdapter>> = const { std::cell::RefCell::new(Vec::new()) };
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
