//! BLEU-4 / ROUGE against LLaMA-Factory's own `ComputeSimilarity` (jieba + nltk + rouge_chinese), through the
//! fixture written by tools/golden/gen_metrics.py.

use ferrotune_core::eval::metrics::{self, SampleScores};
use serde_json::Value;

use crate::common::fixtures;

fn golden() -> Value {
    let path = fixtures().join("golden/metrics/metrics.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

fn scores_of(v: &Value) -> SampleScores {
    serde_json::from_value(v.clone()).unwrap()
}

fn assert_scores(got: &SampleScores, want: &SampleScores, tol: f64, what: &str) {
    for ((name, g), (_, w)) in got.named().iter().zip(want.named()) {
        assert!((g - w).abs() <= tol, "{what}: {name} = {g}, LLaMA-Factory {w}");
    }
}

#[test]
fn jieba_cuts_equal_python_jieba() {
    let g = golden();
    for pair in g["pairs"].as_array().unwrap() {
        for (text, cut) in [("predict", "predict_cut"), ("label", "label_cut")] {
            let s = pair[text].as_str().unwrap();
            assert_eq!(metrics::cut(s), strings(&pair[cut]), "{} {text}: {s:?}", pair["name"]);
        }
    }
}

#[test]
fn per_sample_scores_equal_llamafactory() {
    let g = golden();
    let pairs = g["pairs"].as_array().unwrap();
    assert!(pairs.len() >= 20);
    // Bit-identical: same algorithms, same rounding (Python's round, math.fsum, numpy's pairwise mean).
    for pair in pairs {
        let got = metrics::score(pair["predict"].as_str().unwrap(), pair["label"].as_str().unwrap());
        assert_scores(&got, &scores_of(&pair["scores"]), 0.0, pair["name"].as_str().unwrap());
    }
}

#[test]
fn corpus_scores_equal_llamafactory() {
    let g = golden();
    let pairs = g["pairs"].as_array().unwrap();
    let preds: Vec<String> = pairs.iter().map(|p| p["predict"].as_str().unwrap().to_string()).collect();
    let labels: Vec<String> = pairs.iter().map(|p| p["label"].as_str().unwrap().to_string()).collect();
    let corpus = metrics::corpus(&metrics::score_all(&preds, &labels));
    assert_scores(&corpus, &scores_of(&g["corpus"]), 0.0, "corpus");
}

#[test]
fn bleu_follows_nltk_method3_and_brevity_penalty() {
    // Identical sequences: every precision 1, no penalty.
    let s: Vec<char> = "abcdefgh".chars().collect();
    assert!((metrics::sentence_bleu4(&s, &s) - 1.0).abs() < 1e-12);
    // No unigram match: 0, whatever the smoothing.
    let a: Vec<char> = "abcd".chars().collect();
    let b: Vec<char> = "wxyz".chars().collect();
    assert_eq!(metrics::sentence_bleu4(&a, &b), 0.0);
    // Hypothesis "ab" against reference "abc": p1 = 2/2, p2 = 1/1, p3 and p4 have no n-grams (count 0,
    // denominator 1) and get 1/2 and 1/4; brevity penalty exp(1 - 3/2).
    let r: Vec<char> = "abc".chars().collect();
    let h: Vec<char> = "ab".chars().collect();
    let want = (1.0f64 - 1.5).exp() * (0.25 * (0.5f64.ln() + 0.25f64.ln())).exp();
    assert!((metrics::sentence_bleu4(&r, &h) - want).abs() < 1e-15);
}

#[test]
fn python_rounding_and_fsum() {
    // Half-way cases in binary round to even, as Python's round does.
    assert_eq!(metrics::py_round4(0.00125), 0.0013 /* 0.00125 is slightly above the tie in binary */);
    assert_eq!(metrics::py_round4(2.5e-5 * 3.0), 0.0001);
    assert_eq!(metrics::py_round4(12.34565), 12.3456 /* just below the tie in binary */);
    assert_eq!(metrics::py_round4(0.03125), 0.0312 /* an exact tie: to even */);
    assert_eq!(metrics::py_round4(0.09375), 0.0938);
    assert_eq!(metrics::py_round4(0.0), 0.0);
    assert_eq!(format!("{:.1}", 0.25), "0.2", "formatting rounds exact ties to even");
    // fsum is exact where naive summation is not.
    assert_eq!(metrics::fsum(&[1e100, 1.0, -1e100, 1e-100]), 1.0);
    assert_eq!(metrics::fsum(&[0.1; 10]), 1.0);
    assert_ne!([0.1f64; 10].iter().sum::<f64>(), 1.0);
    assert_eq!(metrics::fsum(&[]), 0.0);
}
