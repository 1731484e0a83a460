//! BLEU-4 and ROUGE-1/2/L exactly as LLaMA-Factory's `predict_with_generate` computes them
//! (`train/sft/metric.py::ComputeSimilarity`), so that scores can be compared with runs of the reference:
//!
//! - ROUGE: both texts are segmented with jieba (accurate mode, HMM on), the words joined by spaces, and scored
//!   by `rouge_chinese.Rouge` (sentence cutting, n-gram *sets* for ROUGE-N, summary-level LCS for ROUGE-L,
//!   F = 2PR/(P+R+1e-8)). An empty side scores 0.
//! - BLEU-4: nltk's `sentence_bleu` on *characters* (not words), one reference, uniform weights, smoothing
//!   `method3` (NIST geometric: the k-th zero-match order gets 1/(2^k·count)), nltk's brevity penalty and an
//!   exactly rounded sum of the log precisions (`math.fsum`).
//! - Each per-sample score is ×100 and rounded to 4 decimals as Python's `round` does; the corpus score is
//!   numpy's mean of those.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::OnceLock;

use jieba_rs::Jieba;
use regex::Regex;

/// The metric names, as LLaMA-Factory reports them (with a `predict_` prefix in its result files).
pub const METRIC_NAMES: [&str; 4] = ["bleu-4", "rouge-1", "rouge-2", "rouge-l"];

/// Scores of one (prediction, label) pair, each ×100 and rounded to 4 decimals.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct SampleScores {
    #[serde(rename = "bleu-4")]
    pub bleu4: f64,
    #[serde(rename = "rouge-1")]
    pub rouge1: f64,
    #[serde(rename = "rouge-2")]
    pub rouge2: f64,
    #[serde(rename = "rouge-l")]
    pub rouge_l: f64,
}

impl SampleScores {
    /// (name, value) pairs in [`METRIC_NAMES`] order.
    pub fn named(&self) -> [(&'static str, f64); 4] {
        [("bleu-4", self.bleu4), ("rouge-1", self.rouge1), ("rouge-2", self.rouge2), ("rouge-l", self.rouge_l)]
    }
}

/// The jieba segmenter with its default dictionary, built once (loading the dictionary takes a moment).
pub fn jieba() -> &'static Jieba {
    static J: OnceLock<Jieba> = OnceLock::new();
    J.get_or_init(Jieba::new)
}

/// `list(jieba.cut(text))` of Python jieba 0.42: accurate mode with the HMM for unknown words.
///
/// jieba-rs agrees with it except in two places, both undone here:
/// - it keeps alphanumeric runs joined by `.`, `_` or `-` together (`dome-shaped`, `v1.2.3`), where Python's
///   `re_skip` (`[a-zA-Z0-9]+(?:\.\d+)?%?`) splits them (`dome`, `-`, `shaped`); such tokens are split again
///   with Python's pattern (no dictionary word contains these characters, so only HMM-path tokens are affected);
/// - it counts U+9FD6–U+9FFF and the CJK extension blocks as Han, where Python's `[\u4E00-\u9FD5…]` does not
///   (so each such character is a token of its own and ends the block around it); the text is cut at them.
pub fn cut(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if han_only_in_jieba_rs(c) {
            cut_block_into(&text[start..i], &mut out);
            out.push(c.to_string());
            start = i + c.len_utf8();
        }
    }
    cut_block_into(&text[start..], &mut out);
    out
}

fn cut_block_into(text: &str, out: &mut Vec<String>) {
    if text.is_empty() {
        return;
    }
    for token in jieba().cut(text, true) {
        let w = token.word;
        let joined = w.contains(['.', '_', '-'])
            && w.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'%'));
        if joined {
            py_re_skip_split(w, out);
        } else {
            out.push(w.to_string());
        }
    }
}

/// Python jieba's `re_skip.split(block)` without empty pieces: matches of `[a-zA-Z0-9]+(?:\.\d+)?%?` and the
/// gaps between them, in order.
fn py_re_skip_split(block: &str, out: &mut Vec<String>) {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"[a-zA-Z0-9]+(?:\.[0-9]+)?%?").expect("valid skip pattern"));
    let mut last = 0;
    for m in re.find_iter(block) {
        if m.start() > last {
            out.push(block[last..m.start()].to_string());
        }
        out.push(m.as_str().to_string());
        last = m.end();
    }
    if last < block.len() {
        out.push(block[last..].to_string());
    }
}

/// Characters jieba-rs puts in Han blocks and Python jieba 0.42 does not.
fn han_only_in_jieba_rs(c: char) -> bool {
    matches!(c,
        '\u{9FD6}'..='\u{9FFF}'
        | '\u{3400}'..='\u{4DBF}'
        | '\u{F900}'..='\u{FAFF}'
        | '\u{20000}'..='\u{2A6DF}'
        | '\u{2A700}'..='\u{2EBEF}'
        | '\u{2F800}'..='\u{2FA1F}'
    )
}

