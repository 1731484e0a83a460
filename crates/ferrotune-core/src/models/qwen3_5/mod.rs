//! Qwen3.5 (`Qwen3_5ForConditionalGeneration`): the vision tower's embeddings placed at the `<|image_pad|>`
//! positions of the token embeddings, 3-D M-RoPE positions, the hybrid decoder, the final norm and the head
//! (the embedding matrix when tied).

pub mod config;
pub mod delta;
pub mod gdn;
pub mod init;
pub mod text;
pub mod vision;

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

pub use config::{Config, LayerType};
pub use text::{DecoderLayer, LayerCache, Segments, Stored};
pub use vision::VisionModel;

use crate::nn::{Linear, Module, Node, Param};
use crate::weights::{read_config_json, Checkpoint, FrozenFormat, Init, Weights};

/// Images of one forward pass: processor output for all images of the batch, in order of appearance.
#[derive(Clone)]
pub struct VisionInput {
    /// (Σ t·h·w, C·T·P·P)
    pub pixel_values: Tensor,
    /// (t, h, w) per image, in patches.
    pub grids: Vec<[usize; 3]>,
}

/// Positions for the three M-RoPE axes (T, H, W) of one sequence, and `max + 1 − len` (the offset that
/// decoding adds to plain positions after the prompt).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RopePositions {
    pub axes: [Vec<i64>; 3],
    pub delta: i64,
}

/// The caller-owned decoding state: one entry per decoder layer plus the number of tokens seen.
#[derive(Clone, Default)]
pub struct Cache {
    pub layers: Vec<LayerCache>,
    pub seen: usize,
}

impl Cache {
    pub fn new(n_layers: usize) -> Self {
        Self { layers: vec![LayerCache::Empty; n_layers], seen: 0 }
    }

    /// A copy that shares no storage with this one (a clone's key/value cache is written in place by both).
    pub fn fork(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(match l {
                    LayerCache::Attention { k, v, len } => {
                        LayerCache::Attention { k: k.copy()?, v: v.copy()?, len: *len }
                    }
                    LayerCache::DeltaNet { conv, state } => {
                        LayerCache::DeltaNet { conv: conv.copy()?, state: state.copy()? }
                    }
                    LayerCache::Empty => LayerCache::Empty,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers, seen: self.seen })
    }
}

/// The model; the decoder's parts keep the keys under `model.language_model` that the loader gave them.
pub struct Qwen3_5 {
    pub cfg: Config,
    /// `model.language_model.embed_tokens.weight`, (V, D).
    pub embed_tokens: Param,
    pub layers: Vec<DecoderLayer>,
    pub norm: text::RmsNorm1p,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<Linear>,
    pub visual: VisionModel,
    inv_freq: Vec<f32>,
    pub dtype: DType,
    pub device: Device,
}

/// Prefixes that exist in real checkpoints but are not part of the forward pass.
const IGNORED_PREFIXES: &[&str] = &["mtp."];

