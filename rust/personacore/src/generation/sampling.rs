//! Next-token choice: greedy, or temperature / top-k / top-p sampling from a seeded RNG.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
}

impl SamplingParams {
    /// Rejects settings that mean nothing.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::input(format!("temperature must be finite and >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::input(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

/// A per-sequence sampler with its own RNG, so a seed reproduces a sequence whatever the batch.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded with `seed`.
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self { params, rng: StdRng::seed_from_u64(seed) }
    }

    /// Picks a token from `logits` (`[vocab]`).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut weights = vec![0f32; logits.len()];
        personacore_kernels::activations::exp_shifted(logits, max, t, &mut weights);
        let mut cands: Vec<(u32, f32)> = weights.into_iter().enumerate().map(|(i, w)| (i as u32, w)).collect();
        let filter = self.params.top_k > 0 || self.params.top_p < 1.0;
        if filter {
            sort_head(&mut cands, self.params.top_k, self.params.top_p);
            if self.params.top_k > 0 {
                cands.truncate(self.params.top_k.max(1));
            }
            if self.params.top_p < 1.0 {
                let total: f32 = cands.iter().map(|c| c.1).sum();
                let mut acc = 0.0;
                let mut keep = cands.len();
                for (i, c) in cands.iter().enumerate() {
                    acc += c.1 / total;
                    if acc >= self.params.top_p {
                        keep = i + 1;
                        break;
                    }
                }
                cands.truncate(keep);
            }
        }
        let total: f32 = cands.iter().map(|c| c.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(id, p) in &cands {
            if r < p {
                return id;
            }
            r -= p;
        }
        cands.last().map_or(0, |c| c.0)
    }
}

/// Sorts (descending by weight) just the head of `cands` that top-k / top-p can keep: the `k` largest,
/// or, for top-p alone, the smallest head whose mass reaches `top_p` (found by partial selection of
/// growing heads; the full sort is the fallback). Items after the head are left unsorted.
fn sort_head(cands: &mut [(u32, f32)], top_k: usize, top_p: f32) {
    let by_weight = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
    let n = cands.len();
    if top_k > 0 && top_k < n {
        cands.select_nth_unstable_by(top_k - 1, by_weight);
        cands[..top_k].sort_unstable_by(by_weight);
        return;
    }
    let total: f32 = cands.iter().map(|c| c.1).sum();
    let mut head = 256;
    while head < n {
        cands.select_nth_unstable_by(head - 1, by_weight);
        let mass: f32 = cands[..head].iter().map(|c| c.1).sum();
        if mass >= top_p * total {
            cands[..head].sort_unstable_by(by_weight);
            return;
        }
        head *= 4;
    }
    cands.sort_unstable_by(by_weight);
}

/// Index of the largest value (first on ties, like torch.argmax).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1f32, 2.0, 1.9, -1.0];
        let greedy = SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0 };
        assert_eq!(Sampler::new(greedy, 0).sample(&logits), 1);
        let p = SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0 };
        let draw = |seed| {
            (0..32)
                .map(|_| 0)
                .scan(Sampler::new(p.clone(), seed), |s, _: i32| Some(s.sample(&logits)))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let top1 = SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 1 };
        let mut s = Sampler::new(top1, 3);
        assert!((0..20).all(|_| s.sample(&logits) == 1));
        let nucleus = SamplingParams { temperature: 1.0, top_p: 0.5, top_k: 0 };
        let mut s = Sampler::new(nucleus, 3);
        assert!((0..50).all(|_| matches!(s.sample(&logits), 1 | 2)));
    }

    #[test]
    fn partial_head_sort_equals_a_full_sort() {
        // a long-tailed distribution over 5000 tokens: the nucleus needs more than the first head
        let weights: Vec<f32> = (0..5000).map(|i| 1.0 / (1.0 + ((i * 7919) % 5000) as f32)).collect();
        let cands: Vec<(u32, f32)> = weights.iter().enumerate().map(|(i, &w)| (i as u32, w)).collect();
        let mut full = cands.clone();
        full.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let total: f32 = weights.iter().sum();
        for (k, p) in [(0, 0.5f32), (0, 0.95), (0, 1.0), (10, 1.0), (300, 0.9)] {
            let mut head = cands.clone();
            sort_head(&mut head, k, p);
            // the part sampling reads (top-k, or the nucleus) is exactly the fully sorted prefix
            let needed = if k > 0 {
                k
            } else {
                let mut acc = 0.0;
                full.iter()
                    .position(|c| {
                        acc += c.1;
                        acc >= p * total
                    })
                    .map_or(full.len(), |i| i + 1)
            };
            assert_eq!(&head[..needed], &full[..needed], "k={k} p={p}");
            assert_eq!(head.len(), full.len());
        }
    }
}
