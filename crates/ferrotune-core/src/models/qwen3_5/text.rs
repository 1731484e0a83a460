//! The Qwen3.5 text decoder: gated full attention and Gated-DeltaNet layers (picked from `layer_types`),
//! SwiGLU MLP, zero-centred RMSNorms, interleaved M-RoPE on a partial rotary dim.
//!
//! Reference: transformers `models/qwen3_5/modeling_qwen3_5.py` (5.5.4); shapes in the comments use
//! B batch, S new tokens, T cached + new tokens, H/KV query/key heads, hd head dim, Hk/Hv delta-rule heads.

use anyhow::Result;
use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::config::{LayerType, TextConfig};
use super::gdn;
pub use crate::nn::Stored;
use crate::nn::{ops, Linear, Module, Node, Param};
use crate::weights::{Init, Weights};

/// A zero-centred RMSNorm.
#[derive(Clone)]
pub struct RmsNorm1p {
    /// `1 + w` in f32 ([`Stored::OnePlus`]); the checkpoint holds `w` (zero at init).
    pub weight: Param,
    pub eps: f64,
}

impl RmsNorm1p {
    pub fn load(w: &Weights, dim: usize, eps: f64, why: &str) -> Result<Self> {
        let weight = w.param_as("weight", &[dim], why, Init::Const(0.0), DType::F32)?.one_plus()?;
        Ok(Self { weight, eps })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::rms_norm_1p(x, &self.weight, self.eps)
    }
}

impl Module for RmsNorm1p {
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        self.weight.visit_mut(f);
    }
}

#[derive(Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    act: String,
}

impl Mlp {
    fn load(w: &Weights, cfg: &TextConfig) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let why = "hidden_size × intermediate_size";
        Ok(Self {
            gate_proj: Linear::load(&w.pp("gate_proj"), d, f, false, why)?,
            up_proj: Linear::load(&w.pp("up_proj"), d, f, false, why)?,
            down_proj: Linear::load(&w.pp("down_proj"), f, d, false, why)?,
            act: cfg.hidden_act.clone(),
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let g = self.gate_proj.forward_t(x, train)?;
        let u = self.up_proj.forward_t(x, train)?;
        let h = if matches!(self.act.as_str(), "silu" | "swish") {
            crate::nn::fused::swiglu(&g, &u)?
        } else {
            (ops::activation(&g, &self.act)? * u)?
        };
        self.down_proj.forward_t(&h, train)
    }
}

impl Module for Mlp {
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        self.gate_proj.visit_mut(f);
        self.up_proj.visit_mut(f);
        self.down_proj.visit_mut(f);
    }
}

/// Per-layer decoding state, owned by the caller.
#[derive(Clone, Default)]
pub enum LayerCache {
    /// Keys and values after k_norm and RoPE, (B, KV, capacity, hd), of which the first `len` positions are
    /// filled: later tokens are written in place (a clone of the cache shares them), and the capacity grows in
    /// blocks, so that decoding does not copy the whole cache at every token.
    Attention { k: Tensor, v: Tensor, len: usize },
    /// Last K−1 pre-conv rows (B, K−1, conv_dim) and the delta-rule state (B·Hv, dk, dv) in f32.
    DeltaNet { conv: Tensor, state: Tensor },
    #[default]
    Empty,
}

/// Positions an attention layer's decoding cache grows by (at least).
const KV_BLOCK: usize = 256;

