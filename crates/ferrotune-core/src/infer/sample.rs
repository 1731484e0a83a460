//! Next-token selection: penalties, temperature, top-k, top-p and a seeded sampler, in the order transformers'
//! `generate` applies them (penalties, then temperature, then top-k, then top-p). Temperature 0 is greedy.

use rand::{Rng, SeedableRng};

#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// 1.0 disables.
    pub top_p: f64,
    /// 0 disables.
    pub top_k: usize,
    /// HF semantics over prompt and generated tokens: positive logits divided, negative multiplied. 1.0 disables.
    pub repetition_penalty: f64,
    /// OpenAI semantics over generated tokens: minus `presence` once a token appeared.
    pub presence_penalty: f64,
    /// OpenAI semantics: minus `frequency × count` of the token among generated tokens.
    pub frequency_penalty: f64,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// Picks the next token from `logits` (f32, vocab-sized), given the prompt and the tokens generated so far.
    pub fn next(&mut self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in prompt.iter().chain(generated) {
                if seen.insert(t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = if *l > 0.0 { *l / p.repetition_penalty as f32 } else { *l * p.repetition_penalty as f32 };
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::new();
            for &t in generated {
                *counts.entry(t).or_insert(0usize) += 1;
            }
            for (t, c) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= (p.presence_penalty + p.frequency_penalty * c as f64) as f32;
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature as f32;
        // Candidates sorted by logit, best first.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.truncate(p.top_k);
        }
        let max = logits[idx[0] as usize] * inv_t;
        let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i as usize] * inv_t - max) as f64).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let r: f64 = self.rng.random();
        let mut acc = 0.0;
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if r < acc {
                return idx[i];
            }
        }
        *idx.last().expect("at least one candidate")
    }
}

/// Index of the largest logit (the first on ties, as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { seed: Some(1), ..Default::default() };
        f(&mut p);
        p
    }

    #[test]
    fn greedy_and_penalties() {
        let mut s = Sampler::new(params(|_| {}));
        assert_eq!(s.next(&mut [0.1, 2.0, 1.9], &[], &[]), 1);
        // Repetition penalty 2 halves the positive logit of a seen token: 2.0 -> 1.0 < 1.9.
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 2.0));
        assert_eq!(s.next(&mut [0.1, 2.0, 1.9], &[1], &[]), 2);
        // Frequency penalty counts occurrences among generated tokens: 2.0 - 3·0.1 < 1.9.
        let mut s = Sampler::new(params(|p| p.frequency_penalty = 0.1));
        assert_eq!(s.next(&mut [0.1, 2.0, 1.9], &[], &[1, 1, 1]), 2);
        let mut s = Sampler::new(params(|p| p.presence_penalty = 0.05));
        assert_eq!(s.next(&mut [0.1, 2.0, 1.9], &[], &[1, 1, 1]), 1);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy_and_seed_is_reproducible() {
        let logits = [0.5f32, 1.0, 0.9, -1.0];
        for f in [|p: &mut SamplingParams| p.top_k = 1, |p: &mut SamplingParams| p.top_p = 1e-6] {
            let mut s = Sampler::new(params(|p| {
                p.temperature = 1.0;
                f(p)
            }));
            assert_eq!(s.next(&mut logits.clone(), &[], &[]), 1);
        }
        let draw = |seed| {
            let mut s = Sampler::new(params(|p| {
                p.temperature = 1.0;
                p.seed = Some(seed)
            }));
            (0..20).map(|_| s.next(&mut logits.clone(), &[], &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let all = draw(7);
        assert!(all.iter().collect::<std::collections::HashSet<_>>().len() > 1, "temperature 1 must explore");
    }
}
