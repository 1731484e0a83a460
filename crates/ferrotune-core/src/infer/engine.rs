//! The generation engine: a model (with adapters merged or attached), its tokenizer, chat template and image
//! processor; prompts built exactly like transformers' processor; prefill then token-by-token decode with a
//! caller-owned cache (KV for full-attention layers, conv + delta-rule state for Gated-DeltaNet layers).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::sample::{Sampler, SamplingParams};
use crate::chat_template::{expand_pads, ChatTemplate, RenderOptions};
use crate::image::ImageProcessorConfig;
use crate::lora::Adapter;
use crate::models::qwen3_5::{Cache, Qwen3_5, RopePositions, VisionInput};
use crate::nn::{with_row_adapters, AdapterWeights, RowAdapter};
use crate::tokenizer::Tokenizer;
use crate::weights::FrozenFormat;

/// `generation_config.json`: stop ids and sampling defaults of the checkpoint.
#[derive(Clone, Debug, Default)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f64>,
}

impl GenerationConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let j: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}:{}:{}: invalid JSON: {e}", path.display(), e.line(), e.column()))?;
        let eos = match j.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
            Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            None => vec![],
        };
        Ok(Self {
            eos_token_ids: eos,
            do_sample: j.get("do_sample").and_then(|x| x.as_bool()),
            temperature: j.get("temperature").and_then(|x| x.as_f64()),
            top_p: j.get("top_p").and_then(|x| x.as_f64()),
            top_k: j.get("top_k").and_then(|x| x.as_u64()).map(|x| x as usize),
            repetition_penalty: j.get("repetition_penalty").and_then(|x| x.as_f64()),
        })
    }

    /// Sampling parameters from the checkpoint's defaults (greedy when it does not ask for sampling).
    pub fn default_sampling(&self) -> SamplingParams {
        let sample = self.do_sample.unwrap_or(false);
        SamplingParams {
            temperature: if sample { self.temperature.unwrap_or(1.0) } else { 0.0 },
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            ..Default::default()
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The consumer asked to stop (e.g. the client went away).
    Cancelled,
}

impl FinishReason {
    pub fn as_openai(&self) -> &'static str {
        match self {
            FinishReason::Stop | FinishReason::Cancelled => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
}

/// A tokenized prompt with its images.
pub struct Prompt {
    pub ids: Vec<u32>,
    pub images: Option<VisionInput>,
}

pub struct Engine {
    pub model: Qwen3_5,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub processor: ImageProcessorConfig,
    pub generation: GenerationConfig,
    image_pad: String,
    /// (in, out) features of every linear module, for checking adapters added later.
    modules: HashMap<String, (usize, usize)>,
    /// Adapters served by name beside the base (see [`Engine::add_adapter`]).
    adapters: RwLock<BTreeMap<String, Arc<NamedAdapter>>>,
}

/// An adapter served by name on the engine's base, beside others: its matrices stay apart from the base
/// weights, and the rows of a batch each take their own sequence's adapter.
pub struct NamedAdapter {
    pub name: String,
    pub dir: PathBuf,
    pub weights: Arc<AdapterWeights>,
    /// The chat template the adapter was trained with, when its folder carries one (prompts for it use that).
    pub template: Option<ChatTemplate>,
    pub rank: usize,
    /// Bytes its matrices take (f32 A, B and Bᵀ).
    pub bytes: usize,
}

impl std::fmt::Debug for NamedAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedAdapter")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("rank", &self.rank)
            .finish()
    }
}

impl NamedAdapter {
    /// The choice of this adapter for the rows `rows` of the next products (None: every row).
    pub fn rows(&self, rows: Option<Vec<usize>>) -> RowAdapter {
        RowAdapter { rows, adapter: self.weights.clone() }
    }
}

/// How to apply adapters when loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterMode {
    /// Fold `scale·B·A` into the base weights (fastest inference).
    Merge,
    /// Keep each adapter as a separate branch (the base weights stay untouched).
    Separate,
}

impl Engine {
    /// Loads a checkpoint directory, applying `adapters` in order, every weight in `dtype`.
    pub fn load(
        model_dir: &Path,
        adapters: &[&Path],
        mode: AdapterMode,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_as(model_dir, adapters, mode, dtype, device, FrozenFormat::Compute)
    }

