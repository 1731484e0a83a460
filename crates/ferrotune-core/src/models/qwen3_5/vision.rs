//! The Qwen3.5 vision tower (shared with Qwen3-VL): Conv3d patch embedding as a matmul, a learned position
//! table bilinearly interpolated to each image's grid, 2-D rotary, pre-norm ViT blocks with per-image
//! attention, and the 2×2 patch merger that projects into the text model's width.
//!
//! Patches arrive in the image processor's "merge block" order (block row, block col, in-block row, in-block
//! col); position embeddings and rotary positions are produced in the same order, and the merger relies on
//! every 4 consecutive rows forming one 2×2 block.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::config::VisionConfig;
use crate::nn::{ops, Linear, Module, Node, Param};
use crate::weights::{Init, Weights};

#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Param,
    pub bias: Param,
}

impl LayerNorm {
    fn load(w: &Weights, dim: usize, why: &str) -> Result<Self> {
        Ok(Self {
            weight: w.param("weight", &[dim], why, Init::Const(1.0))?,
            bias: w.param("bias", &[dim], why, Init::Const(0.0))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, 1e-6)
    }
}

impl Module for LayerNorm {
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        self.weight.visit_mut(f);
        self.bias.visit_mut(f);
    }
}

/// The Conv3d patch embedding (`patch_embed.proj`), applied as a linear over flattened patches.
#[derive(Clone)]
pub struct PatchEmbed {
    /// Kernel flattened to (hidden, C·T·P·P); the checkpoint holds it as (hidden, C, T, P, P).
    pub proj: Linear,
}

impl PatchEmbed {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let (c, t, p) = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size);
        let w = w.pp("proj");
        let why = "vision hidden_size × in_channels × temporal_patch_size × patch_size²";
        let kernel = w.param("weight", &[d, c, t, p, p], why, Init::Normal)?.reshaped(&[d, c * t * p * p])?;
        let bias = w.param("bias", &[d], "vision hidden_size", Init::Const(0.0))?;
        Ok(Self { proj: Linear::new(w.prefix(), kernel, Some(bias)) })
    }
}

impl Module for PatchEmbed {
    // Parameters only: a convolution is not a module LoRA targets (PEFT's linear targets exclude it).
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        let Linear { weight, bias, .. } = &mut self.proj;
        weight.visit_mut(f);
        bias.visit_mut(f);
    }
}

#[derive(Clone)]
pub struct VisionAttention {
    pub qkv: Linear,
    pub proj: Linear,
    heads: usize,
}

impl VisionAttention {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            qkv: Linear::load(&w.pp("qkv"), d, 3 * d, true, "vision hidden_size × 3·hidden_size")?,
            proj: Linear::load(&w.pp("proj"), d, d, true, "vision hidden_size")?,
            heads: cfg.num_heads,
        })
    }

    /// x: (N, d) normed patches of all images; attention never crosses the `spans`.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, spans: &[(usize, usize)]) -> candle_core::Result<Tensor> {
        let (n, d) = x.dims2()?;
        let (h, hd) = (self.heads, d / self.heads);
        let qkv = self.qkv.forward(x)?.reshape((n, 3, h, hd))?;
        if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
            // On the CPU each image's rotary embedding and attention are one op (forward and backward).
            let part = |i: usize| qkv.narrow(1, i, 1)?.squeeze(1);
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let scale = 1.0 / (hd as f64).sqrt();
            let mut outs = Vec::with_capacity(spans.len());
            for &(start, len) in spans {
                let pick = |t: &Tensor| t.narrow(0, start, len)?.unsqueeze(0);
                let (c, s) = (pick(cos)?, pick(sin)?);
                match crate::nn::attention::attention(&pick(&q)?, &pick(&k)?, &pick(&v)?, &c, &s, scale, false)? {
                    Some(o) => outs.push(o.squeeze(0)?),
                    None => {
                        outs.clear();
                        break;
                    }
                }
            }
            if !spans.is_empty() && outs.len() == spans.len() {
                return self.proj.forward(&Tensor::cat(&outs, 0)?);
            }
        }
        // (N, H, hd) each; rotary over the whole head dim, in f32.
        let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
        let q = ops::apply_rope_f32(&qkv.narrow(1, 0, 1)?.squeeze(1)?, &cos, &sin)?;
        let k = ops::apply_rope_f32(&qkv.narrow(1, 1, 1)?.squeeze(1)?, &cos, &sin)?;
        let v = qkv.narrow(1, 2, 1)?.squeeze(1)?;
        // Attention never crosses images: one block-diagonal piece per span. (N, H, hd) -> (1, H, len, hd).
        let mut outs = Vec::with_capacity(spans.len());
        for &(start, len) in spans {
            let pick =
                |t: &Tensor| -> candle_core::Result<Tensor> { t.narrow(0, start, len)?.transpose(0, 1)?.unsqueeze(0) };
            let o = ops::attention(&pick(&q)?, &pick(&k)?, &pick(&v)?, 1.0 / (hd as f64).sqrt(), None)?;
            outs.push(o.squeeze(0)?.transpose(0, 1)?.reshape((len, d))?);
        }
        let o = Tensor::cat(&outs, 0)?;
        self.proj.forward(&o)
    }
}

