//! AdamW over the LoRA weights, with f32 moments that a checkpoint saves.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::Result;

/// The learning rate over steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// The same rate throughout (the seed recipe).
    Constant,
    /// A linear warmup, then a cosine decay to zero at the last step.
    Cosine {
        /// Warmup steps.
        warmup: usize,
    },
}

impl Schedule {
    /// The rate at `step` (0-based) of `total`.
    pub fn lr(self, base: f64, step: usize, total: usize) -> f64 {
        match self {
            Self::Constant => base,
            Self::Cosine { warmup } => {
                if step < warmup {
                    base * (step + 1) as f64 / warmup as f64
                } else {
                    let span = total.saturating_sub(warmup).max(1) as f64;
                    let t = (step - warmup) as f64 / span;
                    0.5 * base * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
                }
            }
        }
    }
}

/// AdamW (decoupled weight decay), one moment pair per variable.
#[derive(Debug)]
pub struct AdamW {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Updates made so far.
    pub steps: usize,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    /// Zeroed moments for `vars`.
    pub fn new(vars: &[Var], weight_decay: f64) -> Result<Self> {
        Ok(Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            steps: 0,
            m: vars
                .iter()
                .map(|v| v.zeros_like())
                .collect::<candle_core::Result<_>>()?,
            v: vars
                .iter()
                .map(|v| v.zeros_like())
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// One update with `grads` (one per var), clipped to a global norm of
    /// `clip` when given. Returns the norm before clipping.
    pub fn step(
        &mut self,
        vars: &[Var],
        grads: &[Tensor],
        lr: f64,
        clip: Option<f64>,
    ) -> Result<f64> {
        let mut sq = 0f64;
        for g in grads {
            sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
        let norm = sq.sqrt();
        let factor = match clip {
            Some(c) if norm > c => c / (norm + 1e-6),
            _ => 1.0,
        };
        self.steps += 1;
        let t = self.steps as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(t);
        let c2 = 1.0 - b2.powi(t);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let g = (g * factor)?;
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            let theta = var.as_tensor();
            let next = if self.weight_decay > 0.0 {
                ((theta * (1.0 - lr * self.weight_decay))? - (update * lr)?)?
            } else {
                (theta - (update * lr)?)?
            };
            var.set(&next)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(norm)
    }

    /// The moments by name, for a checkpoint.
    pub fn state(&self, names: &[String]) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, n) in names.iter().enumerate() {
            out.insert(format!("{n}.m"), self.m[i].clone());
            out.insert(format!("{n}.v"), self.v[i].clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`].
    pub fn load_state(
        &mut self,
        names: &[String],
        state: &HashMap<String, Tensor>,
        steps: usize,
    ) -> Option<()> {
        for (i, n) in names.iter().enumerate() {
            self.m[i] = state
                .get(&format!("{n}.m"))?
                .to_device(self.m[i].device())
                .ok()?;
            self.v[i] = state
                .get(&format!("{n}.v"))?
                .to_device(self.v[i].device())
                .ok()?;
        }
        self.steps = steps;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_minimizes_a_quadratic_and_clips() {
        let x = Var::new(&[3.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(std::slice::from_ref(&x), 0.0).unwrap();
        for _ in 0..300 {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let grad = g.get(x.as_tensor()).unwrap().clone();
            opt.step(std::slice::from_ref(&x), &[grad], 0.05, Some(1.0))
                .unwrap();
        }
        let v: Vec<f32> = x.as_tensor().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.abs() < 0.05), "{v:?}");
    }

    #[test]
    fn cosine_warms_up_then_decays_to_zero() {
        let s = Schedule::Cosine { warmup: 10 };
        assert!((s.lr(1.0, 0, 110) - 0.1).abs() < 1e-9);
        assert!((s.lr(1.0, 9, 110) - 1.0).abs() < 1e-9);
        assert!((s.lr(1.0, 60, 110) - 0.5).abs() < 1e-9);
        assert!(s.lr(1.0, 110, 110).abs() < 1e-9);
        assert_eq!(Schedule::Constant.lr(2e-4, 50, 100), 2e-4);
    }
}
