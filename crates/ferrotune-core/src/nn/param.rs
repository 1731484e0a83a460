//! Parameters that carry their checkpoint key, and the one walk over a model that every enumeration is
//! built on: LoRA targets, the parameters of full fine-tuning, state dicts and random-init checkpoints.
//!
//! Each module struct mirrors one node of the checkpoint's key tree and lists its children once, in
//! checkpoint order, in [`Module::visit_mut`]. Keys are the paths the loader recorded, so no enumeration
//! spells them again.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};

use super::Linear;

/// How a parameter is held in memory relative to its checkpoint tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Stored {
    /// As in the checkpoint.
    Plain,
    /// `1 + w` (zero-centred RMSNorm weights); the checkpoint holds `w`.
    OnePlus,
    /// Reshaped; the checkpoint shape is given.
    Reshaped(Vec<usize>),
}

/// A tensor with its full checkpoint key. It derefs to the tensor, as candle's `Var` does.
#[derive(Clone)]
pub struct Param {
    pub path: Arc<str>,
    pub tensor: Tensor,
    pub stored: Stored,
    /// Written in this dtype whatever dtype a state dict is asked for.
    pub save_dtype: Option<DType>,
    /// Per-row f32 scales of a frozen matrix quantized to int8 at load: `tensor` then holds `q + 128` as u8.
    pub scales: Option<Tensor>,
    /// A bf16 frozen matrix whose products round the activations to bf16 too (PyTorch's bf16 arithmetic, and
    /// AMX tiles where the CPU has them); otherwise its products are exact in f32.
    pub bf16_products: bool,
}

impl Param {
    pub fn new(path: impl Into<Arc<str>>, tensor: Tensor) -> Self {
        Self { path: path.into(), tensor, stored: Stored::Plain, save_dtype: None, scales: None, bf16_products: false }
    }

    /// Held as `1 + w` (a zero-centred RMSNorm weight).
    pub fn one_plus(mut self) -> Result<Self> {
        self.tensor = (self.tensor + 1.0)?;
        self.stored = Stored::OnePlus;
        Ok(self)
    }

    /// Held in `shape`; checkpoints keep the shape it was loaded in.
    pub fn reshaped(mut self, shape: &[usize]) -> Result<Self> {
        self.stored = Stored::Reshaped(self.tensor.dims().to_vec());
        self.tensor = self.tensor.reshape(shape)?;
        Ok(self)
    }

    /// Always written in `dtype` (A_log stays f32, as reference checkpoints keep it).
    pub fn saved_as(mut self, dtype: DType) -> Self {
        self.save_dtype = Some(dtype);
        self
    }

    /// This (n, k) matrix as per-row int8 ([`super::mixed::quantize_rows`]), on the CPU.
    pub fn quantize_int8(self) -> Result<Self> {
        use super::mixed::{quantize_rows, Packed};
        use candle_core::{CpuStorage, Storage};
        let (n, k) = self.tensor.dims2()?;
        let t = self.tensor.to_device(&Device::Cpu)?.contiguous()?;
        let (q, scales) = {
            let (storage, layout) = t.storage_and_layout();
            let o = layout.start_offset();
            match &*storage {
                Storage::Cpu(CpuStorage::BF16(v)) => {
                    let w = Packed::Bf16(&v[o..o + n * k]);
                    quantize_rows(n, k, |r, out| w.widen(r * k, out))
                }
                Storage::Cpu(CpuStorage::F16(v)) => {
                    let w = Packed::F16(&v[o..o + n * k]);
                    quantize_rows(n, k, |r, out| w.widen(r * k, out))
                }
                Storage::Cpu(CpuStorage::F32(v)) => {
                    quantize_rows(n, k, |r, out| out.copy_from_slice(&v[o + r * k..o + (r + 1) * k]))
                }
                _ => candle_core::bail!("{}: only f32, bf16 and f16 matrices quantize to int8", self.path),
            }
        };
        drop(t);
        let q = Tensor::from_vec(q, (n, k), &Device::Cpu)?;
        let scales = Tensor::from_vec(scales, n, &Device::Cpu)?;
        Ok(Self { tensor: q, scales: Some(scales), ..self })
    }

