//! Predicts a run's peak memory and speed before it starts, and says what
//! to change when it will not fit.
//!
//! Memory: the base as loaded, one dequantized matrix at a time, the LoRA
//! weights with their gradients and two AdamW moments (all f32), and the
//! activations of the hand-written training passes (dramatis-llm's `grad`),
//! counted per token in the training dtype: every block's input; per block
//! kept for its backward pass the normed input, q, k, v and the attention
//! output (5 × hidden), fc1's output before and after GELU (2 ×
//! intermediate) and the attention probabilities (heads × length; with the
//! flash-attention kernels one log-sum-exp per head instead); while a block
//! runs backward, two more probability-sized tensors (none with the kernels)
//! and a few hidden-sized ones; the logits of at most 256 rows at a time,
//! with their f32 log-softmax and gradient. With gradient checkpointing only
//! one block's activations exist at a time. On a GPU, the CUDA runtime's own
//! memory (context, kernel modules, cuBLAS workspace) on top. Speed: the
//! matmul FLOPs of the passes (the frozen base needs no weight gradients;
//! checkpointing runs each block's forward pass twice) at a fraction of the
//! device's measured matmul rate.

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
    /// Bytes per activation element (2 in bf16, 4 in f32).
    #[serde(default = "four")]
    pub dtype_bytes: usize,
    /// Whether it trains on a GPU (which reaches a different fraction of its
    /// matmul rate).
    #[serde(default)]
    pub on_gpu: bool,
    /// DPO: each example is a pair (two rows, chosen and rejected), and the
    /// reference's forward pass comes on top of the training passes.
    #[serde(default)]
    pub dpo: bool,
    /// Attention runs on the flash kernels (dramatis-llm's
    /// `trains_with_flash_attention`): each query keeps one log-sum-exp per
    /// head instead of `length` probabilities, and no score matrix exists.
    #[serde(default)]
    pub flash_attention: bool,
}

