//! Next-token choice: greedy, or temperature / top-k / top-p sampling from a seeded RNG, after the
//! OpenAI adjustments of the logits (`logit_bias`, presence and frequency penalties); and the
//! log-probabilities a caller asked for ([`token_logprobs`]).

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// The largest `|logit_bias|` value (OpenAI's range).
pub const MAX_LOGIT_BIAS: f32 = 100.0;
/// The largest `|presence_penalty|` and `|frequency_penalty|` (OpenAI's range).
pub const MAX_PENALTY: f32 = 2.0;
/// The most top log-probabilities a step reports (OpenAI's `top_logprobs` bound).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Sampling settings. The default is greedy with no adjustment.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Subtracted once from the logit of every token already generated (OpenAI's formula).
    pub presence_penalty: f32,
    /// Subtracted from the logit of every generated token once per time it was generated.
    pub frequency_penalty: f32,
    /// `(token id, value)` added to that token's logit before anything else (ids are checked
    /// against the vocabulary by the session).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
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
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(v.is_finite() && v.abs() <= MAX_PENALTY) {
                return Err(Error::input(format!("{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {v}")));
            }
        }
        for &(id, v) in &self.logit_bias {
            if !(v.is_finite() && v.abs() <= MAX_LOGIT_BIAS) {
                return Err(Error::input(format!(
                    "logit_bias of token {id} must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {v}"
                )));
            }
        }
        Ok(())
    }

    /// Whether the logits are changed before the choice.
    fn adjusts(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || !self.logit_bias.is_empty()
    }
}

/// A per-sequence sampler with its own RNG, so a seed reproduces a sequence whatever the batch.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token was chosen so far (kept only when a penalty is set).
    counts: HashMap<u32, u32>,
    /// The adjusted logits of the current choice.
    scratch: Vec<f32>,
}

