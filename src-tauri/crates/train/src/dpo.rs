//! Direct preference optimization: the sigmoid DPO loss over the same
//! hand-written passes as the SFT loss.
//!
//! For a pair, with `S` the summed log-probability of the reply tokens,
//! `z = β·((S_c − S_c,ref) − (S_r − S_r,ref))` and `L = −log σ(z)`.
//! `dL/dS_c = −β·σ(−z)` and `dL/dS_r = +β·σ(−z)`, and `dS/dlogits` is the
//! cross-entropy gradient of the reply tokens; so the backward pass is the
//! SFT pass with each reply token weighted by its sequence's coefficient.
//! The reference is the same base with the adapter as training started (no
//! adapter for a fresh one): a second forward, never a second model.
//!
//! Invariants: rows `0..k` of a batch are the chosen replies and rows
//! `k..2k` the rejected ones of the same pairs; only positions with a
//! non-zero mask (the reply tokens) count, in the loss and the gradient.

use candle_core::{DType, Tensor};
use dramatis_llm::{LoraAdapter, LossGrads, Phi};

use crate::Result;

/// A batch of `k` pairs: `2k` rows of inputs, next-token targets and a 0/1
/// mask on the reply tokens, chosen rows first.
#[derive(Debug, Clone)]
pub struct DpoBatch {
    /// `[2k, seq]` u32.
    pub tokens: Tensor,
    /// `[2k, seq]` u32.
    pub targets: Tensor,
    /// `[2k, seq]` f32, 1 on reply tokens.
    pub mask: Tensor,
}

/// The DPO settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoConfig {
    /// How far the policy may move from the reference (TRL's default 0.1).
    pub beta: f64,
    /// Weight of an added cross-entropy term on the chosen replies (0: off).
    pub sft_weight: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            sft_weight: 0.0,
        }
    }
}

/// What a DPO pass measures, averaged over its pairs.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DpoMetrics {
    /// The mean DPO loss (plus the SFT term when on).
    pub loss: f64,
    /// Mean `z`: chosen reward minus rejected reward.
    pub margin: f64,
    /// Share of pairs whose chosen reward is above the rejected one.
    pub accuracy: f64,
    /// Mean `β·(S_c − S_c,ref)`.
    pub chosen_reward: f64,
    /// Mean `β·(S_r − S_r,ref)`.
    pub rejected_reward: f64,
}

/// One DPO pass: what it measured, and the LoRA gradients.
#[derive(Debug)]
pub struct DpoStep {
    /// Loss, margin, accuracy, rewards.
    pub metrics: DpoMetrics,
    /// The gradients of the policy adapter's slots.
    pub grads: LossGrads,
}

/// Each row's summed log-probability of its masked targets, from per-position
/// log-probabilities `[rows, seq]`.
fn masked_sums(logps: &Tensor, mask: &Tensor) -> Result<Vec<f64>> {
    let sums = (logps * mask.to_dtype(DType::F32)?)?.sum(1)?;
    Ok(sums.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
}

/// Each row's summed log-probability of its masked targets (a forward pass
/// that keeps nothing for a backward one), with `lora` or the base alone.
pub fn sequence_logps(
    model: &Phi,
    b: &DpoBatch,
    lora: Option<&LoraAdapter>,
    dtype: DType,
) -> Result<Vec<f64>> {
    let logps = model.score_targets(&b.tokens, &b.targets, lora, dtype)?;
    masked_sums(&logps, &b.mask)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `−log σ(x)`, stable for large |x|.
fn neg_log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        (-x).exp().ln_1p()
    } else {
        -x + x.exp().ln_1p()
    }
}

/// The pair terms from the policy's and the reference's sums (chosen rows
/// first): the metrics without the SFT term, and each pair's `dL/dS_c`.
fn pair_terms(policy: &[f64], reference: &[f64], beta: f64) -> (DpoMetrics, Vec<f64>) {
    let k = policy.len() / 2;
    let mut m = DpoMetrics::default();
    let mut coef = Vec::with_capacity(k);
    for i in 0..k {
        let chosen = beta * (policy[i] - reference[i]);
        let rejected = beta * (policy[k + i] - reference[k + i]);
        let z = chosen - rejected;
        m.loss += neg_log_sigmoid(z);
        m.margin += z;
        m.accuracy += f64::from(u8::from(z > 0.0));
        m.chosen_reward += chosen;
        m.rejected_reward += rejected;
        coef.push(-beta * sigmoid(-z));
    }
    let n = k.max(1) as f64;
    m.loss /= n;
    m.margin /= n;
    m.accuracy /= n;
    m.chosen_reward /= n;
    m.rejected_reward /= n;
    (m, coef)
}

fn check_rows(b: &DpoBatch, reference: &[f64]) -> Result<usize> {
    let rows = b.tokens.dims()[0];
    if rows == 0 || !rows.is_multiple_of(2) || reference.len() != rows {
        return Err(crate::Error::Config(format!(
            "a DPO batch needs chosen and rejected rows in pairs and a reference \
             sum for each, not {rows} rows and {} sums",
            reference.len()
        )));
    }
    Ok(rows)
}

impl DpoMetrics {
    /// The field-by-field mean of `items` (zero for none).
    pub fn mean(items: &[DpoMetrics]) -> DpoMetrics {
        let n = items.len().max(1) as f64;
        let sum = |f: fn(&DpoMetrics) -> f64| items.iter().map(f).sum::<f64>() / n;
        DpoMetrics {
            loss: sum(|m| m.loss),
            margin: sum(|m| m.margin),
            accuracy: sum(|m| m.accuracy),
            chosen_reward: sum(|m| m.chosen_reward),
            rejected_reward: sum(|m| m.rejected_reward),
        }
    }
}

