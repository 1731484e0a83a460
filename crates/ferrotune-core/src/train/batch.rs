//! Samples to micro-batches: right padding, labels −100 on padding, images decoded, pre-resized as
//! LLaMA-Factory does and run through the checkpoint's image processor, M-RoPE positions per row.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use crate::data::{RowRef, Sample};
use crate::image::{ImageProcessorConfig, ProcessedImages};
use crate::models::qwen3_5::{Qwen3_5, RopePositions, Segments, VisionInput};

/// Token ids, labels and images of one micro-batch (right-padded; labels −100 where not trained).
pub struct MicroBatch {
    /// (B, S) u32
    pub input_ids: Tensor,
    /// Unshifted labels per row, −100 on prompt and padding.
    pub labels: Vec<Vec<i64>>,
    /// M-RoPE cos/sin (B, S, rot).
    pub rope: (Tensor, Tensor),
    pub images: Option<VisionInput>,
    /// The images' features from a frozen vision tower, computed earlier (used instead of `images`).
    pub image_features: Option<Tensor>,
    /// Rows of `neat_packing`: where their samples start and end.
    pub segments: Option<Segments>,
}

/// Image features of a frozen vision tower, computed once per training sample and reused every epoch: the
/// tower has no dropout and nothing in it trains, so its output for a picture never changes.
pub struct FeatureCache {
    budget: usize,
    inner: Mutex<(usize, HashMap<RowRef, Features>)>,
}

/// A sample's image features (Σ tokens, D) and the grids they were computed on.
#[derive(Clone)]
struct Features {
    tensor: Tensor,
    grids: Vec<[usize; 3]>,
}

impl FeatureCache {
    /// A cache that keeps at most `budget` bytes of features (samples beyond it are recomputed each time).
    pub fn new(budget: usize) -> FeatureCache {
        FeatureCache { budget, inner: Mutex::new((0, HashMap::new())) }
    }

    fn get(&self, key: &RowRef) -> Option<Features> {
        self.inner.lock().ok()?.1.get(key).cloned()
    }

    fn put(&self, key: &RowRef, f: &Features) {
        let bytes = f.tensor.elem_count() * f.tensor.dtype().size_in_bytes();
        if let Ok(mut g) = self.inner.lock() {
            if g.0 + bytes <= self.budget && !g.1.contains_key(key) {
                g.0 += bytes;
                g.1.insert(key.clone(), f.clone());
            }
        }
    }
}

/// The pictures of one sample, decoded, pre-resized exactly as LLaMA-Factory does and run through the image
/// processor.
pub(crate) fn sample_pixels(processor: &ImageProcessorConfig, sample: &Sample) -> Result<ProcessedImages> {
    let processed = processor.preprocess_files(&sample.images, &sample.image_sizes, &sample.source)?;
    if processed.num_tokens != sample.image_tokens {
        bail!(
            "{}: the images give {:?} image tokens but the sample was encoded with {:?}; was the dataset checked \
             against another checkpoint?",
            sample.source,
            processed.num_tokens,
            sample.image_tokens
        );
    }
    Ok(processed)
}

/// The vision tower's input for processed pictures, on `device`.
pub(crate) fn vision_input(p: ProcessedImages, device: &candle_core::Device) -> Result<VisionInput> {
    let n = p.num_patches();
    Ok(VisionInput {
        pixel_values: Tensor::from_vec(p.pixel_values, (n, p.feature_dim), device)?,
        grids: p.image_grid_thw,
    })
}

