//! Stage 0 of the demo base's recipe: the vision tower learns to see before the language model learns to talk
//! about what it sees.
//!
//! Captions alone do not teach a tower this small to see shapes: trained only through the language model, at
//! the batch sizes a CPU allows, it learns colours while shape names stay at chance. So the tower and merger
//! are first trained directly, on a generic objective that needs no labels: every merged token must give back
//! its region of the picture, average-pooled to `pool`×`pool`-pixel cells, through one linear layer that is
//! thrown away afterwards. That keeps outlines, thin parts and counts in the tokens. The pictures are the base's
//! own pretraining scenes (shapes, not robots). The caption stages that follow keep the tower and merger frozen,
//! so what it learned here is what the language model, and later the LoRA, reads.
//!
//! Measured with `tools/demo-base/vision_probe.py readout` (a fresh readout trained on 500 robots over the frozen
//! tower, 400 held out), head / arms / locomotion: 77 / 78 / 99% with attention pooling and 92 / 95 / 100% with an
//! MLP over all tokens after this stage; 60 / 34 / 97% (pooling) for the tower the caption stages trained through
//! the language model before; 62 / 76 / 99% for a random tower. Adding a labelled scene term (which shape kind and
//! colour sits in each cell of the 3×3 grid) made the tokens name scene shapes but lost detail: 67 / 73 / 97%.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::Distribution;

use crate::image::ImageProcessorConfig;
use crate::models::qwen3_5::Qwen3_5;
use crate::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::train::schedule::{Kind, Schedule};

/// Settings of the vision stage.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionStage {
    /// Optimizer steps (0 skips the stage).
    pub steps: usize,
    /// Pictures per step.
    pub batch_size: usize,
    /// Peak learning rate (cosine schedule, 50 warmup steps at most).
    pub learning_rate: f64,
    /// Side in pixels of the cells each merged token reconstructs (must divide the patch size).
    pub pool: usize,
}

impl Default for VisionStage {
    fn default() -> Self {
        Self { steps: 2000, batch_size: 16, learning_rate: 1e-3, pool: 4 }
    }
}

/// What the stage measured: reconstruction error (mean squared, in normalised pixel units) on held-out pictures
/// before and after.
#[derive(Clone, Copy, Debug)]
pub struct VisionReport {
    pub held_out_before: f64,
    pub held_out_after: f64,
}