#[derive(Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: RmsNorm1p,
    pub k_norm: RmsNorm1p,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &Weights, cfg: &TextConfig) -> Result<Self> {
        let (d, h, kv, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let b = cfg.attention_bias;
        Ok(Self {
            q_proj: Linear::load(&w.pp("q_proj"), d, h * hd * 2, b, "hidden_size × heads·head_dim·2 (query + gate)")?,
            k_proj: Linear::load(&w.pp("k_proj"), d, kv * hd, b, "hidden_size × kv_heads·head_dim")?,
            v_proj: Linear::load(&w.pp("v_proj"), d, kv * hd, b, "hidden_size × kv_heads·head_dim")?,
            o_proj: Linear::load(&w.pp("o_proj"), h * hd, d, b, "heads·head_dim × hidden_size")?,
            q_norm: RmsNorm1p::load(&w.pp("q_norm"), hd, cfg.rms_norm_eps, "head_dim")?,
            k_norm: RmsNorm1p::load(&w.pp("k_norm"), hd, cfg.rms_norm_eps, "head_dim")?,
            heads: h,
            kv_heads: kv,
            head_dim: hd,
        })
    }

    /// x: (B, S, D); cos/sin: (B, S, rot). With a cache the new keys/values are appended to it.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut LayerCache>,
        train: bool,
        segments: Option<&Segments>,
    ) -> candle_core::Result<Tensor> {
        let hd = self.head_dim;
        let (q, gate, k, v) = self.project(x, train)?;
        let fresh = matches!(cache.as_deref(), None | Some(LayerCache::Empty));
        if fresh && segments.is_none() {
            // Steps 3 to 5 as one op on the CPU (forward and backward); a prompt's first chunk then fills the
            // cache with its rotated keys and its values.
            let scale = 1.0 / (hd as f64).sqrt();
            if let Some(o) = crate::nn::attention::attention(&q, &k, &v, cos, sin, scale, true)? {
                if let Some(c) = cache {
                    let (cs, sn) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
                    let kr = ops::apply_rope(&k.transpose(1, 2)?, &cs, &sn)?.contiguous()?;
                    Self::append(c, &kr, &v.transpose(1, 2)?.contiguous()?)?;
                }
                return self.o_proj.forward_t(&(o * ops::sigmoid(&gate)?)?, train);
            }
        }
        let o = self.attend(&q, &k, &v, cos, sin, cache, segments)?;
        let o = (o * ops::sigmoid(&gate)?)?;
        self.o_proj.forward_t(&o, train)
    }

    /// One decoding step of several sequences: x (B, 1, D), cos/sin (B, 1, rot), `caches[i]` row i's cache. The
    /// projections take all rows at once; each row attends over its own cache.
    pub fn forward_rows(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        caches: &mut [&mut LayerCache],
    ) -> candle_core::Result<Tensor> {
        let (q, gate, k, v) = self.project(x, false)?;
        if let Some(o) = self.attend_rows(&q, &k, &v, cos, sin, caches)? {
            return self.o_proj.forward_t(&(o * ops::sigmoid(&gate)?)?, false);
        }
        // Rows on the pool: a row's attention is small, and one after another they would leave cores idle.
        let rows = caches
            .par_iter_mut()
            .enumerate()
            .map(|(r, c)| {
                let row = |t: &Tensor| t.narrow(0, r, 1);
                self.attend(&row(&q)?, &row(&k)?, &row(&v)?, &row(cos)?, &row(sin)?, Some(&mut **c), None)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let o = (Tensor::cat(&rows, 0)? * ops::sigmoid(&gate)?)?;
        self.o_proj.forward_t(&o, false)
    }

    /// q (B, S, H, hd), k and v (B, S, KV, hd) as (B, heads, S, hd), q and k after the rotary embedding (k and v
    /// contiguous, as the cache takes them).
    fn heads_first_rotated(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = (q.transpose(1, 2)?, k.transpose(1, 2)?, v.transpose(1, 2)?);
        let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
        let q = ops::apply_rope(&q, &cos, &sin)?;
        let k = ops::apply_rope(&k, &cos, &sin)?.contiguous()?;
        Ok((q, k, v.contiguous()?))
    }

    /// [`Attention::attend`] of one new position per row, each over its own cache, as one op on the CPU: every
    /// row's rotary embedding at once, each row's keys and values written to its cache, then all rows' query heads
    /// on the pool. None (nothing written) where the op does not apply.
    fn attend_rows(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        caches: &mut [&mut LayerCache],
    ) -> candle_core::Result<Option<Tensor>> {
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let caches_fit = caches.iter().all(|c| match &**c {
            LayerCache::Attention { k, .. } => cpu_f32(k),
            LayerCache::Empty => true,
            LayerCache::DeltaNet { .. } => false,
        });
        if !cpu_f32(q) || q.dim(1)? != 1 || !caches_fit {
            return Ok(None);
        }
        let (q, k, v) = Self::heads_first_rotated(q, k, v, cos, sin)?;
        let mut rows = Vec::with_capacity(caches.len());
        for (r, c) in caches.iter_mut().enumerate() {
            let (ck, cv, offset) = Self::append(c, &k.narrow(0, r, 1)?, &v.narrow(0, r, 1)?)?;
            rows.push((ck, cv, offset + 1));
        }
        let o = crate::nn::attention::decode_attention_rows(&q, &rows, self.kv_heads)?;
        // Written already: a cache the op would refuse was ruled out above.
        o.map(Some).ok_or_else(|| candle_core::Error::Msg("decode attention refused a checked cache".into()))
    }

    /// Writes k and v (B, KV, S, hd; k after its rotary embedding) after the cached positions, growing the cache
    /// to twice its capacity (in whole blocks) when full. Returns the cache tensors (B, KV, capacity, hd) and the
    /// number of positions cached before.
    fn append(c: &mut LayerCache, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor, usize)> {
        let (b, kv, s, hd) = k.dims4()?;
        let (offset, mut ck, mut cv) = match std::mem::take(c) {
            LayerCache::Attention { k: pk, v: pv, len } => (len, pk, pv),
            _ => (0, k.zeros_like()?.narrow(2, 0, 0)?, v.zeros_like()?.narrow(2, 0, 0)?),
        };
        let need = offset + s;
        if need > ck.dim(2)? {
            let cap = need.max(2 * ck.dim(2)?).next_multiple_of(KV_BLOCK);
            let grow = |old: &Tensor| -> candle_core::Result<Tensor> {
                let t = Tensor::zeros((b, kv, cap, hd), old.dtype(), old.device())?;
                if offset > 0 {
                    t.slice_set(&old.narrow(2, 0, offset)?.contiguous()?, 2, 0)?;
                }
                Ok(t)
            };
            (ck, cv) = (grow(&ck)?, grow(&cv)?);
        }
        ck.slice_set(k, 2, offset)?;
        cv.slice_set(v, 2, offset)?;
        *c = LayerCache::Attention { k: ck.clone(), v: cv.clone(), len: need };
        Ok((ck, cv, offset))
    }

    /// Steps 1 and 2 of [`Attention::forward`]: the projections (q_proj interleaves [query | gate] per head) and
    /// the per-head norms. Returns q (B, S, H, hd), the gate (B, S, H·hd), k and v (B, S, KV, hd).
    fn project(&self, x: &Tensor, train: bool) -> candle_core::Result<(Tensor, Tensor, Tensor, Tensor)> {
        let (b, s, _) = x.dims3()?;
        let (h, kv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let qg = self.q_proj.forward_t(x, train)?.reshape((b, s, h, 2 * hd))?;
        let q = qg.narrow(3, 0, hd)?;
        let gate = qg.narrow(3, hd, hd)?.reshape((b, s, h * hd))?;
        let k = self.k_proj.forward_t(x, train)?.reshape((b, s, kv, hd))?;
        let v = self.v_proj.forward_t(x, train)?.reshape((b, s, kv, hd))?;
        Ok((self.q_norm.forward(&q)?, gate, self.k_norm.forward(&k)?, v))
    }

    /// Steps 3 to 5 of [`Attention::forward`]: rotary, the cache, attention. q (B, S, H, hd) and k, v (B, S, KV, hd)
    /// after their norms; returns (B, S, H·hd) before the output gate.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut LayerCache>,
        segments: Option<&Segments>,
    ) -> candle_core::Result<Tensor> {
        let (b, s, _, _) = q.dims4()?;
        let (h, kv, hd) = (self.heads, self.kv_heads, self.head_dim);
        // 3. Partial rotary on the first `rot` channels.
        let (q, k, v) = Self::heads_first_rotated(q, k, v, cos, sin)?;
        // 4. Cache: append and attend over everything seen.
        let (k, v, offset) = match cache {
            Some(c) => {
                let (ck, cv, offset) = Self::append(c, &k, &v)?;
                let need = offset + s;
                if s == 1 {
                    // One new position (decoding): straight from the cache, without the GQA copies below.
                    if let Some(o) = crate::nn::attention::decode_attention(&q, &ck, &cv, need, kv)? {
                        return Ok(o);
                    }
                }
                (ck.narrow(2, 0, need)?, cv.narrow(2, 0, need)?, offset)
            }
            None => (k, v, 0),
        };
        // 5. GQA: kv head j serves query heads j·rep .. (j+1)·rep.
        let rep = h / kv;
        let t = k.dim(2)?;
        let expand = |x: &Tensor| -> candle_core::Result<Tensor> {
            if rep == 1 {
                Ok(x.clone())
            } else {
                x.unsqueeze(2)?.broadcast_as((b, kv, rep, t, hd))?.reshape((b, h, t, hd))
            }
        };
        let (k, v) = (expand(&k)?, expand(&v)?);
        let mask = match segments {
            Some(seg) if offset == 0 => Some(seg.mask.clone()),
            _ if s > 1 => Some(ops::causal_mask(s, offset, q.device())?),
            _ => None,
        };
        let o = ops::attention(&q, &k, &v, 1.0 / (hd as f64).sqrt(), mask.as_ref())?;
        // 6. (B, H, S, hd) -> (B, S, H·hd).
        o.transpose(1, 2)?.reshape((b, s, h * hd))
    }
}

impl Module for Attention {
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        self.q_norm.visit_mut(f);
        self.k_norm.visit_mut(f);
        self.q_proj.visit_mut(f);
        self.k_proj.visit_mut(f);
        self.v_proj.visit_mut(f);
        self.o_proj.visit_mut(f);
    }
}