/// The SFT term's weight per chosen-reply token, and its loss from the
/// policy's sums `p` (chosen rows first).
fn sft_term(b: &DpoBatch, p: &[f64], weight: f64) -> Result<(f64, f64)> {
    let k = p.len() / 2;
    let tokens = chosen_tokens(b, k)?;
    Ok((
        weight / tokens,
        weight * (-p[..k].iter().sum::<f64>() / tokens),
    ))
}

/// Tokens of the chosen replies (the SFT term's denominator).
fn chosen_tokens(b: &DpoBatch, k: usize) -> Result<f64> {
    let n = b
        .mask
        .narrow(0, 0, k)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(f64::from(n).max(1.0))
}

/// The metrics of `policy` on `b` against the reference's sums (forward
/// passes only), for evaluation and checks.
pub fn dpo_eval(
    model: &Phi,
    policy: &LoraAdapter,
    reference: &[f64],
    b: &DpoBatch,
    cfg: DpoConfig,
    dtype: DType,
) -> Result<DpoMetrics> {
    check_rows(b, reference)?;
    let p = sequence_logps(model, b, Some(policy), dtype)?;
    let (mut m, _) = pair_terms(&p, reference, cfg.beta);
    if cfg.sft_weight != 0.0 {
        m.loss += sft_term(b, &p, cfg.sft_weight)?.1;
    }
    Ok(m)
}

/// The DPO loss alone, with the reference's sums computed here.
pub fn dpo_loss(
    model: &Phi,
    policy: &LoraAdapter,
    reference: Option<&LoraAdapter>,
    b: &DpoBatch,
    cfg: DpoConfig,
    dtype: DType,
) -> Result<f64> {
    let r = sequence_logps(model, b, reference, dtype)?;
    Ok(dpo_eval(model, policy, &r, b, cfg, dtype)?.loss)
}

/// One DPO pass over `b` against the reference's per-row sums: one forward
/// pass of the policy, its sequence log-probabilities read from that pass,
/// then one backward pass with each reply token weighted by its pair's
/// gradient coefficient.
pub fn dpo_step(
    model: &Phi,
    policy: &LoraAdapter,
    reference: &[f64],
    b: &DpoBatch,
    cfg: DpoConfig,
    dtype: DType,
    checkpointing: bool,
) -> Result<DpoStep> {
    let rows = check_rows(b, reference)?;
    let fwd = model.lora_train_forward(&b.tokens, policy, dtype, checkpointing)?;
    let p = masked_sums(&model.target_logps(&fwd.hidden, &b.targets)?, &b.mask)?;
    let (mut metrics, coef) = pair_terms(&p, reference, cfg.beta);
    let k = rows / 2;
    let n = k as f64;
    // The loss is −Σ w·log p: w = −dL/dS per row, spread over its reply tokens.
    let mut row_w: Vec<f64> = coef.iter().map(|c| -c / n).collect();
    row_w.extend(coef.iter().map(|c| c / n));
    if cfg.sft_weight != 0.0 {
        let (per_token, loss) = sft_term(b, &p, cfg.sft_weight)?;
        for w in &mut row_w[..k] {
            *w += per_token;
        }
        metrics.loss += loss;
    }
    let row_w: Vec<f32> = row_w.into_iter().map(|w| w as f32).collect();
    let weights = b
        .mask
        .to_dtype(DType::F32)?
        .broadcast_mul(&Tensor::from_vec(row_w, (rows, 1), b.mask.device())?)?;
    let grads = model.lora_backward(fwd, &b.targets, &weights, 1.0, policy)?;
    Ok(DpoStep { metrics, grads })
}

/// [`dpo_step`] with the reference's sums computed here (`None`: the base alone).
pub fn dpo_loss_and_grads(
    model: &Phi,
    policy: &LoraAdapter,
    reference: Option<&LoraAdapter>,
    b: &DpoBatch,
    cfg: DpoConfig,
    dtype: DType,
    checkpointing: bool,
) -> Result<DpoStep> {
    let r = sequence_logps(model, b, reference, dtype)?;
    dpo_step(model, policy, &r, b, cfg, dtype, checkpointing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pair_terms_follow_the_formula() {
        // Policy sums (chosen, then rejected) and the reference's.
        let (m, coef) = pair_terms(&[-5.0, -9.0, -7.0, -6.0], &[-6.0, -8.0, -6.0, -8.0], 0.5);
        let (loss, margin, acc, rc, rr) = (
            m.loss,
            m.margin,
            m.accuracy,
            m.chosen_reward,
            m.rejected_reward,
        );
        // z = 0.5·((−5+6) − (−7+6)) = 1, and 0.5·((−9+8) − (−6+8)) = −1.5.
        let expect = (neg_log_sigmoid(1.0) + neg_log_sigmoid(-1.5)) / 2.0;
        assert!((loss - expect).abs() < 1e-12);
        assert!((margin - (-0.25)).abs() < 1e-12);
        assert_eq!(acc, 0.5);
        // Chosen rewards 0.5·1 and 0.5·(−1); rejected 0.5·(−1) and 0.5·2.
        assert!(rc.abs() < 1e-12);
        assert!((rr - 0.25).abs() < 1e-12);
        assert!((coef[0] + 0.5 * sigmoid(-1.0)).abs() < 1e-12);
        // At the reference (fresh adapter) the loss is log 2, the margin 0.
        let (m0, _) = pair_terms(&[-3.0, -4.0], &[-3.0, -4.0], 0.1);
        assert!((m0.loss - std::f64::consts::LN_2).abs() < 1e-12 && m0.margin == 0.0);
        assert!(neg_log_sigmoid(-800.0).is_finite() && neg_log_sigmoid(800.0) >= 0.0);
    }
}
