//! Conversation → training [`Sample`]: template encoding, image-token expansion, LLaMA-Factory's truncation
//! (`SupervisedDatasetProcessor._encode_data_example` + `infer_seqlen`) and labels (-100 on prompts).
//!
//! Images: each `<image>` becomes `<|vision_start|>` + N x `<|image_pad|>` + `<|vision_end|>`, N from the
//! model's image processor. The text is tokenized with one pad per image and the pad is repeated afterwards:
//! special tokens split the text the same way whatever their count, so this equals tokenizing the expanded text.
//! Truncation never cuts an image: a sample whose cutoff would remove image tokens is dropped (the caller
//! reports it with the length it needs).

use std::path::PathBuf;

use anyhow::Result;

use super::convert::{Conversation, IMAGE_PLACEHOLDER};
use crate::template::{infer_seqlen, ChatEncoder, Message};

/// Label value of tokens that are not trained.
pub const IGNORE_INDEX: i64 = -100;

/// Options of the data stage that shape a sample.
#[derive(Clone, Copy, Debug)]
pub struct EncodeOptions {
    pub cutoff_len: usize,
    pub train_on_prompt: bool,
    pub mask_history: bool,
}

/// Ids of the vision tokens in the tokenizer.
#[derive(Clone, Copy, Debug)]
pub struct VisionIds {
    pub start: u32,
    pub end: u32,
    pub pad: u32,
}

impl VisionIds {
    pub fn from_tokenizer(tok: &crate::tokenizer::Tokenizer) -> Result<Self> {
        Ok(Self {
            start: tok.require_token("<|vision_start|>")?,
            end: tok.require_token("<|vision_end|>")?,
            pad: tok.require_token("<|image_pad|>")?,
        })
    }
}

/// Where a sample came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RowRef {
    pub dataset: String,
    pub file: PathBuf,
    /// 0-based row index in the file.
    pub row: usize,
    /// 1-based line where the row starts.
    pub line: usize,
}

impl std::fmt::Display for RowRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} row {} (line {})", self.file.display(), self.row, self.line)
    }
}

/// One tokenized training example, what the training loop consumes.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    /// Token ids where the loss is computed, [`IGNORE_INDEX`] elsewhere; same length as `input_ids`.
    pub labels: Vec<i64>,
    /// Image files, in placeholder order.
    pub images: Vec<PathBuf>,
    /// (width, height) of each image after LLaMA-Factory's pre-resize ([`crate::image::preresize`]): the pixel
    /// path resizes the decoded image to exactly this (PIL's default bicubic, RGB) before the image processor.
    pub image_sizes: Vec<(u32, u32)>,
    /// `<|image_pad|>` count of each image (the processor's grid of the pre-resized image must give this).
    pub image_tokens: Vec<usize>,
    /// The first sample of a packed row; a row packed from several samples takes the place of the first.
    pub source: RowRef,
    /// A row of `neat_packing`: the token lengths of the samples packed into it, in order (they sum to the row's
    /// length), which the model keeps independent. Empty for an unpacked sample and for plain `packing`.
    pub segments: Vec<usize>,
}

/// Lengths of an encoded sample before truncation, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lengths {
    /// Tokens the whole conversation needs.
    pub total: usize,
    /// Of those, image tokens (pads plus start/end markers).
    pub image: usize,
    /// The sample was cut to cutoff_len.
    pub truncated: bool,
}

/// The result of encoding one conversation.
pub enum Encoded {
    Kept {
        input_ids: Vec<u32>,
        labels: Vec<i64>,
        lengths: Lengths,
    },
    /// cutoff_len would cut image tokens; `needed` is the untruncated length.
    ImageOverCutoff {
        needed: usize,
        image_tokens: usize,
    },
}

/// Encodes a conversation whose images cost `image_tokens[i]` pads each.
pub fn encode(
    enc: &ChatEncoder,
    conv: &Conversation,
    image_tokens: &[usize],
    vision: Option<VisionIds>,
    opts: EncodeOptions,
) -> Result<Encoded> {
    let vision_text = vision.map(|_| "<|vision_start|><|image_pad|><|vision_end|>");
    let messages: Vec<Message> = conv
        .messages
        .iter()
        .map(|m| match vision_text {
            Some(v) if m.content.contains(IMAGE_PLACEHOLDER) => {
                Message::new(m.role, m.content.replace(IMAGE_PLACEHOLDER, v))
            }
            _ => m.clone(),
        })
        .collect();
    let mut pairs = enc.encode_turns(&messages, conv.system.as_deref(), conv.tools.as_deref(), opts.mask_history)?;

    // Repeat each image's single pad to its token count, in order across the conversation.
    let mut image_total = 0;
    if let Some(v) = vision {
        let mut next = image_tokens.iter();
        for (p, a) in pairs.iter_mut() {
            for ids in [p, a] {
                if ids.contains(&v.pad) {
                    let mut out = Vec::with_capacity(ids.len());
                    for &id in ids.iter() {
                        if id == v.pad {
                            let n =
                                *next.next().ok_or_else(|| anyhow::anyhow!("more image placeholders than images"))?;
                            out.extend(std::iter::repeat_n(v.pad, n));
                            image_total += n + 2;
                        } else {
                            out.push(id);
                        }
                    }
                    *ids = out;
                }
            }
        }
    }
    let total: usize = pairs.iter().map(|(p, a)| p.len() + a.len()).sum();

    // LLaMA-Factory's turn loop: each turn gets what is left of the budget, split by infer_seqlen; with
    // mask_history the last turn comes first and only its answer is trained.
    let cutoff = opts.cutoff_len;
    if opts.mask_history {
        pairs.reverse();
    }
    let mut input_ids: Vec<u32> = Vec::with_capacity(total.min(cutoff));
    let mut labels: Vec<i64> = Vec::with_capacity(total.min(cutoff));
    let mut used = 0;
    for (turn, (source, target)) in pairs.iter().enumerate() {
        if used >= cutoff {
            break;
        }
        let (s_len, t_len) = infer_seqlen(source.len(), target.len(), cutoff - used);
        let (s, t) = (&source[..s_len], &target[..t_len]);
        used += s_len + t_len;
        let s_labels: Vec<i64> =
            if opts.train_on_prompt { s.iter().map(|&i| i64::from(i)).collect() } else { vec![IGNORE_INDEX; s_len] };
        let t_labels: Vec<i64> = if opts.mask_history && turn != 0 {
            vec![IGNORE_INDEX; t_len]
        } else {
            t.iter().map(|&i| i64::from(i)).collect()
        };
        if opts.mask_history {
            // Reversed turns are prepended.
            input_ids.splice(0..0, s.iter().chain(t).copied());
            labels.splice(0..0, s_labels.into_iter().chain(t_labels));
        } else {
            input_ids.extend_from_slice(s);
            input_ids.extend_from_slice(t);
            labels.extend(s_labels);
            labels.extend(t_labels);
        }
    }
    let truncated = input_ids.len() < total;
    if truncated {
        if let Some(v) = vision {
            let kept = input_ids.iter().filter(|&&i| i == v.pad || i == v.start || i == v.end).count();
            if kept != image_total {
                return Ok(Encoded::ImageOverCutoff { needed: total, image_tokens: image_total });
            }
        }
    }
    Ok(Encoded::Kept { input_ids, labels, lengths: Lengths { total, image: image_total, truncated } })
}
