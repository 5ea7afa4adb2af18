//! Deterministic, resumable order of training examples.
//!
//! Epoch `e` visits the examples in a Fisher-Yates permutation drawn from a SplitMix64 stream
//! keyed by (seed, e), so the whole order is a function of the seed and the sampler's state is
//! just (epoch, position): saving those two numbers resumes a run exactly.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// SplitMix64 (Steele, Lea and Flood 2014): a 64-bit counter through a mixing function.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output function: a bijective mix of 64 bits.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix64(self.state)
    }

    /// Uniform in `0..n` without modulo bias (Lemire's multiply-shift with rejection).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// The order of epoch `epoch`: a permutation of `0..n`.
pub fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(mix64(seed ^ mix64(epoch.wrapping_add(GOLDEN))));
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// Where a sampler stands: the next example is `permutation(epoch)[position]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    pub position: usize,
}

/// Draws training examples epoch after epoch, each epoch in a fresh seeded order.
#[derive(Clone, Debug)]
pub struct Sampler {
    n: usize,
    seed: u64,
    state: SamplerState,
    order: Vec<usize>,
}

impl Sampler {
    pub fn new(n: usize, seed: u64) -> Result<Self> {
        Sampler::resume(n, seed, SamplerState::default())
    }

    /// A sampler that continues from `state` (as returned by [`Sampler::state`]).
    pub fn resume(n: usize, seed: u64, state: SamplerState) -> Result<Self> {
        if n == 0 {
            bail!("cannot sample from an empty data set");
        }
        if state.position > n {
            bail!(
                "sampler position {} is past the end of a data set of {n} examples \
                 (was the data set changed since the checkpoint?)",
                state.position
            );
        }
        Ok(Sampler {
            n,
            seed,
            state,
            order: permutation(n, seed, state.epoch),
        })
    }

    pub fn state(&self) -> SamplerState {
        self.state
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn next_index(&mut self) -> usize {
        if self.state.position == self.n {
            self.state = SamplerState {
                epoch: self.state.epoch + 1,
                position: 0,
            };
            self.order = permutation(self.n, self.seed, self.state.epoch);
        }
        let i = self.order[self.state.position];
        self.state.position += 1;
        i
    }

    /// The next `size` indices; a batch that crosses an epoch boundary continues into the next
    /// epoch's order.
    pub fn next_batch(&mut self, size: usize) -> Vec<usize> {
        (0..size).map(|_| self.next_index()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // First outputs of SplitMix64 seeded with 0 (the reference C implementation).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(r.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut r = SplitMix64::new(42);
        let mut hist = [0u32; 7];
        for _ in 0..70_000 {
            hist[r.below(7) as usize] += 1;
        }
        for h in hist {
            assert!((9_000..11_000).contains(&h), "{hist:?}");
        }
    }

    #[test]
    fn permutations_are_permutations() {
        for n in [0, 1, 2, 17] {
            let mut p = permutation(n, 3, 1);
            p.sort_unstable();
            assert_eq!(p, (0..n).collect::<Vec<_>>());
        }
        assert_ne!(permutation(50, 1, 0), permutation(50, 1, 1));
        assert_ne!(permutation(50, 1, 0), permutation(50, 2, 0));
    }

    #[test]
    fn every_order_is_equally_likely() {
        // All 6 orders of 3 examples over 6000 seeds: 1000 each expected, sd about 29. An
        // off-by-one shuffle (Sattolo's) only ever gives the 2 cyclic orders.
        let mut counts = std::collections::HashMap::new();
        for seed in 0..6000 {
            *counts.entry(permutation(3, seed, 0)).or_insert(0u32) += 1;
        }
        assert_eq!(counts.len(), 6, "{counts:?}");
        for c in counts.values() {
            assert!((880..1120).contains(c), "{counts:?}");
        }
    }
}