/// Scores one pair as LLaMA-Factory does.
pub fn score(prediction: &str, label: &str) -> SampleScores {
    let hyp = cut(prediction).join(" ");
    let reference = cut(label).join(" ");
    let (r1, r2, rl) = if py_split_whitespace(&hyp).is_empty() || py_split_whitespace(&reference).is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        let r = rouge_chinese(&hyp, &reference);
        (r.rouge1, r.rouge2, r.rouge_l)
    };
    let p: Vec<char> = prediction.chars().collect();
    let l: Vec<char> = label.chars().collect();
    let bleu = sentence_bleu4(&l, &p);
    SampleScores {
        bleu4: py_round4(bleu * 100.0),
        rouge1: py_round4(r1 * 100.0),
        rouge2: py_round4(r2 * 100.0),
        rouge_l: py_round4(rl * 100.0),
    }
}

/// Per-sample scores of paired predictions and labels (extra items on either side are ignored).
pub fn score_all(predictions: &[String], labels: &[String]) -> Vec<SampleScores> {
    predictions.iter().zip(labels).map(|(p, l)| score(p, l)).collect()
}

/// The corpus scores: numpy's mean of each per-sample score (all 0 for no samples).
pub fn corpus(scores: &[SampleScores]) -> SampleScores {
    let mean = |f: fn(&SampleScores) -> f64| {
        let v: Vec<f64> = scores.iter().map(f).collect();
        np_mean(&v)
    };
    SampleScores {
        bleu4: mean(|s| s.bleu4),
        rouge1: mean(|s| s.rouge1),
        rouge2: mean(|s| s.rouge2),
        rouge_l: mean(|s| s.rouge_l),
    }
}

// ---------------------------------------------------------------------------------------------------------
// BLEU (nltk.translate.bleu_score)

/// nltk's `sentence_bleu([reference], hypothesis, smoothing_function=SmoothingFunction().method3)` with the
/// default BLEU-4 weights, in [0, 1].
pub fn sentence_bleu4<T: Eq + Hash>(reference: &[T], hypothesis: &[T]) -> f64 {
    const MAX_N: usize = 4;
    // Modified precision per order, as (clipped matches, max(1, hypothesis n-grams)).
    let mut p: Vec<(u64, u64)> = Vec::with_capacity(MAX_N);
    for n in 1..=MAX_N {
        let hyp = ngram_counts(hypothesis, n);
        let refc = ngram_counts(reference, n);
        let matched: u64 = hyp.iter().map(|(g, &c)| c.min(refc.get(g).copied().unwrap_or(0))).sum();
        let total: u64 = hyp.values().sum();
        p.push((matched, total.max(1)));
    }
    let (hyp_len, ref_len) = (hypothesis.len(), reference.len());
    let bp = if hyp_len > ref_len {
        1.0
    } else if hyp_len == 0 {
        0.0
    } else {
        (1.0 - ref_len as f64 / hyp_len as f64).exp()
    };
    if p[0].0 == 0 {
        return 0.0;
    }
    // method3: the k-th order with no match (k = 1, 2, …) gets 1 / (2^k · denominator).
    let mut k = 1u32;
    let logs: Vec<f64> = p
        .iter()
        .map(|&(num, den)| {
            let v = if num == 0 {
                let v = 1.0 / (2u64.pow(k) * den) as f64;
                k += 1;
                v
            } else {
                num as f64 / den as f64
            };
            0.25 * v.ln()
        })
        .collect();
    bp * fsum(&logs).exp()
}

fn ngram_counts<T: Eq + Hash>(seq: &[T], n: usize) -> HashMap<&[T], u64> {
    let mut m = HashMap::new();
    if seq.len() >= n {
        for w in seq.windows(n) {
            *m.entry(w).or_insert(0) += 1;
        }
    }
    m
}

/// Python's `math.fsum`: the correctly rounded sum (Shewchuk's exact partials, then a round-half-even fix-up
/// of the last two partials).
pub fn fsum(values: &[f64]) -> f64 {
    let mut partials: Vec<f64> = Vec::new();
    for &v in values {
        let mut x = v;
        let mut kept = 0;
        for i in 0..partials.len() {
            let mut y = partials[i];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                partials[kept] = lo;
                kept += 1;
            }
            x = hi;
        }
        partials.truncate(kept);
        partials.push(x);
    }
    let Some(mut hi) = partials.pop() else { return 0.0 };
    let mut lo = 0.0;
    while let Some(y) = partials.pop() {
        let x = hi;
        hi = x + y;
        let yr = hi - x;
        lo = y - yr;
        if lo != 0.0 {
            break;
        }
    }
    // If the sum of the dropped partials has the sign of `lo`, `hi` was rounded the wrong way at a half-way case.
    if let Some(&next) = partials.last() {
        if (lo < 0.0 && next < 0.0) || (lo > 0.0 && next > 0.0) {
            let y = lo * 2.0;
            let x = hi + y;
            if y == x - hi {
                hi = x;
            }
        }
    }
    hi
}