impl Qwen3_5 {
    /// Loads a checkpoint directory, converting weights to `dtype` (f32 on CPU; the file's dtype otherwise).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_as(dir, dtype, device, FrozenFormat::Compute)
    }

    /// [`Qwen3_5::load`], holding the frozen matrices as `format` says (see [`Weights::frozen_format`]).
    pub fn load_as(dir: &Path, dtype: DType, device: &Device, format: FrozenFormat) -> Result<Self> {
        let json = read_config_json(dir)?;
        let cfg = Config::from_json(&json).with_context(|| format!("checkpoint {}", dir.display()))?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_weights(&Weights::new(&ckpt, dtype, device).frozen_format(format)?, cfg)
    }

    pub fn from_checkpoint(ckpt: &Checkpoint, cfg: Config, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_weights(&Weights::new(ckpt, dtype, device), cfg)
    }

    /// Builds the model from a view of a checkpoint, or of a random init (which draws every tensor in the
    /// order asked for here).
    pub fn from_weights(w: &Weights, cfg: Config) -> Result<Self> {
        let t = &cfg.text;
        let lm = w.pp("model.language_model");
        let embed_tokens =
            lm.frozen("embed_tokens.weight", &[t.vocab_size, t.hidden_size], "vocab_size × hidden_size", Init::Normal)?;
        let layers = t
            .layer_types
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                DecoderLayer::load(&lm.pp("layers").pp(i), t, kind)
                    .with_context(|| format!("decoder layer {i} ({kind:?})"))
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = text::RmsNorm1p::load(&lm.pp("norm"), t.hidden_size, t.rms_norm_eps, "hidden_size")?;
        // A checkpoint with `lm_head.weight` uses it; otherwise the head is the embedding (tied).
        let lm_head = if w.contains("lm_head.weight") {
            Some(Linear::load(&w.pp("lm_head"), t.hidden_size, t.vocab_size, false, "hidden_size × vocab_size")?)
        } else if cfg.tie_word_embeddings {
            None
        } else {
            bail!(
                "{}: no `lm_head.weight` and tie_word_embeddings is false in config.json; the checkpoint is incomplete",
                w.origin()
            )
        };
        let visual = VisionModel::load(&w.pp("model.visual"), &cfg.vision).context("vision tower")?;
        let unused = w.unused(IGNORED_PREFIXES);
        if !unused.is_empty() {
            let shown: Vec<&str> = unused.iter().take(5).map(String::as_str).collect();
            bail!(
                "{}: {} tensors are not part of a qwen3_5 model (e.g. {}); is config.json from another checkpoint?",
                w.origin(),
                unused.len(),
                shown.join(", ")
            );
        }
        let inv_freq = text::text_inv_freq(t);
        Ok(Self {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            visual,
            inv_freq,
            dtype: w.dtype,
            device: w.device.clone(),
        })
    }

    /// Every linear of the model with its checkpoint module path, in checkpoint order: decoder layers, then the
    /// vision blocks and the merger, then `lm_head` when untied.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        crate::nn::linears(self).into_iter().map(|l| (l.path.to_string(), l)).collect()
    }

    /// Every parameter of the model with its checkpoint name and storage form, in checkpoint order.
    pub fn params_mut(&mut self) -> Vec<(String, &mut Tensor, Stored)> {
        crate::nn::params(self)
            .into_iter()
            .map(|Param { path, tensor, stored, .. }| (path.to_string(), tensor, stored.clone()))
            .collect()
    }

    /// The checkpoint tensors of the current weights (LoRA branches not included), in `dtype`, on the CPU
    /// (A_log stays f32 as reference checkpoints keep it).
    pub fn state_dict(&mut self, dtype: DType) -> Result<std::collections::HashMap<String, Tensor>> {
        Ok(crate::nn::state_dict(self, dtype)?)
    }

    /// See [`crate::nn::make_trainable`].
    pub fn make_trainable(&mut self, trained: impl Fn(&str) -> bool) -> Result<Vec<(String, candle_core::Var, bool)>> {
        Ok(crate::nn::make_trainable(self, trained)?)
    }

    /// The linears LoRA may target: the decoder's, plus the vision tower's / merger's when they are not
    /// frozen. Never `lm_head` (PEFT and LLaMA-Factory exclude it from `all`).
    pub fn lora_candidates(&mut self, vision_tower: bool, projector: bool) -> Vec<(String, &mut Linear)> {
        self.linears_mut()
            .into_iter()
            .filter(|(p, _)| {
                if p.starts_with("model.visual.merger") {
                    projector
                } else if p.starts_with("model.visual.") {
                    vision_tower
                } else {
                    p != "lm_head"
                }
            })
            .collect()
    }

    /// The head matrix (V, D).
    pub fn head(&self) -> &Param {
        self.lm_head.as_ref().map_or(&self.embed_tokens, |l| &l.weight)
    }

    /// 3-D positions of one sequence (transformers' `get_rope_index`): text advances all three axes by one;
    /// an image of grid (t, h, w) occupies (h/m)·(w/m) positions at (start, start+row, start+col) and moves
    /// the next start by max(h, w)/m.
    pub fn rope_index(&self, ids: &[u32], image_grids: &[[usize; 3]]) -> Result<RopePositions> {
        rope_index(
            ids,
            image_grids,
            self.cfg.image_token_id,
            self.cfg.video_token_id,
            self.cfg.vision.spatial_merge_size,
        )
    }

    /// cos/sin (B, 1, rot) of one new position per sequence: row i at plain position `positions[i]` (text
    /// advances all three M-RoPE axes together).
    pub fn rope_rows(&self, positions: &[i64]) -> Result<(Tensor, Tensor)> {
        let axes: [Vec<Vec<i64>>; 3] = std::array::from_fn(|_| positions.iter().map(|&p| vec![p]).collect());
        Ok(text::mrope_cos_sin(&self.inv_freq, &self.cfg.text.mrope_section, &axes, &self.device)?)
    }

    /// cos/sin for a batch of position sets (all of the same length).
    pub fn rope(&self, positions: &[&RopePositions]) -> Result<(Tensor, Tensor)> {
        let axes: [Vec<Vec<i64>>; 3] =
            std::array::from_fn(|a| positions.iter().map(|p| p.axes[a].clone()).collect::<Vec<_>>());
        Ok(text::mrope_cos_sin(&self.inv_freq, &self.cfg.text.mrope_section, &axes, &self.device)?)
    }

    /// cos/sin for `n` decode positions continuing after `seen` tokens with the given rope delta, B rows.
    pub fn rope_continue(&self, batch: usize, seen: usize, n: usize, delta: i64) -> Result<(Tensor, Tensor)> {
        let row: Vec<i64> = (0..n).map(|i| (seen + i) as i64 + delta).collect();
        let axes: [Vec<Vec<i64>>; 3] = std::array::from_fn(|_| vec![row.clone(); batch]);
        Ok(text::mrope_cos_sin(&self.inv_freq, &self.cfg.text.mrope_section, &axes, &self.device)?)
    }

    /// Image embeddings (Σ tokens, D) from the vision tower.
    pub fn image_features(&self, images: &VisionInput) -> Result<Tensor> {
        Ok(self.visual.forward(&images.pixel_values, &images.grids)?)
    }

    /// Token embeddings (B, S, D) with image features written over the `<|image_pad|>` rows, in order.
    pub fn embed(&self, input_ids: &Tensor, image_features: Option<&Tensor>) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let flat = input_ids.flatten_all()?;
        // A table kept in 16 bits widens exactly to the compute dtype; an int8 one dequantizes its rows.
        let rows = self.embed_tokens.index_select(&flat, 0)?;
        let text = match &self.embed_tokens.scales {
            None => rows.to_dtype(self.dtype)?,
            Some(s) => (rows.to_dtype(DType::F32)? - 128.0)?
                .broadcast_mul(&s.index_select(&flat, 0)?.unsqueeze(1)?)?
                .to_dtype(self.dtype)?,
        }; // (B·S, D)
        let emb = match image_features {
            None => text,
            Some(feats) => {
                let ids: Vec<u32> = flat.to_vec1()?;
                let n_pad = ids.iter().filter(|&&t| t == self.cfg.image_token_id).count();
                let n_feat = feats.dim(0)?;
                if n_pad != n_feat {
                    bail!(
                        "image features and image tokens do not match: {n_pad} <|image_pad|> tokens, {n_feat} features"
                    );
                }
                // Rows of [text; features] picked per position: a gather keeps gradients flowing to both.
                let mut next = 0u32;
                let pick: Vec<u32> = ids
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| {
                        if t == self.cfg.image_token_id {
                            next += 1;
                            (b * s) as u32 + next - 1
                        } else {
                            i as u32
                        }
                    })
                    .collect();
                let all = Tensor::cat(&[&text, &feats.to_dtype(text.dtype())?], 0)?;
                all.index_select(&Tensor::from_vec(pick, b * s, &self.device)?, 0)?
            }
        };
        Ok(emb.reshape((b, s, self.cfg.text.hidden_size))?)
    }

    /// Runs the decoder on embeddings. Returns the final-normed hidden states (B, S, D) and, when `collect`,
    /// the output of every decoder layer.
    pub fn decode(
        &self,
        embeds: &Tensor,
        rope: &(Tensor, Tensor),
        mut cache: Option<&mut Cache>,
        collect: bool,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = embeds.clone();
        let mut hidden = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let c = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, rope, c, false, None)?;
            if collect {
                hidden.push(x.clone());
            }
        }
        if let Some(c) = cache {
            c.seen += embeds.dim(1)?;
        }
        Ok((self.norm.forward(&x)?, hidden))
    }

    /// One decoding step of several sequences: row i of `embeds` (B, 1, D) continues `caches[i]` at the positions
    /// of `rope` (B, 1, rot). Returns the final-normed hidden states (B, 1, D); each row's numbers are those it
    /// would have alone.
    pub fn decode_rows(&self, embeds: &Tensor, rope: &(Tensor, Tensor), caches: &mut [&mut Cache]) -> Result<Tensor> {
        if embeds.dim(0)? != caches.len() {
            bail!("decode_rows: {} rows of embeddings for {} caches", embeds.dim(0)?, caches.len());
        }
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let mut lc: Vec<&mut LayerCache> = caches.iter_mut().map(|c| &mut c.layers[i]).collect();
            x = layer.forward_rows(&x, rope, &mut lc)?;
        }
        for c in caches.iter_mut() {
            c.seen += 1;
        }
        Ok(self.norm.forward(&x)?)
    }

    /// Logits (.., V) of final hidden states (.., D).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(text::lm_logits(hidden, self.head())?)
    }

    /// One whole forward pass of a single sequence without cache: final hidden states and per-layer outputs.
    pub fn forward_sequence(
        &self,
        ids: &[u32],
        images: Option<&VisionInput>,
        collect: bool,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let grids: &[[usize; 3]] = images.map_or(&[], |v| &v.grids);
        let pos = self.rope_index(ids, grids)?;
        let rope = self.rope(&[&pos])?;
        let feats = images.map(|v| self.image_features(v)).transpose()?;
        let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &self.device)?;
        let emb = self.embed(&input, feats.as_ref())?;
        self.decode(&emb, &rope, None, collect)
    }
}

