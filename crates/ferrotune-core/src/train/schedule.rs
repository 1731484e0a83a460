//! Learning-rate schedules with HF `get_scheduler` semantics: a multiplier of the peak rate as a function of
//! the number of optimizer steps already taken (the rate used by step k+1 is `lr · factor(k)`).

use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
}

impl Kind {
    pub const NAMES: &'static [&'static str] = &["linear", "cosine", "constant", "constant_with_warmup"];

    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "linear" => Kind::Linear,
            "cosine" => Kind::Cosine,
            "constant" => Kind::Constant,
            "constant_with_warmup" => Kind::ConstantWithWarmup,
            other => bail!("lr_scheduler_type {other:?} is not supported; choose one of {:?}", Self::NAMES),
        })
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub kind: Kind,
    pub peak: f64,
    pub warmup: usize,
    pub total: usize,
}

/// HF `TrainingArguments.get_warmup_steps`: an explicit count ≥ 1 wins, otherwise ceil(total · ratio)
/// (a float `warmup_steps` below 1 is a ratio too).
pub fn warmup_steps(total: usize, warmup_ratio: f64, warmup_steps: f64) -> usize {
    if warmup_steps >= 1.0 {
        warmup_steps as usize
    } else {
        let ratio = if warmup_steps > 0.0 { warmup_steps } else { warmup_ratio };
        (total as f64 * ratio).ceil() as usize
    }
}

impl Schedule {
    /// Multiplier after `step` optimizer steps.
    pub fn factor(&self, step: usize) -> f64 {
        let (w, n) = (self.warmup, self.total);
        if step < w && self.kind != Kind::Constant {
            return step as f64 / w.max(1) as f64;
        }
        match self.kind {
            Kind::Constant | Kind::ConstantWithWarmup => 1.0,
            Kind::Linear => ((n as f64 - step as f64) / (n.saturating_sub(w)).max(1) as f64).max(0.0),
            Kind::Cosine => {
                let progress = (step - w) as f64 / (n.saturating_sub(w)).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate used by the optimizer step that follows `step` completed steps.
    pub fn lr(&self, step: usize) -> f64 {
        self.peak * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_hf_values() {
        // Values from transformers.get_scheduler with 20 steps, 2 warmup steps, peak 5e-3.
        let s = Schedule { kind: Kind::Cosine, peak: 5e-3, warmup: 2, total: 20 };
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(1) - 2.5e-3).abs() < 1e-12);
        assert!((s.lr(2) - 5e-3).abs() < 1e-12);
        assert!((s.lr(19) - 3.798061746947995e-05).abs() < 1e-15);
        let l = Schedule { kind: Kind::Linear, peak: 1.0, warmup: 0, total: 10 };
        assert!((l.lr(3) - 0.7).abs() < 1e-12);
        assert_eq!(warmup_steps(20, 0.1, 0.0), 2);
        assert_eq!(warmup_steps(141, 0.1, 0.0), 15);
        assert_eq!(warmup_steps(100, 0.1, 5.0), 5);
        assert_eq!(warmup_steps(100, 0.0, 0.05), 5);
    }
}