    /// [`Engine::load`], holding frozen matrices as `format` says (16-bit as stored or int8; CPU, f32 compute).
    /// One adapter on a compact base then stays a separate branch even when `mode` asks to merge: merged it
    /// would need an f32 copy of every adapted module (the numbers are the same either way).
    pub fn load_as(
        model_dir: &Path,
        adapters: &[&Path],
        mode: AdapterMode,
        dtype: DType,
        device: &Device,
        format: FrozenFormat,
    ) -> Result<Self> {
        crate::models::model_type(model_dir)?;
        let mut model = Qwen3_5::load_as(model_dir, dtype, device, format)?;
        model.visual.fast_gelu(true);
        let kept = model.embed_tokens.dtype() != model.dtype;
        let mode = if kept && adapters.len() == 1 { AdapterMode::Separate } else { mode };
        for dir in adapters {
            let adapter = Adapter::load(dir, device)?;
            if mode == AdapterMode::Separate && adapters.len() > 1 {
                bail!("several adapters can only be served merged (one LoRA branch per module)");
            }
            adapter
                .apply(model.linears_mut(), mode == AdapterMode::Merge)
                .with_context(|| format!("applying adapter {}", dir.display()))?;
        }
        let modules = model.linears_mut().into_iter().map(|(p, l)| (p, (l.in_dim(), l.out_dim()))).collect();
        let tokenizer = Tokenizer::from_path(model_dir)?;
        // An adapter trained by ferrotune carries the chat template it was trained with; serve with that one.
        let template = match adapters.iter().rev().find(|d| d.join("chat_template.jinja").exists()) {
            Some(dir) => ChatTemplate::from_dir(dir)?,
            None => ChatTemplate::from_dir(model_dir)?,
        };
        let processor = ImageProcessorConfig::from_dir(model_dir)?;
        let generation = GenerationConfig::from_dir(model_dir)?;
        let image_pad = tokenizer
            .id_to_token(model.cfg.image_token_id)
            .with_context(|| format!("the tokenizer has no token for image_token_id {}", model.cfg.image_token_id))?;
        let adapters = RwLock::default();
        Ok(Self { model, tokenizer, template, processor, generation, image_pad, modules, adapters })
    }

    /// Reads an adapter folder to serve under `name` beside the base (see [`Engine::add_adapter`]): every module
    /// it adapts must exist in this model with the adapter's shapes.
    pub fn load_adapter(&self, name: &str, dir: &Path) -> Result<NamedAdapter> {
        let adapter = Adapter::load(dir, &self.model.device)?;
        adapter.check_fits(|m| self.modules.get(m).copied()).with_context(|| dir.display().to_string())?;
        let rank = adapter.weights.values().map(|(a, _)| a.dims()[0]).max().unwrap_or(0);
        // A, B and the Bᵀ kept for decoding, f32.
        let bytes = adapter.weights.values().map(|(a, b)| (a.elem_count() + 2 * b.elem_count()) * 4).sum();
        let template =
            if dir.join("chat_template.jinja").is_file() { Some(ChatTemplate::from_dir(dir)?) } else { None };
        let modules = adapter
            .weights
            .into_iter()
            .map(|(m, (a, b))| Ok((m, crate::nn::LoraMatrices::new(a, b)?)))
            .collect::<Result<_>>()?;
        let weights = Arc::new(AdapterWeights { modules, scale: adapter.spec.scale() });
        Ok(NamedAdapter { name: name.to_string(), dir: dir.to_path_buf(), weights, template, rank, bytes })
    }

