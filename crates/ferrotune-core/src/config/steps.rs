//! Optimizer-step arithmetic, exactly as the HF Trainer of transformers 5.5.4 does it
//! (`Trainer.set_initial_training_values`, `TrainingArguments.get_warmup_steps`, `TrainerState.compute_steps`).
//!
//! The reference run's log reported 141 steps for 450 samples x 5 epochs with accumulation 16; transformers 5.5.4
//! gives 145 (it counts the last, partial accumulation of each epoch as a step: ceil(450 / 16) = 29 per epoch).
//! `tools/golden/gen_lf.py` asserts these numbers against a real Trainer.

use anyhow::{bail, Result};

/// The inputs of the step count.
#[derive(Clone, Debug, PartialEq)]
pub struct StepInputs {
    pub samples: usize,
    pub per_device_batch: usize,
    pub grad_accum: usize,
    pub epochs: f64,
    /// `max_steps`; used instead of epochs when positive.
    pub max_steps: i64,
    pub drop_last: bool,
    /// HF `warmup_steps` after folding in `warmup_ratio`: >= 1 is a step count, < 1 a fraction of the total.
    pub warmup: f64,
    pub logging_steps: f64,
    pub save_steps: f64,
    pub eval_steps: Option<f64>,
}

/// Derived step counts for one training run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Steps {
    pub samples: usize,
    /// Samples per optimizer step (batch x accumulation x 1 device).
    pub effective_batch: usize,
    /// Batches (forward passes) per epoch.
    pub batches_per_epoch: usize,
    pub steps_per_epoch: usize,
    /// Epochs the loop runs (the last one may stop early when max_steps is reached).
    pub epochs: usize,
    pub total_steps: usize,
    pub warmup_steps: usize,
    pub logging_steps: usize,
    pub save_steps: usize,
    pub eval_steps: Option<usize>,
}

impl Steps {
    pub fn compute(i: &StepInputs) -> Result<Steps> {
        if i.per_device_batch == 0 || i.grad_accum == 0 {
            bail!("per_device_train_batch_size and gradient_accumulation_steps must be at least 1");
        }
        let Some(effective_batch) = i.per_device_batch.checked_mul(i.grad_accum) else {
            bail!(
                "per_device_train_batch_size {} x gradient_accumulation_steps {} overflows; lower them",
                i.per_device_batch,
                i.grad_accum
            );
        };
        if i.samples == 0 {
            bail!("there are no training samples");
        }
        // DataLoader length: ceil(samples / batch), or floor with drop_last.
        let batches_per_epoch =
            if i.drop_last { i.samples / i.per_device_batch } else { i.samples.div_ceil(i.per_device_batch) };
        if batches_per_epoch == 0 {
            bail!(
                "{} samples do not fill one batch of {} with dataloader_drop_last: true",
                i.samples,
                i.per_device_batch
            );
        }
        let steps_per_epoch = batches_per_epoch.div_ceil(i.grad_accum).max(1);
        let (total_steps, epochs) = if i.max_steps > 0 {
            let total = i.max_steps as usize;
            (total, total.div_ceil(steps_per_epoch))
        } else {
            if i.epochs <= 0.0 {
                bail!("num_train_epochs must be positive when max_steps is not set");
            }
            ((i.epochs * steps_per_epoch as f64).ceil() as usize, i.epochs.ceil() as usize)
        };
        let warmup_steps =
            if i.warmup >= 1.0 { i.warmup as usize } else { (total_steps as f64 * i.warmup).ceil() as usize };
        // Fractions below 1 are ratios of the total (TrainerState.compute_steps).
        let ratio = |x: f64| if x < 1.0 { (total_steps as f64 * x).ceil() as usize } else { x as usize };
        Ok(Steps {
            samples: i.samples,
            effective_batch,
            batches_per_epoch,
            steps_per_epoch,
            epochs,
            total_steps,
            warmup_steps,
            logging_steps: ratio(i.logging_steps),
            save_steps: ratio(i.save_steps),
            eval_steps: i.eval_steps.map(ratio),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(samples: usize, batch: usize, accum: usize, epochs: f64) -> StepInputs {
        StepInputs {
            samples,
            per_device_batch: batch,
            grad_accum: accum,
            epochs,
            max_steps: -1,
            drop_last: false,
            warmup: 0.1,
            logging_steps: 10.0,
            save_steps: 500.0,
            eval_steps: None,
        }
    }

    #[test]
    fn reference_run() {
        let s = Steps::compute(&inputs(450, 1, 16, 5.0)).unwrap();
        assert_eq!((s.steps_per_epoch, s.total_steps, s.effective_batch, s.warmup_steps), (29, 145, 16, 15));
    }

    #[test]
    fn max_steps_wins() {
        let mut i = inputs(100, 8, 1, 3.0);
        i.max_steps = 20;
        let s = Steps::compute(&i).unwrap();
        assert_eq!((s.total_steps, s.epochs, s.steps_per_epoch), (20, 2, 13));
    }
}
