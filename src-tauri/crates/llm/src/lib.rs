//! Dramatis's language model: Microsoft Phi-2 written on candle for both
//! inference and training.
//!
//! Invariants: one model code path serves chat and fine-tuning; a linear layer
//! is dense or quantized behind [`Linear`], and LoRA deltas are passed per call
//! ([`LoraAdapter`]), so switching adapters never reloads or mutates the base;
//! the KV cache only ever holds keys and values for the tokens in
//! [`Session`]'s history, so prefix reuse is exact.
//!
//! [`Phi::forward`] runs candle's tensor ops on every device (the reference),
//! except where a faster pass over the same weights and cache takes over: on
//! x86 CPUs the whole pass on this crate's kernels (`cpu`), on CUDA the
//! one-token decode step (`gpu`, kernels/infer.cu). Each is tested against
//! the tensor path.

mod cache;
mod config;
mod cpu;
mod device;
mod error;
mod export;
#[cfg(feature = "cuda")]
mod flash;
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod gpu;
mod grad;
mod kernels;
mod linear;
mod lora;
mod model;
mod profile;
mod quantize;
mod sampler;
mod session;
mod synthetic;
mod tokenizer;
mod weights;

/// Held by the GPU tests: some flip process-wide switches (the prompt GEMM,
/// the pipelined flash kernels) that every GPU product reads, and the test
/// harness runs tests on parallel threads.
#[cfg(all(test, feature = "cuda"))]
pub(crate) static GPU_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether training's attention in `dtype` with heads of `head_dim` runs on
/// the flash-attention kernels on `device` (keeping no probabilities; the
/// training estimate counts none then).
pub fn trains_with_flash_attention(
    device: &candle_core::Device,
    dtype: candle_core::DType,
    head_dim: usize,
) -> bool {
    #[cfg(feature = "cuda")]
    return flash::enabled(device, dtype, head_dim);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, dtype, head_dim);
        false
    }
}

pub use cache::KvCache;
pub use config::PhiConfig;
pub use cpu::threads;
pub use device::{
    DeviceChoice, default_device, device_name, gpu_memory_peak, gpu_memory_reserved_peak,
    peak_rss_bytes, proc_bytes, rss_bytes,
};
pub use error::{Error, Result};
pub use export::{merge_to_gguf, write_lora_gguf};
pub use grad::{BlockActivations, LossGrads, SlotGrads, TrainForward};
pub use linear::Linear;
pub use lora::{LoraAdapter, LoraLayer, LoraSlot, LoraTarget, dropout_mask};
pub use model::{Logits, Phi};
pub use profile::profile_report;
pub use quantize::{QuantType, QuantizeProgress, quantize_safetensors, write_gguf};
pub use sampler::{Sampler, SamplerConfig};
pub use session::{GenerateParams, Generation, PrefillCounts, Reuse, Session, StopReason};
pub use synthetic::write_synthetic_gguf;
pub use tokenizer::{PhiTokenizer, TextStream};
pub use weights::{ModelFormat, ModelInfo, inspect_model, load_model, load_model_as};

/// Re-exported so callers need not depend on candle directly.
pub use candle_core::{DType, Device, Tensor};