/// Builds one micro-batch from `samples` (padded with `pad_id` on the right). With a cache, the images of each
/// sample go through the (frozen) vision tower once and the micro-batch carries their features.
pub fn micro_batch(
    model: &Qwen3_5,
    processor: &ImageProcessorConfig,
    samples: &[&Sample],
    pad_id: u32,
    cache: Option<&FeatureCache>,
) -> Result<MicroBatch> {
    let s = samples.iter().map(|x| x.input_ids.len()).max().unwrap_or(0);
    if s == 0 {
        bail!("empty micro-batch");
    }
    let mut ids = Vec::with_capacity(samples.len() * s);
    let mut labels = Vec::with_capacity(samples.len());
    let mut pixels = Vec::new();
    let mut features = Vec::new();
    let mut positions = Vec::with_capacity(samples.len());
    let mut grids_all = Vec::new();
    for sample in samples {
        let mut row = sample.input_ids.clone();
        row.resize(s, pad_id);
        let mut lab = sample.labels.clone();
        lab.resize(s, -100);
        let mut grids = Vec::new();
        if !sample.images.is_empty() {
            match cache {
                Some(c) => {
                    let f = match c.get(&sample.source) {
                        Some(f) => f,
                        None => {
                            let input = vision_input(sample_pixels(processor, sample)?, &model.device)?;
                            let f = Features { tensor: model.image_features(&input)?.detach(), grids: input.grids };
                            c.put(&sample.source, &f);
                            f
                        }
                    };
                    grids = f.grids;
                    features.push(f.tensor);
                }
                None => {
                    let p = sample_pixels(processor, sample)?;
                    grids = p.image_grid_thw.clone();
                    pixels.push(p);
                }
            }
        }
        positions.push(if sample.segments.is_empty() {
            model.rope_index(&row, &grids)?
        } else {
            packed_positions(model, &row, &sample.segments, &grids)?
        });
        grids_all.extend(grids);
        ids.extend(row);
        labels.push(lab);
    }
    let pos_refs: Vec<_> = positions.iter().collect();
    let rope = model.rope(&pos_refs)?;
    let images = if pixels.is_empty() {
        None
    } else {
        let feat = pixels[0].feature_dim;
        let values: Vec<f32> = pixels.into_iter().flat_map(|p| p.pixel_values).collect();
        let n = values.len() / feat;
        Some(VisionInput { pixel_values: Tensor::from_vec(values, (n, feat), &model.device)?, grids: grids_all })
    };
    let image_features = match features.len() {
        0 => None,
        1 => features.pop(),
        _ => Some(Tensor::cat(&features, 0)?),
    };
    let segments = if samples.iter().any(|x| !x.segments.is_empty()) {
        let rows = samples.iter().map(|x| x.segments.clone()).collect();
        Some(Segments::new(rows, s, &model.device)?)
    } else {
        None
    };
    Ok(MicroBatch {
        input_ids: Tensor::from_vec(ids, (samples.len(), s), &model.device)?,
        labels,
        rope,
        images,
        image_features,
        segments,
    })
}

/// M-RoPE positions of a neat-packed row: each sample's positions start at 0 (with its own images), the
/// padding after them continues from the last sample.
fn packed_positions(model: &Qwen3_5, row: &[u32], segments: &[usize], grids: &[[usize; 3]]) -> Result<RopePositions> {
    let image = model.cfg.image_token_id;
    let mut axes: [Vec<i64>; 3] = Default::default();
    let (mut start, mut next_grid) = (0, 0);
    let mut last_max = -1;
    for &n in segments {
        let ids = row.get(start..start + n).context("packed segments are longer than the row")?;
        // One grid per run of image tokens.
        let runs = ids.iter().enumerate().filter(|&(i, &t)| t == image && (i == 0 || ids[i - 1] != image)).count();
        let g = grids.get(next_grid..next_grid + runs).context("a packed row has fewer image grids than images")?;
        let p = model.rope_index(ids, g)?;
        last_max = p.delta + n as i64 - 1; // delta = max + 1 − len

        for (dst, src) in axes.iter_mut().zip(p.axes) {
            dst.extend(src);
        }
        start += n;
        next_grid += runs;
    }
    for a in axes.iter_mut() {
        a.extend((0..(row.len() - start) as i64).map(|i| last_max + 1 + i));
    }
    Ok(RopePositions { delta: 0, axes })
}

/// Label tokens of a sample after the causal shift: what its mean loss averages over.
pub fn label_tokens(sample: &Sample) -> usize {
    sample.labels.iter().skip(1).filter(|&&l| l != -100).count()
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
