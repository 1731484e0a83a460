//! Stage 0 of the demo base's recipe: the vision tower learns to see before the language model learns to talk
//! about what it sees.
//!
//! Captions alone do not teach a tower this small to see shapes: trained only through the language model, at
//! the batch sizes a CPU allows, it learns colours while shape names stay at chance. So the tower and merger
//! are first trained directly, with two heads that are thrown away afterwards:
//! - reconstruction, which needs no labels: every merged token gives back its region of the picture,
//!   average-pooled to `pool`×`pool`-pixel cells, through one linear layer. That keeps outlines, thin parts and
//!   counts in the tokens, but as a pixel code: an outline spread over four tokens that shifts with the object,
//!   which the language model learns to read slowly;
//! - the shape term: one attention-pooling query per shape kind says which kinds the scene holds (the scene
//!   generator's labels; binary cross-entropy, weighted by `shape_weight`). That makes the kind of an outline
//!   something a token says, wherever the outline sits.
//!
//! The pictures are the base's own pretraining scenes (shapes, not robots). The caption stages that follow keep
//! the tower and merger frozen, so what it learned here is what the language model, and later the LoRA, reads.
//!
//! Measured with `tools/demo-base/vision_probe.py` (500 robots, 400 held out; head / arms / locomotion), on the
//! tower after this stage:
//! | tower | `readout`, attention pooling | `readout`, MLP | `lm --freeze-tower --batch 8`, 300 steps |
//! |---|---|---|---|
//! | reconstruction and shape term (weight 0.2) | 85 / 84 / 99% | 94 / 96 / 99% | 55 / 77 / 79% |
//! | reconstruction alone | 77 / 78 / 99% | 92 / 95 / 100% | 29 / 23 / 81% |
//! | trained through the language model (no stage 0) | 60 / 34 / 97% | 71 / 63 / 98% | |
//! | random | 62 / 76 / 99% | 87 / 93 / 98% | |
//!
//! The shape term costs reconstruction detail (held-out error 0.0047 against 0.0005 without it). A labelled
//! scene term of another form, the kind and colour in each cell of the 3×3 position grid, lost more: 67 / 73 /
//! 97% with attention pooling.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::Distribution;
use serde_json::Value;

use super::scenes::Shape;
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
    /// Weight of the shape term: from the merged tokens, one attention-pooling query per shape kind says which
    /// kinds the picture holds (binary cross-entropy). 0 turns it off.
    pub shape_weight: f64,
}

impl Default for VisionStage {
    fn default() -> Self {
        Self { steps: 2000, batch_size: 16, learning_rate: 1e-3, pool: 4, shape_weight: 0.2 }
    }
}

/// A training picture and, where its dataset row says, the shape kinds it holds (indices into
/// [`Shape::ALL`]).
#[derive(Clone, Debug)]
pub struct Picture {
    pub path: PathBuf,
    pub shapes: Option<Vec<usize>>,
}