    /// The value in f32: int8 matrices dequantized, others converted.
    pub fn to_f32(&self) -> Result<Tensor> {
        match &self.scales {
            None => self.tensor.to_dtype(DType::F32),
            Some(s) => (self.tensor.to_dtype(DType::F32)? - 128.0)?.broadcast_mul(&s.unsqueeze(1)?),
        }
    }

    /// The checkpoint tensor of the current value, in `dtype` (or the one it is always saved in), on the CPU.
    pub fn checkpoint_tensor(&self, dtype: DType) -> Result<Tensor> {
        let t = if self.scales.is_some() { self.to_f32()? } else { self.tensor.clone() };
        let t = t.detach().to_device(&Device::Cpu)?;
        let t = match &self.stored {
            Stored::Plain => t,
            Stored::OnePlus => (t.to_dtype(DType::F32)? - 1.0)?,
            Stored::Reshaped(shape) => t.reshape(shape.as_slice())?,
        };
        t.to_dtype(self.save_dtype.unwrap_or(dtype))?.contiguous()
    }
}

impl std::ops::Deref for Param {
    type Target = Tensor;

    fn deref(&self) -> &Tensor {
        &self.tensor
    }
}

/// One node of the walk: a linear (a module LoRA can target; its weight and bias are parameters too) or a
/// parameter outside any linear.
pub enum Node<'a> {
    Linear(&'a mut Linear),
    Param(&'a mut Param),
}

/// A model or one of its modules.
pub trait Module {
    /// Calls `f` on every linear and parameter below this node, in checkpoint order.
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>));
}

impl Module for Param {
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        f(Node::Param(self))
    }
}

impl Module for Linear {
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        f(Node::Linear(self))
    }
}

impl<T: Module> Module for Vec<T> {
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        for m in self {
            m.visit_mut(f);
        }
    }
}

impl<T: Module> Module for Option<T> {
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        if let Some(m) = self {
            m.visit_mut(f);
        }
    }
}

/// Every linear of `m`, in checkpoint order.
pub fn linears<M: Module + ?Sized>(m: &mut M) -> Vec<&mut Linear> {
    let mut out = Vec::new();
    m.visit_mut(&mut |n| {
        if let Node::Linear(l) = n {
            out.push(l);
        }
    });
    out
}

/// Every parameter of `m` (those of the linears included), in checkpoint order.
pub fn params<M: Module + ?Sized>(m: &mut M) -> Vec<&mut Param> {
    let mut out = Vec::new();
    m.visit_mut(&mut |n| match n {
        Node::Param(p) => out.push(p),
        Node::Linear(Linear { weight, bias, .. }) => {
            out.push(weight);
            out.extend(bias.as_mut());
        }
    });
    out
}

/// The checkpoint tensors of the current weights (LoRA branches not included), in `dtype`, on the CPU.
pub fn state_dict<M: Module + ?Sized>(m: &mut M, dtype: DType) -> Result<HashMap<String, Tensor>> {
    params(m).into_iter().map(|p| Ok((p.path.to_string(), p.checkpoint_tensor(dtype)?))).collect()
}

/// Turns every parameter into f32 and those `trained` selects by key into `Var`s (full fine-tuning); returns
/// those with their keys and whether weight decay applies (not to biases and norm weights, as HF groups
/// them). The others stay plain tensors, so the backward pass computes no gradient for them.
pub fn make_trainable<M: Module + ?Sized>(
    m: &mut M,
    trained: impl Fn(&str) -> bool,
) -> Result<Vec<(String, Var, bool)>> {
    let mut vars = Vec::new();
    for p in params(m) {
        let f32 = p.to_f32()?;
        p.scales = None;
        if !trained(&p.path) {
            p.tensor = f32;
            continue;
        }
        let var = Var::from_tensor(&f32)?;
        p.tensor = var.as_tensor().clone();
        let name = p.path.as_ref();
        let decay = !(name.ends_with(".bias") || p.stored == Stored::OnePlus || name.contains("norm"));
        vars.push((name.to_string(), var, decay));
    }
    Ok(vars)
}