#[derive(Clone)]
pub struct GatedDeltaNet {
    pub in_proj_qkv: Linear,
    pub in_proj_z: Linear,
    pub in_proj_b: Linear,
    pub in_proj_a: Linear,
    pub out_proj: Linear,
    /// Depthwise conv weight (conv_dim, K); the checkpoint's `conv1d.weight` is (conv_dim, 1, K).
    pub conv1d: Param,
    /// A_log in f32 (the decay rate is −exp(A_log)).
    pub a_log: Param,
    pub dt_bias: Param,
    /// Plain (not 1+w) weight of the gated RMSNorm (`norm.weight`), per value-head channel.
    pub norm: Param,
    eps: f64,
    hk: usize,
    hv: usize,
    dk: usize,
    dv: usize,
}

impl GatedDeltaNet {
    fn load(w: &Weights, cfg: &TextConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let (hk, hv, dk, dv) =
            (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim);
        let conv_dim = 2 * hk * dk + hv * dv;
        let kk = cfg.linear_conv_kernel_dim;
        let why_qkv =
            "hidden_size × (2·linear_num_key_heads·linear_key_head_dim + linear_num_value_heads·linear_value_head_dim)";
        let why_hv = "linear_num_value_heads";
        // Fields in the order a random init draws them (transformers' `_init_weights`: A_log = ln(U(0, 16))).
        Ok(Self {
            in_proj_qkv: Linear::load(&w.pp("in_proj_qkv"), d, conv_dim, false, why_qkv)?,
            in_proj_z: Linear::load(&w.pp("in_proj_z"), d, hv * dv, false, "hidden_size × value heads·dim")?,
            in_proj_b: Linear::load(&w.pp("in_proj_b"), d, hv, false, "hidden_size × linear_num_value_heads")?,
            in_proj_a: Linear::load(&w.pp("in_proj_a"), d, hv, false, "hidden_size × linear_num_value_heads")?,
            out_proj: Linear::load(&w.pp("out_proj"), hv * dv, d, false, "value heads·dim × hidden_size")?,
            conv1d: w
                .param(
                    "conv1d.weight",
                    &[conv_dim, 1, kk],
                    "conv_dim × 1 × linear_conv_kernel_dim",
                    Init::FanInUniform,
                )?
                .reshaped(&[conv_dim, kk])?,
            a_log: w.param_as("A_log", &[hv], why_hv, Init::LogUniform(1e-3, 16.0), DType::F32)?.saved_as(DType::F32),
            dt_bias: w.param_as("dt_bias", &[hv], why_hv, Init::Const(1.0), DType::F32)?,
            norm: w.param("norm.weight", &[dv], "linear_value_head_dim", Init::Const(1.0))?,
            eps: cfg.rms_norm_eps,
            hk,
            hv,
            dk,
            dv,
        })
    }