/// The pictures of dataset `name` under `dir`, with the shape kinds of their `attributes.shapes` labels.
pub fn scene_pictures(dir: &Path, name: &str) -> Result<Vec<Picture>> {
    let path = dir.join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let rows: Vec<Value> =
        serde_json::from_str(&text).with_context(|| format!("{}: not a JSON array", path.display()))?;
    let mut out = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let shapes = match row.pointer("/attributes/shapes").and_then(Value::as_array) {
            None => None,
            Some(list) => Some(
                list.iter()
                    .map(|s| {
                        let name = s.get("shape").and_then(Value::as_str).unwrap_or_default();
                        Shape::ALL
                            .iter()
                            .position(|k| k.name() == name)
                            .with_context(|| format!("{}: row {i}: unknown shape {name:?}", path.display()))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        let Some(images) = row.get("images").and_then(Value::as_array) else {
            bail!("{}: row {i} has no \"images\" list", path.display());
        };
        for image in images {
            let Some(rel) = image.as_str() else { bail!("{}: row {i}: an image path is not a string", path.display()) };
            out.push(Picture { path: dir.join(rel), shapes: shapes.clone() });
        }
    }
    Ok(out)
}

/// What the stage measured on held-out pictures, before and after: reconstruction error (mean squared, in
/// normalised pixel units) and, with the shape term on, its cross-entropy and the percentage of pictures whose
/// shape kinds it named all right.
#[derive(Clone, Copy, Debug)]
pub struct VisionReport {
    pub held_out_before: f64,
    pub held_out_after: f64,
    pub shapes_before: Option<ShapeScore>,
    pub shapes_after: Option<ShapeScore>,
}

#[derive(Clone, Copy, Debug)]
pub struct ShapeScore {
    pub loss: f64,
    pub all_right: f64,
}

/// Trains the vision tower and merger of the checkpoint in `model_dir` on the `train` pictures (scored on the
/// `held_out` ones) and writes the whole checkpoint (every other weight unchanged) to `out` in f32.
pub fn pretrain(
    model_dir: &Path,
    (train, held_out): (&[Picture], &[Picture]),
    out: &Path,
    stage: &VisionStage,
    seed: u64,
    stop: &AtomicBool,
    progress: bool,
) -> Result<VisionReport> {
    if train.is_empty() || held_out.is_empty() {
        bail!("the vision stage needs training and held-out pictures");
    }
    let labelled = stage.shape_weight > 0.0;
    if labelled && train.iter().chain(held_out).any(|p| p.shapes.is_none()) {
        bail!("the vision stage's shape term needs every picture's shapes (attributes.shapes)");
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
    let d = vcfg.out_hidden_size;
    let vars = model.make_trainable(|n| n.starts_with("model.visual."))?;
    // The heads thrown away afterwards, N(0, 0.02) like the model's init: a linear decoder from the merged token
    // to its pooled pixels, and for the shape term one query and one readout per shape kind.
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0.0f32, 0.02).context("normal distribution")?;
    let randn = |rng: &mut StdRng, rows: usize, cols: usize| -> Result<Var> {
        let w: Vec<f32> = (0..rows * cols).map(|_| normal.sample(rng)).collect();
        Ok(Var::from_tensor(&Tensor::from_vec(w, (rows, cols), &dev)?)?)
    };
    let dec_w = randn(&mut rng, target_dim, d)?;
    let dec_b = Var::from_tensor(&Tensor::zeros(target_dim, DType::F32, &dev)?)?;
    let mut all = vars;
    all.push(("decoder.weight".into(), dec_w.clone(), true));
    all.push(("decoder.bias".into(), dec_b.clone(), false));
    let kinds = Shape::ALL.len();
    // Drawn after the decoder and only when on, so a stage without the shape term draws what it always drew.
    let shape_head = if labelled {
        let (queries, read_w) = (randn(&mut rng, kinds, d)?, randn(&mut rng, kinds, d)?);
        let read_b = Var::from_tensor(&Tensor::zeros(kinds, DType::F32, &dev)?)?;
        all.push(("shapes.queries".into(), queries.clone(), false));
        all.push(("shapes.weight".into(), read_w.clone(), true));
        all.push(("shapes.bias".into(), read_b.clone(), false));
        Some((queries, read_w, read_b))
    } else {
        None
    };
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.01, ..Default::default() }, all)?;
    let schedule = Schedule {
        kind: Kind::Cosine,
        peak: stage.learning_rate,
        warmup: 50.min(stage.steps / 10),
        total: stage.steps,
    };

    // The losses of a batch of pictures: mean squared error of the reconstructed cells and, with the shape term
    // on, its binary cross-entropy with the logits and targets it came from (batch × kind).
    let losses_of = |model: &Qwen3_5, batch: &[&Picture]| -> Result<(Tensor, Option<[Tensor; 3]>)> {
        let images = batch.iter().map(|p| crate::image::load_image(&p.path)).collect::<Result<Vec<_>>>()?;
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
        let mse = (pred - target)?.sqr()?.mean_all()?;
        let Some((queries, read_w, read_b)) = &shape_head else {
            return Ok((mse, None));
        };
        let b = batch.len();
        let tokens = feats.dim(0)? / b;
        if tokens * b != feats.dim(0)? || px.image_grid_thw.iter().any(|g| g != &px.image_grid_thw[0]) {
            bail!("the vision stage's shape term needs pictures of one size");
        }
        // Attention pooling: per picture and kind, a softmax over the tokens of the query's scores.
        let x = feats.reshape((b, tokens, d))?;
        let scores = x.broadcast_matmul(&queries.as_tensor().t()?)?.affine(1.0 / (d as f64).sqrt(), 0.0)?;
        let attn = candle_nn::ops::softmax(&scores, 1)?; // (b, tokens, kinds)
        let pooled = attn.transpose(1, 2)?.contiguous()?.matmul(&x)?; // (b, kinds, d)
        let logits = pooled.broadcast_mul(read_w.as_tensor())?.sum(2)?.broadcast_add(read_b.as_tensor())?;
        let mut y = vec![0f32; b * kinds];
        for (i, pic) in batch.iter().enumerate() {
            for &k in pic.shapes.as_deref().unwrap_or_default() {
                y[i * kinds + k] = 1.0;
            }
        }
        let y = Tensor::from_vec(y, (b, kinds), &dev)?;
        // softplus(x) - y·x, with softplus(x) = relu(x) + ln(1 + e^-|x|) to stay finite.
        let softplus = (logits.relu()? + (logits.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        let bce = (softplus - (&y * &logits)?)?.mean_all()?;
        Ok((mse, Some([bce, logits, y])))
    };
    let held: Vec<&Picture> = held_out.iter().collect();
    let held_out_scores = |model: &Qwen3_5| -> Result<(f64, Option<ShapeScore>)> {
        let (mut sum, mut bce, mut right) = (0.0, 0.0, 0usize);
        for chunk in held.chunks(32) {
            let (mse, shapes) = losses_of(model, chunk)?;
            sum += mse.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            if let Some([loss, logits, y]) = shapes {
                bce += loss.to_scalar::<f32>()? as f64 * chunk.len() as f64;
                // A picture counts when every kind's present/absent guess matches.
                let hits = logits.ge(0.0)?.to_dtype(DType::F32)?.eq(&y)?.to_dtype(DType::F32)?.sum(1)?;
                right += hits.to_vec1::<f32>()?.iter().filter(|&&h| h as usize == kinds).count();
            }
        }
        let n = held.len() as f64;
        let shapes = labelled.then(|| ShapeScore { loss: bce / n, all_right: 100.0 * right as f64 / n });
        Ok((sum / n, shapes))
    };

    let (before, shapes_before) = held_out_scores(&model)?;
    println!(
        "vision stage: {} steps of {} pictures from {} ({} held out), lr {}, cells of {}×{} px, shape term weight {}; \
         held-out error {before:.4}{}",
        stage.steps,
        stage.batch_size,
        train.len(),
        held.len(),
        stage.learning_rate,
        stage.pool,
        stage.pool,
        stage.shape_weight,
        shapes_before.map(|s| format!(", shape term {:.4}", s.loss)).unwrap_or_default()
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
        let batch: Vec<&Picture> = (0..stage.batch_size).map(|_| &train[rng.random_range(0..train.len())]).collect();
        let (mse, shapes) = losses_of(&model, &batch)?;
        let loss = match &shapes {
            Some([bce, ..]) => (&mse + bce.affine(stage.shape_weight, 0.0)?)?,
            None => mse.clone(),
        };
        let store = loss.backward()?;
        let mut grads: Vec<Option<Tensor>> = params.iter().map(|v| store.get(v.as_tensor()).cloned()).collect();
        clip_grad_norm(&mut grads, 1.0)?;
        opt.step(&grads, schedule.lr(step))?;
        bar.inc(1);
        if step % 25 == 0 {
            let shapes = match &shapes {
                Some([bce, ..]) => format!(" shapes {:.4}", bce.to_scalar::<f32>()?),
                None => String::new(),
            };
            bar.set_message(format!("error {:.4}{shapes}", mse.to_scalar::<f32>()?));
        }
    }
    bar.finish();
    let (after, shapes_after) = held_out_scores(&model)?;
    println!(
        "vision stage: held-out reconstruction error {before:.4} → {after:.4}{}",
        match (shapes_before, shapes_after) {
            (Some(b), Some(a)) => format!(
                "; shape term {:.4} → {:.4}, pictures with every shape kind named right {:.1}% → {:.1}%",
                b.loss, a.loss, b.all_right, a.all_right
            ),
            _ => String::new(),
        }
    );

    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    for entry in std::fs::read_dir(model_dir)? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if path.is_file() && name != "model.safetensors" && name != "config.json" {
            std::fs::copy(&path, out.join(&name))?;
        }
    }
    let mut cfg = crate::weights::read_config_json(model_dir)?;
    cfg["dtype"] = serde_json::json!("float32");
    super::write_json(&out.join("config.json"), &cfg)?;
    crate::weights::save_safetensors(&model.state_dict(DType::F32)?, &out.join("model.safetensors"))?;
    Ok(VisionReport { held_out_before: before, held_out_after: after, shapes_before, shapes_after })
}