/// Trains the vision tower and merger of the checkpoint in `model_dir` on the `train` pictures (scored on the
/// `held_out` ones) and writes the whole checkpoint (every other weight unchanged) to `out` in f32.
pub fn pretrain(
    model_dir: &Path,
    (train, held_out): (&[PathBuf], &[PathBuf]),
    out: &Path,
    stage: &VisionStage,
    seed: u64,
    stop: &AtomicBool,
    progress: bool,
) -> Result<VisionReport> {
    if train.is_empty() || held_out.is_empty() {
        bail!("the vision stage needs training and held-out pictures");
    }
    let dev = Device::Cpu;
    let mut model = Qwen3_5::load(model_dir, DType::F32, &dev)?;
    let proc = ImageProcessorConfig::from_dir(model_dir)?;
    let vcfg = model.cfg.vision.clone();
    let (p, merge) = (vcfg.patch_size, vcfg.spatial_merge_size);
    if stage.pool == 0 || p % stage.pool != 0 {
        bail!("vision stage: pool {} must divide the patch size {p}", stage.pool);
    }
    let cells = p / stage.pool;
    let target_dim = merge * merge * vcfg.in_channels * cells * cells;
    let vars: Vec<(String, Var, bool)> =
        model.make_trainable()?.into_iter().filter(|(n, _, _)| n.starts_with("model.visual.")).collect();
    // The decoder: one linear layer from the merged token to its pooled pixels, N(0, 0.02) like the model's init.
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0.0f32, 0.02).context("normal distribution")?;
    let w: Vec<f32> = (0..target_dim * vcfg.out_hidden_size).map(|_| normal.sample(&mut rng)).collect();
    let dec_w = Var::from_tensor(&Tensor::from_vec(w, (target_dim, vcfg.out_hidden_size), &dev)?)?;
    let dec_b = Var::from_tensor(&Tensor::zeros(target_dim, DType::F32, &dev)?)?;
    let mut all = vars;
    all.push(("decoder.weight".into(), dec_w.clone(), true));
    all.push(("decoder.bias".into(), dec_b.clone(), false));
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.01, ..Default::default() }, all)?;
    let schedule = Schedule {
        kind: Kind::Cosine,
        peak: stage.learning_rate,
        warmup: 50.min(stage.steps / 10),
        total: stage.steps,
    };

    // Loss of a batch of pictures: mean squared error of the reconstructed cells.
    let loss_of = |model: &Qwen3_5, paths: &[&PathBuf]| -> Result<Tensor> {
        let images = paths.iter().map(|p| crate::image::load_image(p)).collect::<Result<Vec<_>>>()?;
        let px = proc.preprocess(&images)?;
        let n = px.num_patches();
        let pixels = Tensor::from_vec(px.pixel_values, (n, px.feature_dim), &dev)?;
        let feats = model.visual.forward(&pixels, &px.image_grid_thw)?;
        let pred = feats.matmul(&dec_w.as_tensor().t()?)?.broadcast_add(dec_b.as_tensor())?;
        // Rows are patches in merge-block order with features (channel, frame, row, column): average each
        // pool×pool cell of the first frame, then gather the merge² patches of a token.
        let t = proc.temporal_patch_size;
        let target = pixels
            .reshape(vec![n, vcfg.in_channels, t, cells, stage.pool, cells, stage.pool])?
            .narrow(2, 0, 1)?
            .mean(6)?
            .mean(4)?
            .reshape((n / (merge * merge), target_dim))?;
        Ok((pred - target)?.sqr()?.mean_all()?)
    };
    let held: Vec<&PathBuf> = held_out.iter().collect();
    let held_out_loss = |model: &Qwen3_5| -> Result<f64> {
        let mut sum = 0.0;
        for chunk in held.chunks(32) {
            sum += loss_of(model, chunk)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        }
        Ok(sum / held.len() as f64)
    };

    let before = held_out_loss(&model)?;
    println!(
        "vision stage: {} steps of {} pictures from {} ({} held out), lr {}, cells of {}×{} px; held-out error {before:.4}",
        stage.steps,
        stage.batch_size,
        train.len(),
        held.len(),
        stage.learning_rate,
        stage.pool,
        stage.pool
    );
    let bar = ProgressBar::new(stage.steps as u64);
    if !progress {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("vision stage {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .expect("valid template"),
    );
    let params: Vec<Var> = opt.params.iter().map(|p| p.var.clone()).collect();
    for step in 0..stage.steps {
        if stop.load(Ordering::Relaxed) {
            bar.abandon();
            bail!("the vision stage was interrupted");
        }
        let batch: Vec<&PathBuf> = (0..stage.batch_size).map(|_| &train[rng.random_range(0..train.len())]).collect();
        let loss = loss_of(&model, &batch)?;
        let store = loss.backward()?;
        let mut grads: Vec<Option<Tensor>> = params.iter().map(|v| store.get(v.as_tensor()).cloned()).collect();
        clip_grad_norm(&mut grads, 1.0)?;
        opt.step(&grads, schedule.lr(step))?;
        bar.inc(1);
        if step % 25 == 0 {
            bar.set_message(format!("loss {:.4}", loss.to_scalar::<f32>()?));
        }
    }
    bar.finish();
    let after = held_out_loss(&model)?;
    println!("vision stage: held-out reconstruction error {before:.4} → {after:.4}");

    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    for entry in std::fs::read_dir(model_dir)? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if path.is_file() && name != "model.safetensors" && name != "config.json" {
            std::fs::copy(&path, out.join(&name))?;
        }
    }
    let mut cfg = crate::checkpoint::read_config_json(model_dir)?;
    cfg["dtype"] = serde_json::json!("float32");
    super::write_json(&out.join("config.json"), &cfg)?;
    crate::checkpoint::save_safetensors(&model.state_dict(DType::F32)?, &out.join("model.safetensors"))?;
    Ok(VisionReport { held_out_before: before, held_out_after: after })
}