    /// x: (B, S, D). With a cache holding a state, continues from it; the cache is updated either way. With
    /// `segments` (no cache) every packed sample starts from zero conv and recurrent states.
    pub fn forward(
        &self,
        x: &Tensor,
        cache: Option<&mut LayerCache>,
        train: bool,
        segments: Option<&Segments>,
    ) -> candle_core::Result<Tensor> {
        let mixed = self.in_proj_qkv.forward_t(x, train)?; // (B, S, conv_dim): [q | k | v]
        let z = self.in_proj_z.forward_t(x, train)?; // (B, S, Hv·dv)
        let bb = self.in_proj_b.forward_t(x, train)?; // (B, S, Hv)
        let a = self.in_proj_a.forward_t(x, train)?;
        let y = self.mix(&mixed, &z, &bb, &a, cache, segments)?;
        self.out_proj.forward_t(&y, train)
    }

    /// One decoding step of several sequences: x (B, 1, D), `caches[i]` row i's state. The projections take all
    /// rows at once; each row's recurrence continues its own state.
    pub fn forward_rows(&self, x: &Tensor, caches: &mut [&mut LayerCache]) -> candle_core::Result<Tensor> {
        let mixed = self.in_proj_qkv.forward_t(x, false)?;
        let z = self.in_proj_z.forward_t(x, false)?;
        let bb = self.in_proj_b.forward_t(x, false)?;
        let a = self.in_proj_a.forward_t(x, false)?;
        if let Some(consts) = self.fused_consts(&mixed) {
            // Every row's heads as one op.
            let prev = caches
                .iter()
                .map(|c| match &**c {
                    LayerCache::DeltaNet { conv, state } => Some((conv, state)),
                    _ => None,
                })
                .collect::<Vec<_>>();
            let (y, next) = super::delta::gated_delta_net_rows(&mixed, &z, &bb, &a, &consts, &prev)?;
            for (c, (conv, state)) in caches.iter_mut().zip(next) {
                **c = LayerCache::DeltaNet { conv, state };
            }
            return self.out_proj.forward_t(&y, false);
        }
        // Rows on the pool, as in attention's.
        let rows = caches
            .par_iter_mut()
            .enumerate()
            .map(|(r, c)| {
                let row = |t: &Tensor| t.narrow(0, r, 1);
                self.mix(&row(&mixed)?, &row(&z)?, &row(&bb)?, &row(&a)?, Some(&mut **c), None)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.out_proj.forward_t(&Tensor::cat(&rows, 0)?, false)
    }

    /// The fused CPU op's constants, where it applies: f32 on the CPU, none of them trained.
    fn fused_consts(&self, mixed: &Tensor) -> Option<super::delta::GdnConsts<'_>> {
        let frozen = [&self.conv1d, &self.a_log, &self.dt_bias, &self.norm].iter().all(|p| !p.is_variable());
        (mixed.device().is_cpu() && mixed.dtype() == DType::F32 && frozen).then_some(super::delta::GdnConsts {
            conv: &self.conv1d,
            a_log: &self.a_log,
            dt_bias: &self.dt_bias,
            norm: &self.norm,
            eps: self.eps,
            hk: self.hk,
            hv: self.hv,
            dk: self.dk,
            dv: self.dv,
        })
    }

    /// Everything between the projections: mixed (B, S, conv_dim), z (B, S, Hv·dv), bb and a (B, S, Hv) to the
    /// gated-normed output (B, S, Hv·dv).
    fn mix(
        &self,
        mixed: &Tensor,
        z: &Tensor,
        bb: &Tensor,
        a: &Tensor,
        cache: Option<&mut LayerCache>,
        segments: Option<&Segments>,
    ) -> candle_core::Result<Tensor> {
        let (b, s, _) = mixed.dims3()?;
        let (hv, dv) = (self.hv, self.dv);
        if let Some(consts) = self.fused_consts(mixed).filter(|_| segments.is_none()) {
            // On the CPU, everything between the projections is one op (forward and backward).
            let (prev_conv, prev_state) = match cache.as_deref() {
                Some(LayerCache::DeltaNet { conv, state }) => (Some(conv.clone()), Some(state.clone())),
                _ => (None, None),
            };
            let (y, conv, state) =
                super::delta::gated_delta_net_fused(mixed, z, bb, a, &consts, prev_conv.as_ref(), prev_state.as_ref())?;
            if let Some(c) = cache {
                *c = LayerCache::DeltaNet { conv, state };
            }
            return Ok(y);
        }
        let o = match (segments, cache) {
            (Some(seg), None) => {
                // Each packed sample (and the padding after them) on its own, then put back in place.
                let mut rows = Vec::with_capacity(b);
                for (r, pieces) in seg.pieces(s).iter().enumerate() {
                    let mut outs = Vec::with_capacity(pieces.len());
                    for &(start, len) in pieces {
                        let cut = |t: &Tensor| t.narrow(0, r, 1)?.narrow(1, start, len);
                        outs.push(self.recurrence(&cut(mixed)?, &cut(bb)?, &cut(a)?, None, None)?.0);
                    }
                    rows.push(Tensor::cat(&outs, 1)?);
                }
                Tensor::cat(&rows, 0)?
            }
            (_, cache) => {
                let (prev_conv, prev_state) = match cache.as_deref() {
                    Some(LayerCache::DeltaNet { conv, state }) => (Some(conv.clone()), Some(state.clone())),
                    _ => (None, None),
                };
                let (o, conv_state, state) = self.recurrence(mixed, bb, a, prev_conv.as_ref(), prev_state.as_ref())?;
                if let Some(c) = cache {
                    *c = LayerCache::DeltaNet { conv: conv_state, state };
                }
                o
            }
        };
        // 6. Gated RMSNorm per head with z; out_proj.
        let z = z.reshape((b, s, hv, dv))?;
        ops::rms_norm_gated(&o, &self.norm, &z, self.eps)?.reshape((b, s, hv * dv))
    }

    /// Steps 1–5 on one run of tokens: conv + SiLU, gates, the delta rule. mixed (B, S, conv_dim), bb and a
    /// (B, S, Hv). Returns o (B, S, Hv, dv) in mixed's dtype, the conv state and the recurrent state.
    fn recurrence(
        &self,
        mixed: &Tensor,
        bb: &Tensor,
        a: &Tensor,
        prev_conv: Option<&Tensor>,
        prev_state: Option<&Tensor>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = mixed.dims3()?;
        let (hk, hv, dk, dv) = (self.hk, self.hv, self.dk, self.dv);
        let dtype = mixed.dtype();
        // 1. Causal depthwise conv over time + SiLU (one op on the CPU unless the conv weight trains).
        let (mixed, conv_state) = if mixed.device().is_cpu() && dtype == DType::F32 && !self.conv1d.is_variable() {
            super::delta::causal_conv1d_silu_fused(mixed, &self.conv1d, prev_conv)?
        } else {
            gdn::causal_conv1d_silu(mixed, &self.conv1d, prev_conv)?
        };
        let q = mixed.narrow(2, 0, hk * dk)?.reshape((b, s, hk, dk))?;
        let k = mixed.narrow(2, hk * dk, hk * dk)?.reshape((b, s, hk, dk))?;
        let v = mixed.narrow(2, 2 * hk * dk, hv * dv)?.reshape((b, s, hv, dv))?;
        // 2. beta = sigmoid(b); g = −exp(A_log)·softplus(a + dt_bias), in f32.
        let beta = ops::sigmoid(bb)?.to_dtype(DType::F32)?;
        let g = ops::softplus(&a.to_dtype(DType::F32)?.broadcast_add(&self.dt_bias)?)?
            .broadcast_mul(&self.a_log.exp()?.neg()?)?;
        // 3. Value head j reads key head j / (Hv/Hk) (repeat_interleave on the head dim).
        let rep = hv / hk;
        let spread = |x: &Tensor| -> candle_core::Result<Tensor> {
            if rep == 1 {
                Ok(x.clone())
            } else {
                x.unsqueeze(3)?.broadcast_as((b, s, hk, rep, dk))?.reshape((b, s, hv, dk))
            }
        };
        let (q, k) = (spread(&q)?, spread(&k)?);
        // 4. (B, S, Hv, d) -> (B·Hv, S, d); l2-normalised q/k, scaled q, all f32.
        let heads_first = |x: &Tensor, d: usize| -> candle_core::Result<Tensor> {
            x.transpose(1, 2)?.contiguous()?.reshape((b * hv, s, d))
        };
        let (q, k) = gdn::prepare_qk(&heads_first(&q, dk)?, &heads_first(&k, dk)?)?;
        let v = heads_first(&v, dv)?.to_dtype(DType::F32)?;
        let g = g.transpose(1, 2)?.contiguous()?.reshape((b * hv, s))?;
        let beta = beta.transpose(1, 2)?.contiguous()?.reshape((b * hv, s))?;
        // 5. The delta rule: one fused op (forward and backward) where the CPU computes in f32; elsewhere (a GPU,
        // or bf16 activations, which follow the GPU's ops) the step form for single-token decode, chunked
        // otherwise.
        let (o, state) = if q.device().is_cpu() && dtype == DType::F32 {
            super::delta::delta_rule_fused(&q, &k, &v, &g, &beta, prev_state)?
        } else if s == 1 && prev_state.is_some() {
            gdn::delta_rule_recurrent(&q, &k, &v, &g, &beta, prev_state)?
        } else {
            gdn::delta_rule_chunked(&q, &k, &v, &g, &beta, prev_state)?
        };
        // (B·Hv, S, dv) -> (B, S, Hv, dv)
        let o = o.reshape((b, hv, s, dv))?.transpose(1, 2)?.to_dtype(dtype)?;
        Ok((o, conv_state, state))
    }
}

impl Module for GatedDeltaNet {
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        self.conv1d.visit_mut(f);
        self.a_log.visit_mut(f);
        self.dt_bias.visit_mut(f);
        self.norm.visit_mut(f);
        self.in_proj_qkv.visit_mut(f);
        self.in_proj_z.visit_mut(f);
        self.in_proj_b.visit_mut(f);
        self.in_proj_a.visit_mut(f);
        self.out_proj.visit_mut(f);
    }
}

