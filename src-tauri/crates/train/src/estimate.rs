//! Predicts a run's peak memory and speed before it starts, and says what
//! to change when it will not fit.
//!
//! Memory: the base as loaded, one dequantized matrix at a time, the LoRA
//! weights with their gradients and two AdamW moments (all f32), and the
//! activations autograd keeps for the backward pass. The activation
//! coefficients count the tensors this crate's training forward creates per
//! token and layer: about 101 × hidden floats (norms, projections, LoRA
//! deltas with dropout masks, GELU's intermediates) plus 10 × heads × length
//! for attention (scores, scale, mask, softmax's intermediates, the copies for
//! the value product; 10 rather than the 6 counted, fitted to measured runs), and 3 × vocabulary for the
//! logits and their log-softmax. Speed: about 4 × parameters FLOPs per token
//! (forward, and backward to the inputs; the frozen base needs no weight
//! gradients) plus attention, at the device's measured matmul rate.

use dramatis_llm::PhiConfig;
use serde::{Deserialize, Serialize};

/// What a run will be, for the estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EstimateInput {
    /// The base's shape.
    pub config: PhiConfig,
    /// Bytes the base takes once loaded (f32 for safetensors, as stored for GGUF).
    pub weight_bytes: u64,
    /// LoRA rank.
    pub r: usize,
    /// How many of the six modules get an adapter.
    pub targets: usize,
    /// Longest example in tokens.
    pub seq_len: usize,
    /// Examples per micro-batch.
    pub batch: usize,
    /// Memory the device has, when known.
    pub device_memory: Option<u64>,
    /// The device's matmul rate (FLOP/s), when measured.
    pub flops_per_sec: Option<f64>,
    /// Recompute blocks in the backward pass instead of keeping their activations.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

/// The prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    /// Predicted peak memory.
    pub peak_bytes: u64,
    /// Of which the base.
    pub weight_bytes: u64,
    /// Of which activations.
    pub activation_bytes: u64,
    /// Of which LoRA weights, gradients and moments.
    pub lora_bytes: u64,
    /// Predicted training tokens per second.
    pub tokens_per_sec: Option<f64>,
    /// Whether it fits the device (when its memory is known).
    pub fits: Option<bool>,
    /// What to change, when it does not fit.
    pub advice: Vec<String>,
}

/// Floats of activations per token, per layer.
fn per_token_layer(cfg: &PhiConfig, seq: usize) -> f64 {
    101.0 * cfg.hidden_size as f64 + 10.0 * cfg.num_attention_heads as f64 * seq as f64
}

fn activations(cfg: &PhiConfig, seq: usize, batch: usize, checkpointing: bool) -> f64 {
    let tokens = (seq * batch) as f64;
    let blocks = if checkpointing {
        // One block's graph at a time, plus every block's input kept.
        per_token_layer(cfg, seq) + cfg.num_hidden_layers as f64 * cfg.hidden_size as f64
    } else {
        cfg.num_hidden_layers as f64 * per_token_layer(cfg, seq)
    };
    4.0 * tokens * (blocks + 3.0 * cfg.vocab_size as f64)
}

