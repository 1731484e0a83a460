//! Samples to micro-batches: right padding, labels −100 on padding, images decoded, pre-resized as
//! LLaMA-Factory does and run through the checkpoint's image processor, M-RoPE positions per row.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use crate::data::Sample;
use crate::image::{load_image, resize_bicubic_pil, ImageProcessorConfig};
use crate::models::qwen3_5::{Qwen3_5, VisionInput};
use crate::train::step::MicroBatch;

/// Builds one micro-batch from `samples` (padded with `pad_id` on the right).
pub fn micro_batch(
    model: &Qwen3_5,
    processor: &ImageProcessorConfig,
    samples: &[&Sample],
    pad_id: u32,
) -> Result<MicroBatch> {
    let s = samples.iter().map(|x| x.input_ids.len()).max().unwrap_or(0);
    if s == 0 {
        bail!("empty micro-batch");
    }
    let mut ids = Vec::with_capacity(samples.len() * s);
    let mut labels = Vec::with_capacity(samples.len());
    let mut images = Vec::new();
    let mut positions = Vec::with_capacity(samples.len());
    let mut grids_all = Vec::new();
    for sample in samples {
        let mut row = sample.input_ids.clone();
        row.resize(s, pad_id);
        let mut lab = sample.labels.clone();
        lab.resize(s, -100);
        let mut grids = Vec::new();
        if !sample.images.is_empty() {
            let mut decoded = Vec::with_capacity(sample.images.len());
            for (i, path) in sample.images.iter().enumerate() {
                let img =
                    load_image(path).with_context(|| format!("{} (image {i} of {})", path.display(), sample.source))?;
                let (w, h) = sample.image_sizes.get(i).copied().unwrap_or((img.width(), img.height()));
                decoded.push(if (w, h) == (img.width(), img.height()) {
                    img
                } else {
                    resize_bicubic_pil(&img, h as usize, w as usize)
                });
            }
            let processed = processor.preprocess(&decoded)?;
            if processed.num_tokens != sample.image_tokens {
                bail!(
                    "{}: the images give {:?} image tokens but the sample was encoded with {:?}; was the dataset \
                     checked against another checkpoint?",
                    sample.source,
                    processed.num_tokens,
                    sample.image_tokens
                );
            }
            grids = processed.image_grid_thw.clone();
            images.push(processed);
        }
        positions.push(model.rope_index(&row, &grids)?);
        grids_all.extend(grids);
        ids.extend(row);
        labels.push(lab);
    }
    let pos_refs: Vec<_> = positions.iter().collect();
    let rope = model.rope(&pos_refs)?;
    let vision = if images.is_empty() {
        None
    } else {
        let feat = images[0].feature_dim;
        let pixels: Vec<f32> = images.into_iter().flat_map(|p| p.pixel_values).collect();
        let n = pixels.len() / feat;
        Some(VisionInput { pixel_values: Tensor::from_vec(pixels, (n, feat), &model.device)?, grids: grids_all })
    };
    Ok(MicroBatch {
        input_ids: Tensor::from_vec(ids, (samples.len(), s), &model.device)?,
        labels,
        rope,
        images: vision,
    })
}

/// The sample order of one epoch: a permutation seeded by (seed, epoch), or the file order when shuffling is
/// disabled. Deterministic, so a resumed run sees the same order.
pub fn epoch_order(n: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut idx: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(epoch as u64));
        idx.shuffle(&mut rng);
    }
    idx
}