// ---------------------------------------------------------------------------------------------------------
// ROUGE (rouge_chinese 1.0.3)

/// F scores of rouge_chinese's `Rouge().get_scores(hyp, ref)[0]`, in [0, 1]. The inputs are the space-joined
/// jieba cuts. Both must contain a non-space character (LLaMA-Factory checks this before calling).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RougeF {
    pub rouge1: f64,
    pub rouge2: f64,
    pub rouge_l: f64,
}

pub fn rouge_chinese(hyp: &str, reference: &str) -> RougeF {
    let hyp_words = rouge_words(hyp);
    let ref_words = rouge_words(reference);
    RougeF {
        rouge1: rouge_n(&hyp_words, &ref_words, 1),
        rouge2: rouge_n(&hyp_words, &ref_words, 2),
        rouge_l: rouge_l(&hyp_words, &ref_words),
    }
}

/// rouge_chinese's `cut_sent`: sentence breaks after 。！？? (unless a closing quote follows), after six dots or
/// two ellipses, and after a closing quote that ends a sentence; trailing whitespace stripped.
fn cut_sent(para: &str) -> Vec<String> {
    static RES: OnceLock<[Regex; 4]> = OnceLock::new();
    let res = RES.get_or_init(|| {
        // Literal patterns of this file (Python's `\…` escape is written as a plain `…`).
        [r"([。！？\?])([^”’])", r"(\.{6})([^”’])", r"(…{2})([^”’])", r"([。！？\?][”’])([^，。！？\?])"]
            .map(|p| Regex::new(p).expect("valid sentence pattern"))
    });
    let mut s = para.to_string();
    for re in res {
        s = re.replace_all(&s, "${1}\n${2}").into_owned();
    }
    s.trim_end_matches(py_isspace).split('\n').map(str::to_string).collect()
}

/// The words rouge_chinese scores: non-empty sentences, whitespace-normalised, split on single spaces.
fn rouge_words(text: &str) -> Vec<String> {
    cut_sent(text)
        .into_iter()
        .filter(|s| !s.is_empty())
        .map(|s| py_split_whitespace(&s).join(" "))
        .flat_map(|s| s.split(' ').map(str::to_string).collect::<Vec<_>>())
        .collect()
}

/// ROUGE-N over n-gram sets (rouge_chinese's default `exclusive=True`).
fn rouge_n(hyp: &[String], reference: &[String], n: usize) -> f64 {
    let grams = |w: &[String]| -> HashSet<Vec<String>> {
        if w.len() < n {
            HashSet::new()
        } else {
            w.windows(n).map(|g| g.to_vec()).collect()
        }
    };
    let (h, r) = (grams(hyp), grams(reference));
    let overlap = h.intersection(&r).count();
    let precision = if h.is_empty() { 0.0 } else { overlap as f64 / h.len() as f64 };
    let recall = if r.is_empty() { 0.0 } else { overlap as f64 / r.len() as f64 };
    2.0 * ((precision * recall) / (precision + recall + 1e-8))
}

/// Summary-level ROUGE-L: LCS of the whole word sequences.
fn rouge_l(hyp: &[String], reference: &[String]) -> f64 {
    let (m, n) = (reference.len(), hyp.len());
    if m == 0 || n == 0 {
        return 0.0;
    }
    let llcs = lcs_len(reference, hyp);
    let r = llcs as f64 / m as f64;
    let p = llcs as f64 / n as f64;
    2.0 * ((p * r) / (p + r + 1e-8))
}

fn lcs_len<T: PartialEq>(x: &[T], y: &[T]) -> usize {
    let mut prev = vec![0usize; y.len() + 1];
    let mut cur = vec![0usize; y.len() + 1];
    for xi in x {
        for (j, yj) in y.iter().enumerate() {
            cur[j + 1] = if xi == yj { prev[j] + 1 } else { prev[j + 1].max(cur[j]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[y.len()]
}

// ---------------------------------------------------------------------------------------------------------
// Python and numpy semantics

/// Python's `str.isspace` for one character (Rust's `char::is_whitespace` lacks U+001C–U+001F).
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.split()` with no arguments.
fn py_split_whitespace(s: &str) -> Vec<&str> {
    s.split(py_isspace).filter(|w| !w.is_empty()).collect()
}

/// Python's `round(x, 4)`: the exact binary value rounded half-to-even to 4 decimals (Rust's formatting
/// rounds the exact value the same way), read back as the nearest double.
pub fn py_round4(x: f64) -> f64 {
    if !x.is_finite() {
        return x;
    }
    format!("{x:.4}").parse().unwrap_or(x)
}

/// `float(np.mean(v))` for a 1-D float64 array: numpy's pairwise summation, then one division.
pub fn np_mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    (0.0 + pairwise_sum(v)) / v.len() as f64
}

fn pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        // numpy starts this branch from -0.0 only to keep a sign; 0.0 + x is the same for our sums.
        a.iter().fold(0.0, |s, &x| s + x)
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[i..] {
            res += x;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}