impl Module for VisionAttention {
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        self.qkv.visit_mut(f);
        self.proj.visit_mut(f);
    }
}

#[derive(Clone)]
pub struct VisionMlp {
    pub linear_fc1: Linear,
    pub linear_fc2: Linear,
    act: String,
    /// The tanh GELU vectorised ([`crate::nn::fused::gelu_tanh_fast`]) where nothing differentiates; off unless
    /// [`VisionModel::fast_gelu`] turns it on (serving), so that training's numbers stay candle's.
    fast: bool,
}

impl VisionMlp {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            linear_fc1: Linear::load(&w.pp("linear_fc1"), d, f, true, "vision hidden_size × intermediate_size")?,
            linear_fc2: Linear::load(&w.pp("linear_fc2"), f, d, true, "vision intermediate_size × hidden_size")?,
            act: cfg.hidden_act.clone(),
            fast: false,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.linear_fc1.forward(x)?;
        let tanh_form = matches!(self.act.as_str(), "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast");
        let a = if self.fast && tanh_form {
            crate::nn::fused::gelu_tanh_fast(&h)?
        } else {
            ops::activation(&h, &self.act)?
        };
        self.linear_fc2.forward(&a)
    }
}

impl Module for VisionMlp {
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        self.linear_fc1.visit_mut(f);
        self.linear_fc2.visit_mut(f);
    }
}

#[derive(Clone)]
pub struct VisionBlock {
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub attn: VisionAttention,
    pub mlp: VisionMlp,
}

impl VisionBlock {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            norm1: LayerNorm::load(&w.pp("norm1"), d, "vision hidden_size")?,
            norm2: LayerNorm::load(&w.pp("norm2"), d, "vision hidden_size")?,
            attn: VisionAttention::load(&w.pp("attn"), cfg)?,
            mlp: VisionMlp::load(&w.pp("mlp"), cfg)?,
        })
    }

    /// x: (N, d) patches of all images; `spans`: (start, len) of each image (or video frame) in x.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, spans: &[(usize, usize)]) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?, cos, sin, spans)?)?;
        let m = self.mlp.forward(&self.norm2.forward(&x)?)?;
        x + m
    }
}

impl Module for VisionBlock {
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        self.norm1.visit_mut(f);
        self.norm2.visit_mut(f);
        self.attn.visit_mut(f);
        self.mlp.visit_mut(f);
    }
}

