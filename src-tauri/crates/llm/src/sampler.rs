//! Turning logits into the next token: penalties, temperature, top-k, top-p,
//! min-p, and a seeded RNG so a run can be repeated exactly.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Sampling settings. The defaults are the seed recipe's: temperature 0.7,
/// top-k 50, top-p 0.95.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplerConfig {
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep the k most likely tokens (0 keeps all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1 keeps all).
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one (0 keeps all).
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of recent tokens (1 is off).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every recent token (0 is off).
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of recent tokens (0 is off).
    pub frequency_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub penalty_window: usize,
    /// Random seed; the same seed and inputs give the same tokens.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_k: 50,
            top_p: 0.95,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_window: 64,
            seed: 299_792_458,
        }
    }
}

impl SamplerConfig {
    /// Always the most likely token, no penalties.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            ..Self::default()
        }
    }
}

/// A sampler with its own RNG state.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `cfg.seed`.
    pub fn new(cfg: SamplerConfig) -> Self {
        let rng = StdRng::seed_from_u64(cfg.seed);
        Self { cfg, rng }
    }

    /// Its settings.
    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Applies the repetition, presence and frequency penalties for the last
    /// `penalty_window` tokens of `history` to `logits`, in place.
    pub fn apply_penalties(&self, logits: &mut [f32], history: &[u32]) {
        let c = &self.cfg;
        if c.repetition_penalty == 1.0 && c.presence_penalty == 0.0 && c.frequency_penalty == 0.0 {
            return;
        }
        let window = &history[history.len().saturating_sub(c.penalty_window)..];
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in window {
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &n) in &counts {
            let Some(l) = logits.get_mut(t as usize) else {
                continue;
            };
            if c.repetition_penalty != 1.0 {
                *l = if *l > 0.0 {
                    *l / c.repetition_penalty
                } else {
                    *l * c.repetition_penalty
                };
            }
            *l -= c.presence_penalty + c.frequency_penalty * n as f32;
        }
    }

    /// The tokens that may be drawn and their probabilities (summing to 1),
    /// most likely first, after penalties, temperature, top-k, top-p and min-p.
    pub fn distribution(&self, logits: &[f32], history: &[u32]) -> Vec<(u32, f32)> {
        let c = &self.cfg;
        let mut logits = logits.to_vec();
        self.apply_penalties(&mut logits, history);
        if c.temperature <= 0.0 {
            return vec![(argmax(&logits), 1.0)];
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / c.temperature))
            .collect();
        if cand.is_empty() {
            return vec![(0, 1.0)];
        }
        // Only the top k need ordering; partial selection keeps this O(n).
        if c.top_k > 0 && c.top_k < cand.len() {
            cand.select_nth_unstable_by(c.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            cand.truncate(c.top_k);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let max = cand[0].1;
        let mut sum = 0.0f32;
        for e in &mut cand {
            e.1 = (e.1 - max).exp();
            sum += e.1;
        }
        for e in &mut cand {
            e.1 /= sum;
        }
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (i, e) in cand.iter().enumerate() {
                acc += e.1;
                if acc >= c.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        if c.min_p > 0.0 {
            let cut = cand[0].1 * c.min_p;
            cand.retain(|e| e.1 >= cut);
        }
        let total: f32 = cand.iter().map(|e| e.1).sum();
        for e in &mut cand {
            e.1 /= total;
        }
        cand
    }

    /// Draws the next token.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let dist = self.distribution(logits, history);
        if dist.len() == 1 {
            return dist[0].0;
        }
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for &(t, p) in &dist {
            acc += p;
            if r < acc {
                return t;
            }
        }
        dist.last().map_or(0, |e| e.0)
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits_for(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    fn cfg() -> SamplerConfig {
        SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            ..SamplerConfig::default()
        }
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9], &[]), 1);
    }

    #[test]
    fn top_p_keeps_exactly_the_nucleus() {
        let l = logits_for(&[0.05, 0.5, 0.15, 0.3]);
        let s = Sampler::new(SamplerConfig {
            top_p: 0.8,
            ..cfg()
        });
        let d = s.distribution(&l, &[]);
        let ids: Vec<u32> = d.iter().map(|e| e.0).collect();
        assert_eq!(ids, [1, 3], "0.5 + 0.3 reaches 0.8");
        assert!((d[0].1 - 0.5 / 0.8).abs() < 1e-5);
        let s = Sampler::new(SamplerConfig {
            top_p: 0.81,
            ..cfg()
        });
        assert_eq!(
            s.distribution(&l, &[]).len(),
            3,
            "0.81 needs the third token"
        );
    }

    #[test]
    fn min_p_cuts_relative_to_the_top_token() {
        let l = logits_for(&[0.5, 0.3, 0.12, 0.08]);
        let s = Sampler::new(SamplerConfig {
            min_p: 0.2,
            ..cfg()
        });
        let ids: Vec<u32> = s.distribution(&l, &[]).iter().map(|e| e.0).collect();
        assert_eq!(ids, [0, 1, 2], "0.08 < 0.2 × 0.5 is cut, 0.12 stays");
    }

    #[test]
    fn top_k_and_temperature() {
        let l = logits_for(&[0.4, 0.3, 0.2, 0.1]);
        let s = Sampler::new(SamplerConfig { top_k: 2, ..cfg() });
        let d = s.distribution(&l, &[]);
        assert_eq!(d.len(), 2);
        assert!((d[0].1 - 0.4 / 0.7).abs() < 1e-5);
        let cold = Sampler::new(SamplerConfig {
            temperature: 0.5,
            ..cfg()
        })
        .distribution(&l, &[]);
        let hot = Sampler::new(SamplerConfig {
            temperature: 2.0,
            ..cfg()
        })
        .distribution(&l, &[]);
        assert!(
            cold[0].1 > 0.4 && hot[0].1 < 0.4,
            "low temperature sharpens, high flattens"
        );
    }

    #[test]
    fn penalties_lower_recent_tokens() {
        let base = [2.0f32, 2.0, -1.0, 0.5];
        let mut l = base;
        Sampler::new(SamplerConfig {
            repetition_penalty: 2.0,
            ..cfg()
        })
        .apply_penalties(&mut l, &[0, 2]);
        assert_eq!(l, [1.0, 2.0, -2.0, 0.5]);
        let mut l = base;
        Sampler::new(SamplerConfig {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..cfg()
        })
        .apply_penalties(&mut l, &[1, 1, 1, 3]);
        assert_eq!(l, [2.0, 2.0 - 0.5 - 0.75, -1.0, 0.5 - 0.5 - 0.25]);
        let mut l = base;
        Sampler::new(SamplerConfig {
            presence_penalty: 1.0,
            penalty_window: 1,
            ..cfg()
        })
        .apply_penalties(&mut l, &[0, 3]);
        assert_eq!(l, [2.0, 2.0, -1.0, -0.5], "only the window counts");
    }

    #[test]
    fn a_seed_repeats_and_frequencies_follow_the_distribution() {
        let l = logits_for(&[0.6, 0.3, 0.1]);
        let draw = |seed| {
            let mut s = Sampler::new(SamplerConfig { seed, ..cfg() });
            (0..4000).map(|_| s.sample(&l, &[])).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        let share = |t| a.iter().filter(|&&x| x == t).count() as f32 / a.len() as f32;
        assert!(
            (share(0) - 0.6).abs() < 0.03 && (share(2) - 0.1).abs() < 0.02,
            "{} {}",
            share(0),
            share(2)
        );
    }

    #[test]
    fn masked_logits_are_never_drawn() {
        let mut s = Sampler::new(cfg());
        let l = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        assert!((0..100).all(|_| s.sample(&l, &[]) == 1));
    }
}
