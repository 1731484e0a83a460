//! `numpy.random.default_rng(seed).permutation(n)`, bit for bit: the row order of datasets' `train_test_split`,
//! which LLaMA-Factory's `val_size` uses. With it the held-out rows, and the order of the training rows under
//! `disable_shuffling: true`, are the ones LLaMA-Factory picks.
//!
//! The pieces are numpy's: `SeedSequence` (pool of 4 words, hashmix / mix), `PCG64` (128-bit LCG, XSL-RR output,
//! seeded with `generate_state(4, uint64)`), `next_uint32` (one 64-bit draw serves two 32-bit ones, low half
//! first) and `Generator.shuffle` (Fisher–Yates from the end, `random_interval`: mask-and-reject).

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;
const POOL: usize = 4;

/// numpy's `SeedSequence(seed).generate_state(n_words, uint32)` for a non-negative integer seed.
fn seed_sequence_words(seed: u64, n_words: usize) -> Vec<u32> {
    // The entropy as little-endian 32-bit words (at least one).
    let mut entropy = vec![seed as u32];
    if seed >> 32 != 0 {
        entropy.push((seed >> 32) as u32);
    }
    let mut hash_const = INIT_A;
    let hashmix = |value: u32, hc: &mut u32| -> u32 {
        let mut v = value ^ *hc;
        *hc = hc.wrapping_mul(MULT_A);
        v = v.wrapping_mul(*hc);
        v ^ (v >> XSHIFT)
    };
    let mix = |x: u32, y: u32| -> u32 {
        let r = MIX_MULT_L.wrapping_mul(x).wrapping_sub(MIX_MULT_R.wrapping_mul(y));
        r ^ (r >> XSHIFT)
    };
    let mut pool = [0u32; POOL];
    for (i, p) in pool.iter_mut().enumerate() {
        *p = hashmix(entropy.get(i).copied().unwrap_or(0), &mut hash_const);
    }
    for src in 0..POOL {
        for dst in 0..POOL {
            if src != dst {
                let h = hashmix(pool[src], &mut hash_const);
                pool[dst] = mix(pool[dst], h);
            }
        }
    }
    for &e in entropy.iter().skip(POOL) {
        for p in pool.iter_mut() {
            let h = hashmix(e, &mut hash_const);
            *p = mix(*p, h);
        }
    }
    let mut hc = INIT_B;
    (0..n_words)
        .map(|i| {
            let mut v = pool[i % POOL] ^ hc;
            hc = hc.wrapping_mul(MULT_B);
            v = v.wrapping_mul(hc);
            v ^ (v >> XSHIFT)
        })
        .collect()
}

/// numpy's `PCG64` bit generator.
struct Pcg64 {
    state: u128,
    inc: u128,
    /// The upper half of the last 64-bit draw, not yet handed out as a 32-bit value.
    spare: Option<u32>,
}

const PCG_MULT: u128 = (0x2360_ed05_1fc6_5da4 << 64) | 0x4385_df64_9fcc_f645;

impl Pcg64 {
    fn from_seed(seed: u64) -> Pcg64 {
        let w = seed_sequence_words(seed, 8);
        let u64s: Vec<u64> = w.chunks(2).map(|p| p[0] as u64 | (p[1] as u64) << 32).collect();
        let init_state = (u64s[0] as u128) << 64 | u64s[1] as u128;
        let init_seq = (u64s[2] as u128) << 64 | u64s[3] as u128;
        let mut g = Pcg64 { state: 0, inc: (init_seq << 1) | 1, spare: None };
        g.step();
        g.state = g.state.wrapping_add(init_state);
        g.step();
        g
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
    }

    fn next_u64(&mut self) -> u64 {
        self.step();
        let s = self.state;
        let x = ((s >> 64) as u64) ^ (s as u64);
        x.rotate_right((s >> 122) as u32)
    }

    fn next_u32(&mut self) -> u32 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let v = self.next_u64();
        self.spare = Some((v >> 32) as u32);
        v as u32
    }

    /// A uniform integer in 0..=max (numpy's `random_interval`).
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        for s in [1, 2, 4, 8, 16, 32] {
            mask |= mask >> s;
        }
        loop {
            let v = if max <= u32::MAX as u64 { (self.next_u32() as u64) & mask } else { self.next_u64() & mask };
            if v <= max {
                return v;
            }
        }
    }
}

/// `numpy.random.default_rng(seed).permutation(n)`.
pub fn permutation(seed: u64, n: usize) -> Vec<usize> {
    let mut g = Pcg64::from_seed(seed);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = g.interval(i as u64) as usize;
        v.swap(i, j);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_cases_are_permutations() {
        for n in [0, 1, 2, 7, 100] {
            let mut p = permutation(42, n);
            p.sort_unstable();
            assert_eq!(p, (0..n).collect::<Vec<_>>());
        }
    }
}
