//! LoRA fine-tuning of Phi-2 on role-play text, on the engine's own model
//! code: data preparation, AdamW, checkpoints that resume exactly, eval
//! loss, and export as a PEFT adapter.
//!
//! Invariants: the base model is never changed, only the LoRA weights
//! (f32, with f32 optimizer moments); a checkpoint is written whole or not at
//! all, and the previous one stays usable until the new one is complete;
//! everything random (split, order, init, dropout) derives from the seed and
//! the step, so a resumed run computes what an uninterrupted one would.
//!
//! The text template is the role-play dataset's: `<|system|>…</s>\n<|user|>…</s>\n<|assistant|>…</s>`.
//! Phi-2's only special token is `<|endoftext|>`; the markers and `</s>` are
//! kept as plain text (chat stops on `</s>` the same way), and each example
//! ends with `<|endoftext|>`.

pub mod data;
pub mod dpo;
mod error;
pub mod estimate;
mod export;
mod optim;
mod run;

pub use data::{
    DataOptions, DataReport, LossOn, PairExample, PairReport, PairText, Prepared, PreparedPairs,
    prepare_pairs,
};
pub use dpo::{
    DpoBatch, DpoConfig, DpoMetrics, DpoStep, dpo_eval, dpo_loss, dpo_loss_and_grads, dpo_step,
    sequence_logps,
};
/// The process's memory from /proc (Linux), for estimates and benchmarks.
pub use dramatis_llm::{peak_rss_bytes, proc_bytes};
pub use error::{Error, Result};
pub use estimate::{Estimate, EstimateInput, estimate};
pub use export::{export_checkpoint, export_peft};
pub use optim::{AdamW, Schedule};
pub use run::{Objective, Outcome, Precision, TrainConfig, TrainData, TrainProgress, TrainingRun};