    /// Serves `adapter` under its name from now on; a name in use is refused.
    pub fn add_adapter(&self, adapter: NamedAdapter) -> Result<Arc<NamedAdapter>> {
        let mut map = self.adapters.write().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&adapter.name) {
            bail!("an adapter named `{}` is already loaded; unload it first or pick another name", adapter.name);
        }
        let a = Arc::new(adapter);
        map.insert(a.name.clone(), a.clone());
        Ok(a)
    }

    /// Stops serving the adapter `name` (sequences already running with it finish with it).
    pub fn remove_adapter(&self, name: &str) -> Option<Arc<NamedAdapter>> {
        self.adapters.write().unwrap_or_else(|e| e.into_inner()).remove(name)
    }

    pub fn adapter(&self, name: &str) -> Option<Arc<NamedAdapter>> {
        self.adapters.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    /// The adapters served by name, by name.
    pub fn adapters(&self) -> Vec<Arc<NamedAdapter>> {
        self.adapters.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// The chat template prompts for `adapter` are rendered with.
    pub fn template_for<'a>(&'a self, adapter: Option<&'a NamedAdapter>) -> &'a ChatTemplate {
        adapter.and_then(|a| a.template.as_ref()).unwrap_or(&self.template)
    }

    /// Renders `messages` (transformers' chat format: content strings or parts `{"type": "text"|"image"}`) with
    /// the checkpoint's template, expands each image placeholder, tokenizes, and preprocesses `images` (in the
    /// order their parts appear).
    pub fn prompt(&self, messages: &serde_json::Value, images: &[RgbImage], opts: &RenderOptions) -> Result<Prompt> {
        let text = self.template.render(messages, opts)?;
        self.prompt_from_text(&text, images)
    }

    /// Like [`Engine::prompt`] for already rendered text containing one image placeholder per image.
    pub fn prompt_from_text(&self, text: &str, images: &[RgbImage]) -> Result<Prompt> {
        if text.is_empty() {
            bail!("the prompt is empty: the model needs at least one token to continue from");
        }
        if images.is_empty() {
            let ids = self.tokenizer.encode(text)?;
            // A placeholder typed as text would ask the model for image features that nobody sent.
            if self.tokenizer.token_id(&self.image_pad).is_some_and(|pad| ids.contains(&pad)) {
                bail!(
                    "the text contains the image placeholder {} but no image was given; send the picture as an \
                     image part, or remove the placeholder",
                    self.image_pad
                );
            }
            return Ok(Prompt { ids, images: None });
        }
        let processed = self.processor.preprocess(images)?;
        let text = expand_pads(text, &self.image_pad, &processed.num_tokens)?;
        let ids = self.tokenizer.encode(&text)?;
        let n = processed.num_patches();
        let pixel_values = Tensor::from_vec(processed.pixel_values, (n, processed.feature_dim), &self.model.device)?;
        Ok(Prompt { ids, images: Some(VisionInput { pixel_values, grids: processed.image_grid_thw }) })
    }

    /// Stop token ids: the checkpoint's generation config, else `<|im_end|>` and `<|endoftext|>`.
    pub fn stop_ids(&self) -> Vec<u32> {
        if !self.generation.eos_token_ids.is_empty() {
            return self.generation.eos_token_ids.clone();
        }
        ["<|im_end|>", "<|endoftext|>"].iter().filter_map(|t| self.tokenizer.token_id(t)).collect()
    }

    /// Runs the prompt through the model, filling `cache`, [`PREFILL_CHUNK`] tokens at a time; returns the last
    /// position's logits and the rope positions.
    pub fn prefill(&self, prompt: &Prompt, cache: &mut Cache) -> Result<(Vec<f32>, RopePositions)> {
        let mut p = self.begin_prefill(prompt)?;
        loop {
            if let Some(logits) = self.prefill_chunk(&mut p, cache, PREFILL_CHUNK)? {
                return Ok((logits, p.pos));
            }
        }
    }

    /// Everything a prompt needs before its tokens go through the decoder: the image features (the vision tower
    /// runs here, once), the embeddings with the features in place, and the rope positions.
    pub fn begin_prefill(&self, prompt: &Prompt) -> Result<Prefill> {
        let m = &self.model;
        if prompt.ids.is_empty() {
            bail!("the prompt has no tokens: the model needs at least one token to continue from");
        }
        let grids: &[[usize; 3]] = prompt.images.as_ref().map_or(&[], |v| &v.grids);
        let pos = m.rope_index(&prompt.ids, grids)?;
        let rope = m.rope(&[&pos])?;
        let feats = prompt.images.as_ref().map(|v| m.image_features(v)).transpose()?;
        let ids = Tensor::from_vec(prompt.ids.clone(), (1, prompt.ids.len()), &m.device)?;
        let emb = m.embed(&ids, feats.as_ref())?;
        Ok(Prefill { emb, rope, pos, done: 0 })
    }

    /// Feeds the next tokens of a prompt, up to the next multiple of `chunk` (so that a prompt is cut at the same
    /// places however its chunks are scheduled); returns the last position's logits once the whole prompt is in.
    pub fn prefill_chunk(&self, p: &mut Prefill, cache: &mut Cache, chunk: usize) -> Result<Option<Vec<f32>>> {
        let n = p.len();
        let len = p.next_chunk(chunk);
        if len == 0 {
            bail!("the prompt is already in the cache");
        }
        let m = &self.model;
        let emb = p.emb.narrow(1, p.done, len)?;
        let rope = (p.rope.0.narrow(1, p.done, len)?, p.rope.1.narrow(1, p.done, len)?);
        let (h, _) = m.decode(&emb, &rope, Some(cache), false)?;
        p.done += len;
        if p.done < n {
            return Ok(None);
        }
        let last = h.narrow(1, len - 1, 1)?;
        Ok(Some(m.logits(&last)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?))
    }

    /// Feeds one token after the cached ones; returns its logits.
    pub fn step(&self, token: u32, rope_delta: i64, cache: &mut Cache) -> Result<Vec<f32>> {
        Ok(self.step_rows(&[token], &[rope_delta], &mut [cache])?.pop().expect("one row"))
    }

    /// One decoding step of several sequences at once: token i continues `caches[i]` (whose rope delta is
    /// `deltas[i]`). Returns each row's logits, the same numbers as the row would give alone.
    pub fn step_rows(&self, tokens: &[u32], deltas: &[i64], caches: &mut [&mut Cache]) -> Result<Vec<Vec<f32>>> {
        let m = &self.model;
        let b = tokens.len();
        if deltas.len() != b || caches.len() != b {
            bail!("step_rows: {b} tokens, {} rope deltas, {} caches", deltas.len(), caches.len());
        }
        let positions: Vec<i64> = caches.iter().zip(deltas).map(|(c, &d)| c.seen as i64 + d).collect();
        let rope = m.rope_rows(&positions)?;
        let emb = m.embed(&Tensor::from_vec(tokens.to_vec(), (b, 1), &m.device)?, None)?;
        let h = m.decode_rows(&emb, &rope, caches)?;
        let logits = m.logits(&h)?.reshape((b, ()))?.to_dtype(DType::F32)?;
        Ok(logits.to_vec2()?)
    }

    /// Generates a completion. `on_text` receives each new piece of text as soon as it is final (no partial
    /// UTF-8, no text that might still become a stop string), and "" after a token that released none; returning
    /// false cancels generation.
    pub fn generate(
        &self,
        prompt: &Prompt,
        req: &GenerateRequest,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        self.generate_with(prompt, req, None, on_text)
    }

    /// [`Engine::generate`] with one of the adapters served by name (None: the base, or the adapters applied at
    /// load).
    pub fn generate_with(
        &self,
        prompt: &Prompt,
        req: &GenerateRequest,
        adapter: Option<&NamedAdapter>,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let chosen = || adapter.map(|a| vec![a.rows(None)]).unwrap_or_default();
        let mut cache = Cache::new(self.model.layers.len());
        let (mut logits, pos) = with_row_adapters(chosen(), || self.prefill(prompt, &mut cache))?;
        let mut d = Decoding::new(self, &prompt.ids, req);
        while let Some(tok) = d.accept(&self.tokenizer, &mut logits, &mut on_text)? {
            logits = with_row_adapters(chosen(), || self.step(tok, pos.delta, &mut cache))?;
        }
        Ok(d.finish(&mut on_text))
    }
}

/// Tokens of a prompt fed to the decoder at once: long prompts in pieces keep the activations bounded, and let a
/// server decode other sequences between the pieces.
pub const PREFILL_CHUNK: usize = 256;

/// A prompt on its way into the cache (see [`Engine::begin_prefill`]).
pub struct Prefill {
    /// (1, n, D)
    emb: Tensor,
    /// cos/sin (1, n, rot)
    rope: (Tensor, Tensor),
    pub pos: RopePositions,
    /// Tokens already fed.
    pub done: usize,
}

impl Prefill {
    /// The prompt's length in tokens.
    pub fn len(&self) -> usize {
        self.pos.axes[0].len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens the next [`Engine::prefill_chunk`] call with `chunk` feeds.
    pub fn next_chunk(&self, chunk: usize) -> usize {
        let chunk = chunk.max(1);
        (chunk - self.done % chunk).min(self.len() - self.done)
    }
}

/// The text side of one generation: sampling, stop tokens and strings, and the text released so far.
pub struct Decoding {
    sampler: Sampler,
    stop_ids: Vec<u32>,
    stop: Vec<String>,
    max_tokens: usize,
    prompt_ids: Vec<u32>,
    out: Vec<u32>,
    text: String,
    /// Bytes of `text` already handed to `on_text`.
    emitted: usize,
    /// Tokens / bytes of `text` that are final (complete characters).
    settled: usize,
    settled_len: usize,
    /// Bytes held back in case they start a stop string.
    hold: usize,
    finish: FinishReason,
}

impl Decoding {
    pub fn new(engine: &Engine, prompt_ids: &[u32], req: &GenerateRequest) -> Self {
        Self {
            sampler: Sampler::new(req.sampling.clone()),
            stop_ids: engine.stop_ids(),
            stop: req.stop.clone(),
            max_tokens: req.max_tokens,
            prompt_ids: prompt_ids.to_vec(),
            out: Vec::new(),
            text: String::new(),
            emitted: 0,
            settled: 0,
            settled_len: 0,
            hold: req.stop.iter().map(|s| s.len()).max().unwrap_or(0),
            finish: FinishReason::Length,
        }
    }

    /// Tokens generated so far.
    pub fn tokens(&self) -> usize {
        self.out.len()
    }

    /// Picks the next token from `logits` and hands the text it makes final to `on_text`. Returns the token to
    /// feed to the model next, or None when generation has ended (then call [`Decoding::finish`]).
    pub fn accept(
        &mut self,
        tokenizer: &Tokenizer,
        logits: &mut [f32],
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Option<u32>> {
        if self.out.len() >= self.max_tokens {
            self.finish = FinishReason::Length;
            return Ok(None);
        }
        let tok = self.sampler.next(logits, &self.prompt_ids, &self.out);
        if self.stop_ids.contains(&tok) {
            self.finish = FinishReason::Stop;
            return Ok(None);
        }
        self.out.push(tok);
        // Decode only the tokens after the last complete character: byte-level pieces concatenate, so the
        // text grows in O(1) per token instead of re-decoding everything.
        let tail = tokenizer.decode(&self.out[self.settled..], true)?;
        let text = &mut self.text;
        text.truncate(self.settled_len);
        let changed = self.settled_len;
        text.push_str(&tail);
        if !tail.ends_with('\u{FFFD}') {
            self.settled = self.out.len();
            self.settled_len = text.len();
        }
        // Only a match that ends in the changed text is new: each stop string is looked for from its length
        // before the change, so a token costs the length of the stop strings, not of the whole answer.
        let found = |s: &String| {
            let mut from = changed.saturating_sub(s.len().saturating_sub(1));
            while !text.is_char_boundary(from) {
                from -= 1;
            }
            text[from..].find(s.as_str()).map(|i| from + i)
        };
        if let Some(cut) = self.stop.iter().filter_map(found).min() {
            text.truncate(cut);
            self.finish = FinishReason::Stop;
            return Ok(None);
        }
        // Hold back an incomplete UTF-8 sequence and anything that could be the start of a stop string.
        let stable = if text.ends_with('\u{FFFD}') { text.trim_end_matches('\u{FFFD}').len() } else { text.len() };
        let mut upto = stable.saturating_sub(self.hold.saturating_sub(1));
        while upto > self.emitted && !text.is_char_boundary(upto) {
            upto -= 1;
        }
        // Called after every token, with "" when the token released no text (a partial character, a possible
        // stop string), so that a consumer can cancel at any token.
        let piece = if upto > self.emitted { &text[self.emitted..upto] } else { "" };
        let keep_going = on_text(piece);
        self.emitted = self.emitted.max(upto);
        if !keep_going {
            self.finish = FinishReason::Cancelled;
            return Ok(None);
        }
        if self.out.len() >= self.max_tokens {
            self.finish = FinishReason::Length;
            return Ok(None);
        }
        Ok(Some(tok))
    }

    /// Marks the generation cancelled (the consumer went away between tokens).
    pub fn cancel(&mut self) {
        self.finish = FinishReason::Cancelled;
    }

    /// Releases the text still held back (unless cancelled) and returns the generation.
    pub fn finish(self, on_text: &mut dyn FnMut(&str) -> bool) -> Generation {
        if self.emitted < self.text.len() && self.finish != FinishReason::Cancelled {
            on_text(&self.text[self.emitted..]);
        }
        Generation {
            text: self.text,
            token_ids: self.out,
            prompt_tokens: self.prompt_ids.len(),
            finish_reason: self.finish,
        }
    }
}