/// The packed samples of a micro-batch's rows (`neat_packing`), kept independent by the decoder: attention
/// block-diagonal, the Gated-DeltaNet states restarted at each sample.
#[derive(Clone, Debug)]
pub struct Segments {
    /// Per row, the lengths of its samples in order; the rest of the row (padding) is one more piece.
    pub rows: Vec<Vec<usize>>,
    /// Additive attention mask (B, 1, S, S): 0 where a query may see a key (same sample, not later), −inf elsewhere.
    pub mask: Tensor,
}

impl Segments {
    /// Segments of rows of length `s` (each row's lengths must sum to at most `s`).
    pub fn new(rows: Vec<Vec<usize>>, s: usize, device: &candle_core::Device) -> candle_core::Result<Segments> {
        let mut ids = Vec::with_capacity(rows.len() * s);
        for (r, lens) in rows.iter().enumerate() {
            let used: usize = lens.iter().sum();
            if used > s {
                candle_core::bail!("packed row {r}: samples of {used} tokens in a row of {s}");
            }
            for (j, &n) in lens.iter().enumerate() {
                ids.extend(std::iter::repeat_n(j as u32, n));
            }
            ids.extend(std::iter::repeat_n(lens.len() as u32, s - used));
        }
        let b = rows.len();
        let ids = Tensor::from_vec(ids, (b, s), device)?;
        let same = ids.unsqueeze(2)?.broadcast_eq(&ids.unsqueeze(1)?)?; // (B, S, S)
        let zero = Tensor::zeros((b, s, s), DType::F32, device)?;
        let ninf = Tensor::full(f32::NEG_INFINITY, (b, s, s), device)?;
        let apart = same.where_cond(&zero, &ninf)?;
        let mask = apart.broadcast_add(&ops::causal_mask(s, 0, device)?)?.unsqueeze(1)?;
        Ok(Segments { rows, mask })
    }