/// The 2×2 patch merger: LayerNorm, then concatenated 2×2 blocks through a GELU MLP into the text width.
#[derive(Clone)]
pub struct Merger {
    pub norm: LayerNorm,
    pub linear_fc1: Linear,
    pub linear_fc2: Linear,
    /// Rows merged into one (merge_size²) and the vision width.
    unit: usize,
    hidden: usize,
}

impl Merger {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let unit = cfg.spatial_merge_size * cfg.spatial_merge_size;
        let m = unit * d;
        let why = "merge_size²·hidden × out_hidden_size";
        Ok(Self {
            norm: LayerNorm::load(&w.pp("norm"), d, "vision hidden_size")?,
            linear_fc1: Linear::load(&w.pp("linear_fc1"), m, m, true, "merge_size²·hidden × same")?,
            linear_fc2: Linear::load(&w.pp("linear_fc2"), m, cfg.out_hidden_size, true, why)?,
            unit,
            hidden: d,
        })
    }

    /// x: (N, d) in merge-block order -> (N / merge², out_hidden_size).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        let y = self.norm.forward(x)?.reshape((n / self.unit, self.unit * self.hidden))?;
        self.linear_fc2.forward(&ops::gelu_erf(&self.linear_fc1.forward(&y)?)?)
    }
}

impl Module for Merger {
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        self.norm.visit_mut(f);
        self.linear_fc1.visit_mut(f);
        self.linear_fc2.visit_mut(f);
    }
}

#[derive(Clone)]
pub struct VisionModel {
    pub patch_embed: PatchEmbed,
    /// The learned position table (`pos_embed.weight`), (num_position_embeddings, hidden).
    pub pos_embed: Param,
    pub blocks: Vec<VisionBlock>,
    pub merger: Merger,
    cfg: VisionConfig,
}

impl VisionModel {
    /// The MLPs' tanh GELU vectorised where nothing differentiates (within 2.4e-7 of candle's libm tanhf, which
    /// takes two thirds of the tower's time): for serving and generation; training keeps candle's, whose numbers
    /// the parity tests pin.
    pub fn fast_gelu(&mut self, on: bool) {
        for b in &mut self.blocks {
            b.mlp.fast = on;
        }
    }

