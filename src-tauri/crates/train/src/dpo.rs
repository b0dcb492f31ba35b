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

use candle_core::{D, DType, Tensor};
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

/// One DPO pass: the loss and what is logged, and the LoRA gradients.
#[derive(Debug)]
pub struct DpoStep {
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
    /// The gradients of the policy adapter's slots.
    pub grads: LossGrads,
}

/// Each row's summed log-probability of its masked targets (an inference
/// forward, no gradients), with `lora` or the base alone.
pub fn sequence_logps(model: &Phi, b: &DpoBatch, lora: Option<&LoraAdapter>) -> Result<Vec<f64>> {
    let logits = model.forward(&b.tokens, None, dramatis_llm::Logits::All, lora)?;
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let picked = logp
        .gather(&b.targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let sums = (picked * b.mask.to_dtype(DType::F32)?)?.sum(1)?;
    Ok(sums.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
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

/// The pair terms from the four sums: (loss, margin, accuracy, chosen reward,
/// rejected reward, per-pair `dL/dS_c` coefficient).
fn pair_terms(policy: &[f64], reference: &[f64], beta: f64) -> (f64, f64, f64, f64, f64, Vec<f64>) {
    let k = policy.len() / 2;
    let (mut loss, mut margin, mut acc, mut rc, mut rr) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let mut coef = Vec::with_capacity(k);
    for i in 0..k {
        let chosen = beta * (policy[i] - reference[i]);
        let rejected = beta * (policy[k + i] - reference[k + i]);
        let z = chosen - rejected;
        loss += neg_log_sigmoid(z);
        margin += z;
        acc += f64::from(u8::from(z > 0.0));
        rc += chosen;
        rr += rejected;
        coef.push(-beta * sigmoid(-z));
    }
    let n = k.max(1) as f64;
    (loss / n, margin / n, acc / n, rc / n, rr / n, coef)
}

/// The DPO loss alone (forward passes only), for checks and evaluation.
pub fn dpo_loss(
    model: &Phi,
    policy: &LoraAdapter,
    reference: Option<&LoraAdapter>,
    b: &DpoBatch,
    cfg: DpoConfig,
) -> Result<f64> {
    let p = sequence_logps(model, b, Some(policy))?;
    let r = sequence_logps(model, b, reference)?;
    let (mut loss, ..) = pair_terms(&p, &r, cfg.beta);
    if cfg.sft_weight != 0.0 {
        let (k, chosen_tokens) = chosen_token_count(b)?;
        let ce: f64 = p[..k].iter().sum::<f64>();
        loss += cfg.sft_weight * (-ce / chosen_tokens.max(1.0));
    }
    Ok(loss)
}

fn chosen_token_count(b: &DpoBatch) -> Result<(usize, f64)> {
    let rows = b.mask.dims()[0];
    let k = rows / 2;
    let n = f64::from(
        b.mask
            .narrow(0, 0, k)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?,
    );
    Ok((k, n))
}

/// One DPO pass over `b`: the policy's and the reference's sequence
/// log-probabilities, then one backward pass with each reply token weighted
/// by its pair's gradient coefficient.
pub fn dpo_loss_and_grads(
    model: &Phi,
    policy: &LoraAdapter,
    reference: Option<&LoraAdapter>,
    b: &DpoBatch,
    cfg: DpoConfig,
    dtype: DType,
    checkpointing: bool,
) -> Result<DpoStep> {
    let rows = b.tokens.dims()[0];
    if rows == 0 || !rows.is_multiple_of(2) {
        return Err(crate::Error::Config(format!(
            "a DPO batch needs chosen and rejected rows in pairs, not {rows} rows"
        )));
    }
    let p = sequence_logps(model, b, Some(policy))?;
    let r = sequence_logps(model, b, reference)?;
    let (mut loss, margin, accuracy, chosen_reward, rejected_reward, coef) =
        pair_terms(&p, &r, cfg.beta);
    let k = rows / 2;
    let n = k as f64;
    // The loss is −Σ w·log p: w = −dL/dS per row, spread over its reply tokens.
    let mut row_w: Vec<f64> = coef.iter().map(|c| -c / n).collect();
    row_w.extend(coef.iter().map(|c| c / n));
    if cfg.sft_weight != 0.0 {
        let (_, chosen_tokens) = chosen_token_count(b)?;
        let per = cfg.sft_weight / chosen_tokens.max(1.0);
        for w in &mut row_w[..k] {
            *w += per;
        }
        loss += cfg.sft_weight * (-p[..k].iter().sum::<f64>() / chosen_tokens.max(1.0));
    }
    let row_w: Vec<f32> = row_w.into_iter().map(|w| w as f32).collect();
    let device = b.mask.device();
    let weights = b
        .mask
        .to_dtype(DType::F32)?
        .broadcast_mul(&Tensor::from_vec(row_w, (rows, 1), device)?)?;
    let grads = model.lora_weighted_grads(
        &b.tokens,
        &b.targets,
        &weights,
        1.0,
        policy,
        dtype,
        checkpointing,
    )?;
    Ok(DpoStep {
        loss,
        margin,
        accuracy,
        chosen_reward,
        rejected_reward,
        grads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pair_terms_follow_the_formula() {
        // Policy sums (chosen, then rejected) and the reference's.
        let (loss, margin, acc, rc, rr, coef) =
            pair_terms(&[-5.0, -9.0, -7.0, -6.0], &[-6.0, -8.0, -6.0, -8.0], 0.5);
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
        let (l0, m0, ..) = pair_terms(&[-3.0, -4.0], &[-3.0, -4.0], 0.1);
        assert!((l0 - std::f64::consts::LN_2).abs() < 1e-12 && m0 == 0.0);
        assert!(neg_log_sigmoid(-800.0).is_finite() && neg_log_sigmoid(800.0) >= 0.0);
    }
}