impl Sampler {
    /// A sampler seeded with `seed`.
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self { params, rng: StdRng::seed_from_u64(seed), counts: HashMap::new(), scratch: Vec::new() }
    }

    /// Picks a token from `logits` (`[vocab]`), after `logit_bias` and the penalties (OpenAI's
    /// `logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty`, counts of
    /// the tokens this sampler chose before).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if !self.params.adjusts() {
            return self.choose(logits);
        }
        let mut adjusted = std::mem::take(&mut self.scratch);
        adjusted.clear();
        adjusted.extend_from_slice(logits);
        for &(id, bias) in &self.params.logit_bias {
            if let Some(x) = adjusted.get_mut(id as usize) {
                *x += bias;
            }
        }
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        for (&id, &n) in &self.counts {
            if let Some(x) = adjusted.get_mut(id as usize) {
                *x -= n as f32 * frequency + presence;
            }
        }
        let tok = self.choose(&adjusted);
        self.scratch = adjusted;
        if presence != 0.0 || frequency != 0.0 {
            *self.counts.entry(tok).or_insert(0) += 1;
        }
        tok
    }

    /// Greedy or sampled choice from final `logits`.
    fn choose(&mut self, logits: &[f32]) -> u32 {
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

/// The log-probability of the chosen token and the most likely tokens of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The token chosen.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The `k` most likely tokens and their log-probabilities, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax of `logits` at `token`, and the `top` most likely tokens. These are the model's own
/// log-probabilities (steering included): before temperature, top-k/top-p, penalties and
/// `logit_bias`, like vLLM's default (`raw_logprobs`). The normaliser is summed in f64.
pub fn token_logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut weights = vec![0f32; logits.len()];
    personacore_kernels::activations::exp_shifted(logits, max, 1.0, &mut weights);
    let sum: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    let log_z = f64::from(max) + sum.ln();
    let logprob = |x: f32| (f64::from(x) - log_z) as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    for (i, &x) in logits.iter().enumerate().filter(|_| top > 0) {
        if best.len() == top && best.last().is_some_and(|&(_, low)| x <= low) {
            continue; // not above the k-th (an equal later id ranks after it)
        }
        let at = best.partition_point(|&(_, v)| v >= x);
        best.insert(at, (i as u32, x));
        best.truncate(top);
    }
    TokenLogprobs {
        token,
        logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |&x| logprob(x)),
        top: best.into_iter().map(|(i, x)| (i, logprob(x))).collect(),
    }
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
        let greedy = SamplingParams::default();
        assert_eq!(Sampler::new(greedy, 0).sample(&logits), 1);
        let p = SamplingParams { temperature: 1.0, ..Default::default() };
        let draw = |seed| {
            (0..32)
                .map(|_| 0)
                .scan(Sampler::new(p.clone(), seed), |s, _: i32| Some(s.sample(&logits)))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let top1 = SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() };
        let mut s = Sampler::new(top1, 3);
        assert!((0..20).all(|_| s.sample(&logits) == 1));
        let nucleus = SamplingParams { temperature: 1.0, top_p: 0.5, ..Default::default() };
        let mut s = Sampler::new(nucleus, 3);
        assert!((0..50).all(|_| matches!(s.sample(&logits), 1 | 2)));
    }

    #[test]
    fn logit_bias_and_penalties_follow_the_openai_formula() {
        let logits = [3.0f32, 2.5, 2.0, -1.0];
        // a bias moves the greedy choice; an out-of-range bias is refused
        let biased = SamplingParams { logit_bias: vec![(3, 5.0)], ..Default::default() };
        assert_eq!(Sampler::new(biased, 0).sample(&logits), 3);
        let bad = SamplingParams { logit_bias: vec![(0, 101.0)], ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("logit_bias of token 0"));
        let nan = SamplingParams { frequency_penalty: f32::NAN, ..Default::default() };
        assert!(nan.validate().unwrap_err().to_string().contains("frequency_penalty"));
        // frequency 0.4: token 0 drops by 0.4 per time chosen, so greedy runs 0, 0, 1 (3.0 - 0.8 < 2.5)
        let freq = SamplingParams { frequency_penalty: 0.4, ..Default::default() };
        let mut s = Sampler::new(freq, 0);
        assert_eq!([s.sample(&logits), s.sample(&logits), s.sample(&logits)], [0, 0, 1]);
        // presence 0.6: once chosen, a token drops by 0.6 however often: 0 (3.0), 1 (2.5 > 2.4),
        // then 0 for good (2.4 > 2.0 > 1.9; a frequency penalty would keep lowering it)
        let pres = SamplingParams { presence_penalty: 0.6, ..Default::default() };
        let mut s = Sampler::new(pres, 0);
        assert_eq!((0..4).map(|_| s.sample(&logits)).collect::<Vec<_>>(), [0, 1, 0, 0]);
    }

    #[test]
    fn token_logprobs_are_the_log_softmax() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919 % 1000) as f32 / 97.0).sin() * 8.0).collect();
        let lse = {
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, |a, b| a.max(f64::from(b)));
            m + logits.iter().map(|&x| (f64::from(x) - m).exp()).sum::<f64>().ln()
        };
        let lp = token_logprobs(&logits, 17, 5);
        assert!((f64::from(lp.logprob) - (f64::from(logits[17]) - lse)).abs() < 1e-5);
        let mut order: Vec<u32> = (0..1000).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), order[..5]);
        for &(id, v) in &lp.top {
            assert!((f64::from(v) - (f64::from(logits[id as usize]) - lse)).abs() < 1e-5);
        }
        let total: f64 = logits.iter().map(|&x| (f64::from(x) - lse).exp()).sum();
        assert!((total - 1.0).abs() < 1e-9);
        // ties rank by id; top 0 is the token alone
        let flat = token_logprobs(&[1.0, 2.0, 2.0, 2.0], 0, 2);
        assert_eq!(flat.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        assert!(token_logprobs(&logits, 3, 0).top.is_empty());
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