impl Module for Qwen3_5 {
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        self.embed_tokens.visit_mut(f);
        self.layers.visit_mut(f);
        self.norm.visit_mut(f);
        self.visual.visit_mut(f);
        self.lm_head.visit_mut(f);
    }
}

/// See [`Qwen3_5::rope_index`].
pub fn rope_index(
    ids: &[u32],
    image_grids: &[[usize; 3]],
    image_token: u32,
    video_token: u32,
    merge: usize,
) -> Result<RopePositions> {
    let mut axes: [Vec<i64>; 3] = Default::default();
    let mut cur: i64 = 0;
    let mut grids = image_grids.iter();
    let mut i = 0;
    while i < ids.len() {
        let t = ids[i];
        if t == video_token {
            bail!("video inputs are not supported yet (found <|video_pad|> at position {i})");
        }
        if t != image_token {
            for a in &mut axes {
                a.push(cur);
            }
            cur += 1;
            i += 1;
            continue;
        }
        let run = ids[i..].iter().take_while(|&&x| x == image_token).count();
        let &[gt, gh, gw] = grids.next().with_context(|| {
            format!(
                "more <|image_pad|> runs than images: a run starts at position {i} but only {} grids were given",
                image_grids.len()
            )
        })?;
        let (lh, lw) = (gh / merge, gw / merge);
        let need = gt * lh * lw;
        if run < need {
            bail!("the image at position {i} needs {need} <|image_pad|> tokens, found {run}");
        }
        for ti in 0..gt {
            for hi in 0..lh {
                for wi in 0..lw {
                    axes[0].push(cur + ti as i64);
                    axes[1].push(cur + hi as i64);
                    axes[2].push(cur + wi as i64);
                }
            }
        }
        cur += (gh.max(gw) / merge) as i64;
        i += need;
    }
    if grids.next().is_some() {
        bail!("{} images given but fewer <|image_pad|> runs in the sequence", image_grids.len());
    }
    let max = axes.iter().flat_map(|a| a.iter().copied()).max().unwrap_or(-1);
    Ok(RopePositions { delta: max + 1 - ids.len() as i64, axes })
}