/// The prediction for `input`.
pub fn estimate(input: &EstimateInput) -> Estimate {
    let cfg = &input.config;
    let h = cfg.hidden_size as f64;
    let i = cfg.intermediate_size as f64;
    // LoRA parameters per layer: r·(in + out) for each target (average shape).
    let per_target = input.r as f64 * ((h + h) * 4.0 + (h + i) * 2.0) / 6.0;
    let lora_params = cfg.num_hidden_layers as f64 * per_target * input.targets as f64;
    let lora_bytes = (lora_params * 4.0 * 4.0) as u64;
    let dequant = (i * h * 4.0) as u64;
    let ckpt = input.gradient_checkpointing;
    let activation_bytes = activations(cfg, input.seq_len, input.batch, ckpt) as u64;
    // Allocator and runtime overhead beyond the tensors themselves.
    let overhead = 64u64 << 20;
    let peak = input.weight_bytes + dequant + lora_bytes + activation_bytes + overhead;
    let params =
        cfg.num_hidden_layers as f64 * (4.0 * h * h + 2.0 * h * i) + cfg.vocab_size as f64 * h;
    let attn = cfg.num_hidden_layers as f64 * 2.0 * 2.0 * input.seq_len as f64 * h;
    // Checkpointing runs every block's forward pass twice.
    let flops_per_token = (4.0 * params + 3.0 * attn) * if ckpt { 1.33 } else { 1.0 };
    // Training reaches about a fifth of the plain matmul rate: the many
    // elementwise ops of the differentiable forward and the backward pass
    // (fitted to CPU runs, measured/predicted 0.18-0.25; see BENCHMARKS.md).
    const EFFICIENCY: f64 = 0.21;
    let tokens_per_sec = input
        .flops_per_sec
        .map(|f| EFFICIENCY * f / flops_per_token);
    let fits = input.device_memory.map(|m| peak <= m);
    let mut advice = Vec::new();
    if fits == Some(false) {
        let m = input.device_memory.unwrap_or(0);
        let room = m.saturating_sub(input.weight_bytes + dequant + lora_bytes + overhead) as f64;
        if !ckpt && activations(cfg, input.seq_len, input.batch, true) <= room {
            advice.push("turn on gradient checkpointing".into());
        }
        if input.batch > 1 && activations(cfg, input.seq_len, 1, ckpt) <= room {
            advice.push(
                "use batch size 1 (with gradient accumulation to keep the effective batch)".into(),
            );
        }
        let mut seq = input.seq_len;
        while seq > 64 && activations(cfg, seq, 1, ckpt) > room {
            seq /= 2;
        }
        if seq < input.seq_len && seq >= 64 {
            advice.push(format!("shorten the maximum length to {seq} tokens"));
        }
        if input.weight_bytes > (cfg.num_hidden_layers as f64 * 6.0 * h * h * 2.0) as u64 {
            advice.push(
                "train on a quantized (Q4_K or Q8_0) base instead of the full-precision one".into(),
            );
        }
        if advice.is_empty() {
            advice.push(
                "this device has too little memory for this model; train on a GPU with more memory"
                    .into(),
            );
        }
    }
    Estimate {
        peak_bytes: peak,
        weight_bytes: input.weight_bytes,
        activation_bytes,
        lora_bytes,
        tokens_per_sec,
        fits,
        advice,
    }
}

/// Measures this device's f32 matmul rate with a short product (about 50 ms).
pub fn measure_flops(device: &candle_core::Device) -> Option<f64> {
    let n = 512usize;
    let a = candle_core::Tensor::ones((n, n), candle_core::DType::F32, device).ok()?;
    a.matmul(&a).ok()?.sum_all().ok()?.to_scalar::<f32>().ok()?;
    let start = std::time::Instant::now();
    let mut reps = 0;
    while start.elapsed().as_secs_f64() < 0.05 {
        a.matmul(&a).ok()?.sum_all().ok()?.to_scalar::<f32>().ok()?;
        reps += 1;
    }
    Some(2.0 * (n * n * n) as f64 * reps as f64 / start.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phi2(seq: usize, batch: usize, memory: u64) -> EstimateInput {
        EstimateInput {
            config: PhiConfig::phi2(),
            weight_bytes: 1_790_000_000,
            r: 16,
            targets: 6,
            seq_len: seq,
            batch,
            device_memory: Some(memory),
            flops_per_sec: Some(1e12),
            gradient_checkpointing: false,
        }
    }

    #[test]
    fn memory_grows_with_length_and_batch_and_advice_fixes_it() {
        let small = estimate(&phi2(256, 1, 80 << 30));
        assert_eq!(small.fits, Some(true));
        let big = estimate(&phi2(2048, 2, 80 << 30));
        assert!(big.activation_bytes > 8 * small.activation_bytes);
        assert_eq!(big.fits, Some(false));
        assert!(
            big.advice.iter().any(|a| a.contains("maximum length")),
            "{:?}",
            big.advice
        );
        // The advice works: the proposed length fits.
        let seq: usize = big
            .advice
            .iter()
            .find_map(|a| a.split_whitespace().find_map(|w| w.parse().ok()))
            .unwrap();
        assert_eq!(estimate(&phi2(seq, 1, 80 << 30)).fits, Some(true));
        assert!(small.tokens_per_sec.unwrap() > big.tokens_per_sec.unwrap());
        // Checkpointing is proposed, and it divides activation memory by about the layer count.
        assert!(big.advice.iter().any(|a| a.contains("checkpointing")));
        let mut ck = phi2(2048, 2, 80 << 30);
        ck.gradient_checkpointing = true;
        let ck = estimate(&ck);
        assert!(ck.activation_bytes * 10 < big.activation_bytes);
    }
}
