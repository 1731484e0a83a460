//! AdamW with PyTorch's arithmetic (decoupled weight decay, bias correction folded into the step size and the
//! denominator) and gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`. State is f32.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};

#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// HF TrainingArguments' defaults.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// One trainable tensor with its name (PEFT key or checkpoint key) and moments.
pub struct Param {
    pub name: String,
    pub var: Var,
    pub m: Tensor,
    pub v: Tensor,
    /// HF applies weight decay to everything but biases and norm weights.
    pub decay: bool,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    pub params: Vec<Param>,
    /// Optimizer steps taken.
    pub step: u64,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, vars: Vec<(String, Var, bool)>) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var, decay)| {
                let z = var.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
                Ok(Param { name, var, m: z.clone(), v: z, decay })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, params, step: 0 })
    }

    /// Applies one update with learning rate `lr` from `grads` (one per param, in order; None = no gradient).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let step_size = lr / bc1;
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            let g = g.to_dtype(DType::F32)?;
            let theta = p.var.as_tensor().to_dtype(DType::F32)?;
            let theta = if p.decay && self.cfg.weight_decay != 0.0 {
                (theta * (1.0 - lr * self.cfg.weight_decay))?
            } else {
                theta
            };
            // m.lerp_(g, 1 - β1); v = β2·v + (1 − β2)·g²
            p.m = (&p.m + ((&g - &p.m)? * (1.0 - b1))?)?;
            p.v = ((&p.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((p.v.sqrt()? / bc2_sqrt)? + self.cfg.eps)?;
            let theta = (theta - ((&p.m / denom)? * step_size)?)?;
            p.var.set(&theta.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }

    /// Moments by name (`<name>.exp_avg`, `<name>.exp_avg_sq`) plus the step, for checkpoints.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            out.insert(format!("{}.exp_avg", p.name), p.m.to_device(&candle_core::Device::Cpu)?);
            out.insert(format!("{}.exp_avg_sq", p.name), p.v.to_device(&candle_core::Device::Cpu)?);
        }
        out.insert("step".into(), Tensor::new(&[self.step as i64], &candle_core::Device::Cpu)?);
        Ok(out)
    }

    /// Restores the moments and the step from a checkpoint's optimizer tensors; `file` (the
    /// `optimizer.safetensors` they were read from) is named in errors. Every tensor is checked for its shape and
    /// dtype before use.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, file: &Path) -> Result<()> {
        let redo = "the checkpoint is damaged or from another configuration: resume from another checkpoint-N, or \
                    start over with overwrite_output_dir: true";
        let mut moments = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let dev = p.var.device().clone();
            let get = |k: String| -> Result<Tensor> {
                let t = state.get(&k).with_context(|| format!("{}: no tensor `{k}`; {redo}", file.display()))?;
                if t.dims() != p.var.dims() {
                    bail!(
                        "{}: tensor `{k}` has shape {:?}, but the parameter {} has shape {:?}; {redo}",
                        file.display(),
                        t.dims(),
                        p.name,
                        p.var.dims()
                    );
                }
                if t.dtype() != DType::F32 {
                    bail!("{}: tensor `{k}` is {:?}; optimizer moments are F32; {redo}", file.display(), t.dtype());
                }
                Ok(t.to_device(&dev)?)
            };
            moments.push((get(format!("{}.exp_avg", p.name))?, get(format!("{}.exp_avg_sq", p.name))?));
        }
        let step = state.get("step").with_context(|| format!("{}: no tensor `step`; {redo}", file.display()))?;
        let bad_step = |why: String| anyhow::anyhow!("{}: tensor `step` {why}; {redo}", file.display());
        if step.dtype() != DType::I64 || step.dims() != [1] {
            return Err(bad_step(format!(
                "is {:?} of shape {:?}; it must hold one I64 (the optimizer steps taken)",
                step.dtype(),
                step.dims()
            )));
        }
        let n = step.to_vec1::<i64>()?[0]; // one element: checked above
        if n < 0 {
            return Err(bad_step(format!("is {n}; the steps taken cannot be negative")));
        }
        for (p, (m, v)) in self.params.iter_mut().zip(moments) {
            (p.m, p.v) = (m, v);
        }
        self.step = n as u64;
        Ok(())
    }
}

/// Total L2 norm of the gradients (norm of the per-tensor norms, in f32 as torch computes it).
pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    // Per-tensor norms stay on the device and come back in one transfer: on a GPU each `to_scalar` would be a
    // synchronisation, hundreds per step with LoRA on every linear.
    let per_tensor: Vec<Tensor> = grads
        .iter()
        .flatten()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt())
        .collect::<candle_core::Result<_>>()?;
    if per_tensor.is_empty() {
        return Ok(0.0);
    }
    let norms: Vec<f32> = Tensor::stack(&per_tensor, 0)?.to_vec1()?;
    let total: f32 = norms.iter().map(|n| n * n).sum::<f32>().sqrt();
    Ok(total as f64)
}

/// Scales gradients so their total norm is at most `max_norm`; returns the norm before clipping.
/// Like torch: coefficient max_norm / (norm + 1e-6), clamped at 1, always applied.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    if max_norm > 0.0 {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn one_param() -> AdamW {
        let var = Var::from_tensor(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap()).unwrap();
        AdamW::new(AdamWConfig::default(), vec![("w".into(), var, true)]).unwrap()
    }

    #[test]
    fn state_round_trips() {
        let mut a = one_param();
        a.step = 7;
        let state = a.state_tensors().unwrap();
        let mut b = one_param();
        b.load_state(&state, Path::new("optimizer.safetensors")).unwrap();
        assert_eq!(b.step, 7);
    }

    #[test]
    fn a_bad_step_or_moment_names_the_file_and_tensor() {
        let file = Path::new("out/checkpoint-5/optimizer.safetensors");
        let good = one_param().state_tensors().unwrap();
        let with = |k: &str, t: Tensor| {
            let mut s = good.clone();
            s.insert(k.into(), t);
            s
        };
        let cpu = &Device::Cpu;
        let cases = [
            ("step", with("step", Tensor::from_vec(Vec::<i64>::new(), 0, cpu).unwrap())),
            ("step", with("step", Tensor::new(&[1i64, 2], cpu).unwrap())),
            ("step", with("step", Tensor::new(&[1f32], cpu).unwrap())),
            ("step", with("step", Tensor::new(&[-3i64], cpu).unwrap())),
            ("w.exp_avg", with("w.exp_avg", Tensor::zeros(3, DType::F32, cpu).unwrap())),
            ("w.exp_avg_sq", with("w.exp_avg_sq", Tensor::zeros((2, 3), DType::BF16, cpu).unwrap())),
        ];
        for (tensor, state) in cases {
            let mut a = one_param();
            let err = format!("{:#}", a.load_state(&state, file).unwrap_err());
            assert!(err.contains(&file.display().to_string()) && err.contains(&format!("`{tensor}`")), "{err}");
            assert_eq!(a.step, 0, "a failed load leaves the optimizer as it was");
        }
        let mut missing = good.clone();
        missing.remove("step");
        let err = format!("{:#}", one_param().load_state(&missing, file).unwrap_err());
        assert!(err.contains("no tensor `step`"), "{err}");
    }
}