    /// Per row, the (start, length) pieces that cover it: each sample, then the padding if any.
    pub fn pieces(&self, s: usize) -> Vec<Vec<(usize, usize)>> {
        self.rows
            .iter()
            .map(|lens| {
                let mut start = 0;
                let mut v: Vec<(usize, usize)> = Vec::with_capacity(lens.len() + 1);
                for &n in lens.iter().filter(|&&n| n > 0) {
                    v.push((start, n));
                    start += n;
                }
                if start < s {
                    v.push((start, s - start));
                }
                v
            })
            .collect()
    }
}

// One per layer: the variants' size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Mixer {
    Full(Attention),
    Linear(GatedDeltaNet),
}

#[derive(Clone)]
pub struct DecoderLayer {
    pub mixer: Mixer,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm1p,
    pub post_attention_layernorm: RmsNorm1p,
}

impl DecoderLayer {
    pub fn load(w: &Weights, cfg: &TextConfig, kind: LayerType) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        let input_layernorm = RmsNorm1p::load(&w.pp("input_layernorm"), cfg.hidden_size, eps, "hidden_size")?;
        let post_attention_layernorm =
            RmsNorm1p::load(&w.pp("post_attention_layernorm"), cfg.hidden_size, eps, "hidden_size")?;
        // The MLP before the mixer: the order a random init draws them in.
        let mlp = Mlp::load(&w.pp("mlp"), cfg)?;
        let mixer = match kind {
            LayerType::Full => Mixer::Full(Attention::load(&w.pp("self_attn"), cfg)?),
            LayerType::Linear => Mixer::Linear(GatedDeltaNet::load(&w.pp("linear_attn"), cfg)?),
        };
        Ok(Self { mixer, mlp, input_layernorm, post_attention_layernorm })
    }

    /// Pre-norm residual block. x: (B, S, D); `segments` keeps packed samples apart.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        cache: Option<&mut LayerCache>,
        train: bool,
        segments: Option<&Segments>,
    ) -> candle_core::Result<Tensor> {
        let x = self.forward_mixer(x, rope, cache, train, segments)?;
        self.forward_mlp(&x, train)
    }

    /// One decoding step of several sequences (x (B, 1, D), row i continuing `caches[i]`): every row is computed
    /// as it would be alone, the projections shared.
    pub fn forward_rows(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        caches: &mut [&mut LayerCache],
    ) -> candle_core::Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let h = match &self.mixer {
            Mixer::Full(attn) => attn.forward_rows(&h, &rope.0, &rope.1, caches)?,
            Mixer::Linear(gdn) => gdn.forward_rows(&h, caches)?,
        };
        self.forward_mlp(&(x + h)?, false)
    }

    /// The first residual half: `x + mixer(norm(x))`.
    pub fn forward_mixer(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        cache: Option<&mut LayerCache>,
        train: bool,
        segments: Option<&Segments>,
    ) -> candle_core::Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let h = match &self.mixer {
            Mixer::Full(attn) => attn.forward(&h, &rope.0, &rope.1, cache, train, segments)?,
            Mixer::Linear(gdn) => gdn.forward(&h, cache, train, segments)?,
        };
        x + h
    }

    /// The second residual half: `x + mlp(norm(x))`.
    pub fn forward_mlp(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        x + self.mlp.forward(&self.post_attention_layernorm.forward(x)?, train)?
    }
}