fn four() -> usize {
    4
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

/// Device memory a CUDA process holds beyond its tensors (see `estimate`).
const GPU_RUNTIME: u64 = 800_000_000;

/// Rows of logits computed at once (dramatis-llm's head chunk).
const HEAD_ROWS: f64 = 256.0;

/// Activation bytes at the peak of a step, for `rows` sequences of `seq` tokens.
fn activations(input: &EstimateInput, seq: usize, rows: usize, checkpointing: bool) -> f64 {
    let cfg = &input.config;
    let (batch, e) = (rows, input.dtype_bytes.max(1));
    let (h, i) = (cfg.hidden_size as f64, cfg.intermediate_size as f64);
    let heads = cfg.num_attention_heads as f64;
    // Per query and head: `length` probabilities kept, and two more
    // probability-sized tensors while a block runs backward; with the flash
    // kernels one f32 log-sum-exp kept and one f32 delta (counted in
    // elements of the training dtype).
    let (attn_kept, attn_transient) = if input.flash_attention {
        (heads * 4.0 / e as f64, heads * 4.0 / e as f64)
    } else {
        (heads * seq as f64, 2.0 * heads * seq as f64)
    };
    let layers = cfg.num_hidden_layers as f64;
    let tokens = (seq * batch) as f64;
    let kept = 5.0 * h + 2.0 * i + attn_kept;
    let transient = attn_transient + 4.0 * h + 2.0 * i;
    let blocks = layers * h + transient + if checkpointing { kept } else { layers * kept };
    let head = HEAD_ROWS.min(tokens) * cfg.vocab_size as f64 * (e as f64 + 20.0);
    e as f64 * tokens * blocks + head
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
    // A DPO pair is two rows.
    let rows = input.batch * if input.dpo { 2 } else { 1 };
    let activation_bytes = activations(input, input.seq_len, rows, ckpt) as u64;
    // Allocator and runtime overhead beyond the tensors themselves. On a
    // GPU the CUDA context, the kernels' modules and cuBLAS's workspace:
    // on the H200 transformers + peft held 0.80 GB beyond its allocator's
    // reserved peak (10,973 MiB by nvidia-smi against 10,702 MB reserved,
    // BENCHMARKS.md), and our runs 0.9-1.5 GB beyond their tensors' peak.
    let overhead = if input.on_gpu { GPU_RUNTIME } else { 64 << 20 };
    let peak = input.weight_bytes + dequant + lora_bytes + activation_bytes + overhead;
    // Matmul FLOPs per token: the blocks' projections (2 per weight) and
    // attention (q·kᵀ and p·v: 4 · length · hidden per layer) forward, twice
    // that backward (input gradients only), the head forward and backward;
    // checkpointing runs the blocks' forward pass twice.
    let blocks = cfg.num_hidden_layers as f64 * 2.0 * (4.0 * h * h + 2.0 * h * i);
    let attn = cfg.num_hidden_layers as f64 * 4.0 * input.seq_len as f64 * h;
    let head = 2.0 * cfg.vocab_size as f64 * h;
    let forwards = if ckpt { 2.0 } else { 1.0 };
    let mut flops_per_token = (blocks + attn) * forwards + blocks + 2.0 * attn + 2.0 * head;
    if input.dpo {
        // The reference's forward pass (once per pair; later epochs reuse it).
        flops_per_token += blocks + attn + head;
    }
    // Training reaches this fraction of the plain matmul rate (elementwise
    // work, LoRA's thin matmuls, launches): fitted to measured runs, on this
    // machine's CPU and on an H200 (BENCHMARKS.md).
    let efficiency = if input.on_gpu { 0.25 } else { 0.32 };
    let tokens_per_sec = input
        .flops_per_sec
        .map(|f| efficiency * f / flops_per_token);
    let fits = input.device_memory.map(|m| peak <= m);
    let mut advice = Vec::new();
    if fits == Some(false) {
        let m = input.device_memory.unwrap_or(0);
        let room = m.saturating_sub(input.weight_bytes + dequant + lora_bytes + overhead) as f64;
        if !ckpt && activations(input, input.seq_len, rows, true) <= room {
            advice.push("turn on gradient checkpointing".into());
        }
        let pair_rows = rows / input.batch.max(1);
        if input.batch > 1 && activations(input, input.seq_len, pair_rows, ckpt) <= room {
            advice.push(
                "use batch size 1 (with gradient accumulation to keep the effective batch)".into(),
            );
        }
        let mut seq = input.seq_len;
        while seq > 64 && activations(input, seq, pair_rows, ckpt) > room {
            seq /= 2;
        }
        // Only a length that fits (at 64 tokens the halving stops, fitting or not).
        if seq < input.seq_len && activations(input, seq, pair_rows, ckpt) <= room {
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

/// Measures this device's matmul rate in `dtype` (about 50 ms): 512² on
/// the CPU; 4096², eight at a time, on a GPU, where a small product measures
/// the launch, not the arithmetic.
pub fn measure_flops(device: &candle_core::Device, dtype: candle_core::DType) -> Option<f64> {
    let (n, per_sync) = if device.is_cpu() {
        (512usize, 1)
    } else {
        (4096, 8)
    };
    let a = candle_core::Tensor::ones((n, n), dtype, device).ok()?;
    let round = || -> Option<()> {
        let mut last = None;
        for _ in 0..per_sync {
            last = Some(a.matmul(&a).ok()?);
        }
        last?
            .sum_all()
            .ok()?
            .to_dtype(candle_core::DType::F32)
            .ok()?
            .to_scalar::<f32>()
            .ok()?;
        Some(())
    };
    round()?;
    let start = std::time::Instant::now();
    let mut reps = 0;
    while start.elapsed().as_secs_f64() < 0.05 {
        round()?;
        reps += per_sync;
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
            dtype_bytes: 4,
            on_gpu: false,
            dpo: false,
            flash_attention: false,
        }
    }

    #[test]
    fn flash_attention_drops_the_probabilities() {
        let base = EstimateInput {
            gradient_checkpointing: true,
            dtype_bytes: 2,
            ..phi2(2048, 2, 24 << 30)
        };
        let plain = estimate(&base);
        let flash = estimate(&EstimateInput {
            flash_attention: true,
            ..base.clone()
        });
        // Phi-2, checkpointed: per token 32 heads × 2048 probabilities kept
        // and twice that while a block runs backward, in bf16, 4096 tokens.
        let saved = plain.activation_bytes - flash.activation_bytes;
        let probs = 3.0 * 32.0 * 2048.0 * 2.0 * 4096.0;
        assert!(
            (saved as f64 - probs).abs() < 0.01 * probs,
            "{saved} vs {probs}"
        );
        // And memory grows linearly with the length: equal steps in tokens
        // add equal bytes (without the kernels, more each time).
        let at = |seq: usize, flash_attention: bool| {
            estimate(&EstimateInput {
                seq_len: seq,
                flash_attention,
                ..base.clone()
            })
            .activation_bytes as f64
        };
        let (d1, d2) = (
            at(2048, true) - at(1024, true),
            at(1024, true) - at(512, true),
        );
        assert!((d1 - 2.0 * d2).abs() < 1e-3 * d1, "{d1} vs 2 × {d2}");
        let (p1, p2) = (
            at(2048, false) - at(1024, false),
            at(1024, false) - at(512, false),
        );
        assert!(p1 > 2.5 * p2, "{p1} vs {p2}");
    }

    /// The seed recipe's runs on an H200 and an H100 (BENCHMARKS.md,
    /// "Training on a GPU against transformers + peft", sessions 13 and 14):
    /// each peak by nvidia-smi predicted within ±15%.
    #[test]
    fn measured_gpu_runs_are_predicted_within_15_percent() {
        // (weight bytes, length, flash kernels, measured MiB): the bf16 base
        // (2,779,683,840 parameters), and the Q4_K base's file; an H200 in
        // session 13 (512-row head chunks, the head dequantized through
        // f32), then an H100 in session 14 (BENCHMARKS.md).
        let runs = [
            (5_559_367_680u64, 2048, true, 7951.0),
            (5_559_367_680, 2048, false, 9295.0),
            (5_559_367_680, 512, true, 6927.0),
            (1_566_800_000, 2048, true, 4527.0),
            (5_559_367_680, 2048, true, 8079.0),
            (5_559_367_680, 512, true, 6799.0),
            (1_566_800_000, 2048, true, 4079.0),
        ];
        for (weight_bytes, seq, flash_attention, mib) in runs {
            let e = estimate(&EstimateInput {
                weight_bytes,
                gradient_checkpointing: true,
                dtype_bytes: 2,
                on_gpu: true,
                flash_attention,
                ..phi2(seq, 2, 141 << 30)
            });
            let measured = mib * 1_048_576.0;
            let off = e.peak_bytes as f64 / measured - 1.0;
            assert!(
                off.abs() <= 0.15,
                "{weight_bytes} B, length {seq}, flash {flash_attention}: {} vs {measured} ({off:+.3})",
                e.peak_bytes
            );
        }
    }

    #[test]
    fn a_dpo_pair_costs_two_rows_and_a_reference_pass() {
        let sft = estimate(&phi2(512, 2, 24 << 30));
        let dpo = estimate(&EstimateInput {
            dpo: true,
            ..phi2(512, 2, 24 << 30)
        });
        let two_rows = estimate(&phi2(512, 4, 24 << 30));
        assert_eq!(dpo.activation_bytes, two_rows.activation_bytes);
        let (a, b) = (sft.tokens_per_sec.unwrap(), dpo.tokens_per_sec.unwrap());
        assert!(b < a && b > 0.6 * a, "{a} {b}");
    }

    #[test]
    fn memory_grows_with_length_and_batch_and_advice_fixes_it() {
        let small = estimate(&phi2(256, 1, 24 << 30));
        assert_eq!(small.fits, Some(true));
        let big = estimate(&phi2(2048, 2, 24 << 30));
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
        assert_eq!(estimate(&phi2(seq, 1, 24 << 30)).fits, Some(true));
        assert!(small.tokens_per_sec.unwrap() > big.tokens_per_sec.unwrap());
        // Checkpointing is proposed, and it divides activation memory by
        // about the layer count (less the one block and the head it keeps).
        assert!(big.advice.iter().any(|a| a.contains("checkpointing")));
        let mut ck = phi2(2048, 2, 24 << 30);
        ck.gradient_checkpointing = true;
        let ck = estimate(&ck);
        assert!(ck.activation_bytes * 8 < big.activation_bytes);
    }
}