    pub fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let why = "num_position_embeddings × hidden";
        let shape = [cfg.num_position_embeddings, cfg.hidden_size];
        Ok(Self {
            patch_embed: PatchEmbed::load(&w.pp("patch_embed"), cfg)?,
            pos_embed: w.param("pos_embed.weight", &shape, why, Init::Normal)?,
            blocks: (0..cfg.depth)
                .map(|i| VisionBlock::load(&w.pp("blocks").pp(i), cfg))
                .collect::<Result<Vec<_>>>()?,
            merger: Merger::load(&w.pp("merger"), cfg)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// pixel_values: (N, C·T·P·P) in processor order; grids: (t, h, w) per image in patches.
    /// Returns the merged embeddings (N / merge², out_hidden_size).
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> candle_core::Result<Tensor> {
        let dev = pixel_values.device();
        let dtype = self.pos_embed.dtype();
        let x = self.patch_embed.proj.forward(&pixel_values.to_dtype(dtype)?)?;
        let x = (x + self.interpolated_pos_embed(grids, dev)?)?;
        let (cos, sin) = self.rotary(grids, dev)?;
        let mut spans = Vec::new();
        let mut start = 0;
        for &[t, h, w] in grids {
            for _ in 0..t {
                spans.push((start, h * w));
                start += h * w;
            }
        }
        let mut x = x;
        for blk in &self.blocks {
            x = blk.forward(&x, &cos, &sin, &spans)?;
        }
        self.merger.forward(&x)
    }

    /// (row, col) of each patch in merge-block order, for every frame.
    fn block_order(grids: &[[usize; 3]], merge: usize) -> Vec<(usize, usize, usize, usize)> {
        let mut out = Vec::new();
        for &[t, h, w] in grids {
            for _ in 0..t {
                for br in 0..h / merge {
                    for bc in 0..w / merge {
                        for ir in 0..merge {
                            for ic in 0..merge {
                                out.push((br * merge + ir, bc * merge + ic, h, w));
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Bilinear (align_corners) interpolation of the learned square table to each grid, as a weighted
    /// gather of four rows per patch. Weights are computed in f32 like `torch.linspace`.
    fn interpolated_pos_embed(&self, grids: &[[usize; 3]], dev: &Device) -> candle_core::Result<Tensor> {
        let side = (self.cfg.num_position_embeddings as f64).sqrt() as usize;
        let order = Self::block_order(grids, self.cfg.spatial_merge_size);
        let mut idx: [Vec<u32>; 4] = Default::default();
        let mut wts: [Vec<f32>; 4] = Default::default();
        for &(r, c, h, w) in &order {
            let (fr, fc) = (linspace_at(side, h, r), linspace_at(side, w, c));
            let (r0, c0) = (fr as usize, fc as usize);
            let (r1, c1) = ((r0 + 1).min(side - 1), (c0 + 1).min(side - 1));
            let (dr, dc) = (fr - r0 as f32, fc - c0 as f32);
            let cells = [(r0, c0), (r0, c1), (r1, c0), (r1, c1)];
            let weights = [(1.0 - dr) * (1.0 - dc), (1.0 - dr) * dc, dr * (1.0 - dc), dr * dc];
            for q in 0..4 {
                idx[q].push((cells[q].0 * side + cells[q].1) as u32);
                wts[q].push(weights[q]);
            }
        }
        let n = order.len();
        let dtype = self.pos_embed.dtype();
        let mut acc: Option<Tensor> = None;
        for q in 0..4 {
            let rows = self.pos_embed.index_select(&Tensor::from_vec(idx[q].clone(), n, dev)?, 0)?;
            let w = Tensor::from_vec(wts[q].clone(), (n, 1), dev)?.to_dtype(dtype)?;
            let term = rows.broadcast_mul(&w)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        Ok(acc.expect("four terms"))
    }

    /// 2-D rotary cos/sin, (N, head_dim): [rows·f, cols·f] repeated twice, f = 1/10000^(2i/(head_dim/2)).
    fn rotary(&self, grids: &[[usize; 3]], dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let hd = self.cfg.hidden_size / self.cfg.num_heads;
        let dim = hd / 2;
        let inv: Vec<f32> = (0..dim / 2).map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / dim as f32)).collect();
        let order = Self::block_order(grids, self.cfg.spatial_merge_size);
        let mut cos = Vec::with_capacity(order.len() * hd);
        let mut sin = Vec::with_capacity(order.len() * hd);
        for &(r, c, _, _) in &order {
            let f: Vec<f32> = inv.iter().map(|x| r as f32 * x).chain(inv.iter().map(|x| c as f32 * x)).collect();
            for _ in 0..2 {
                cos.extend(f.iter().map(|x| x.cos()));
                sin.extend(f.iter().map(|x| x.sin()));
            }
        }
        let n = order.len();
        Ok((Tensor::from_vec(cos, (n, hd), dev)?, Tensor::from_vec(sin, (n, hd), dev)?))
    }

    pub fn dtype(&self) -> DType {
        self.pos_embed.dtype()
    }
}

impl Module for VisionModel {
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        self.patch_embed.visit_mut(f);
        self.pos_embed.visit_mut(f);
        self.blocks.visit_mut(f);
        self.merger.visit_mut(f);
    }
}

/// `torch.linspace(0, side - 1, steps)[i]` in f32 (torch fills the second half from the end).
fn linspace_at(side: usize, steps: usize, i: usize) -> f32 {
    if steps == 1 {
        return 0.0;
    }
    let end = (side - 1) as f32;
    let step = end / (steps - 1) as f32;
    if i < steps / 2 {
        step * i as f32
    } else {
        end - step * (steps - 1 - i) as f32
    }
}