impl Module for DecoderLayer {
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(Node<'a>)) {
        self.input_layernorm.visit_mut(f);
        self.post_attention_layernorm.visit_mut(f);
        match &mut self.mixer {
            Mixer::Full(a) => a.visit_mut(f),
            Mixer::Linear(g) => g.visit_mut(f),
        }
        self.mlp.visit_mut(f);
    }
}

/// Inverse frequencies of the text rotary embedding, computed in f32 as the reference does.
pub fn text_inv_freq(cfg: &TextConfig) -> Vec<f32> {
    let rot = cfg.rotary_dim();
    (0..rot / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / rot as f32;
            1.0f32 / (cfg.rope_theta as f32).powf(exponent)
        })
        .collect()
}

/// cos/sin of the interleaved M-RoPE for positions `pos` (3 axes × B × S): each (B, S, rot), f32.
/// Frequency i uses the T axis, except i ≡ 1 (mod 3) below 3·section[1] (H) and i ≡ 2 (mod 3) below
/// 3·section[2] (W).
pub fn mrope_cos_sin(
    inv_freq: &[f32],
    section: &[usize],
    pos: &[Vec<Vec<i64>>; 3],
    device: &candle_core::Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let b = pos[0].len();
    let s = pos[0].first().map_or(0, |r| r.len());
    let axis_of = |i: usize| -> usize {
        if i % 3 == 1 && i < 3 * section[1] {
            1
        } else if i % 3 == 2 && i < 3 * section[2] {
            2
        } else {
            0
        }
    };
    let mut cos = Vec::with_capacity(b * s * half * 2);
    let mut sin = Vec::with_capacity(b * s * half * 2);
    let cells = (0..b).flat_map(|bi| (0..s).map(move |si| (bi, si)));
    for (bi, si) in cells {
        {
            let freqs: Vec<f32> = (0..half).map(|i| pos[axis_of(i)][bi][si] as f32 * inv_freq[i]).collect();
            for _ in 0..2 {
                cos.extend(freqs.iter().map(|f| f.cos()));
                sin.extend(freqs.iter().map(|f| f.sin()));
            }
        }
    }
    Ok((Tensor::from_vec(cos, (b, s, 2 * half), device)?, Tensor::from_vec(sin, (b, s, 2 * half), device)?))
}

/// Logits from final hidden states: x (.., D) against the head (V, D).
pub fn lm_logits(x: &Tensor, head: &crate::nn::Param) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let d = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((rows, d))?;
    let y =
        if head.is_variable() { x2.matmul(&head.t()?)? } else { crate::nn::frozen::frozen_matmul_param(&x2, head)? };
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = head.dim(0)?;
    y.reshape(out)
}
