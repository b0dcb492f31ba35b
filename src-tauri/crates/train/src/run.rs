//! A training run: LoRA weights as variables, micro-batches with gradient
//! accumulation, AdamW, eval loss, progress, cancel, and checkpoints that
//! resume exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use dramatis_llm::{LoraAdapter, LoraLayer, LoraSlot, LoraTarget, Phi};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{Example, PairExample, Prepared, PreparedPairs, epoch_batches};
use crate::dpo::{DpoBatch, DpoConfig, DpoMetrics};
use crate::optim::{AdamW, Schedule};
use crate::{Error, Result};

/// Every hyperparameter of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// LoRA rank.
    pub r: usize,
    /// LoRA alpha (the delta is scaled by alpha / r).
    pub alpha: f64,
    /// Dropout on the LoRA input.
    pub dropout: f32,
    /// Modules that get an adapter.
    pub targets: Vec<String>,
    /// Peak learning rate.
    pub lr: f64,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Passes over the data (when `max_steps` is not set).
    pub epochs: usize,
    /// Stop after this many optimizer steps.
    pub max_steps: Option<usize>,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Clip the gradient's global norm to this.
    pub clip: Option<f64>,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Eval loss every N steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every N steps (0: only at the end and on cancel).
    pub checkpoint_every: usize,
    /// Seeds init, order and dropout.
    pub seed: u64,
    /// Keep only each block's input during the forward pass and recompute the
    /// block in the backward pass: activation memory of one block instead of
    /// all of them, for about a third more compute.
    pub gradient_checkpointing: bool,
    /// The dtype of the forward and backward passes (LoRA weights and the
    /// optimizer stay f32).
    pub precision: Precision,
    /// What the run minimizes.
    pub objective: Objective,
}

/// What a run minimizes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Objective {
    /// Cross-entropy on text (supervised fine-tuning).
    #[default]
    Sft,
    /// Direct preference optimization on pairs, against the adapter the run
    /// starts from (the base alone for a fresh one). Runs without dropout, as
    /// TRL's DPOTrainer does by default, so the policy and the reference see
    /// the same network.
    Dpo {
        /// How far the policy may move from the reference (0.1 in TRL).
        beta: f64,
        /// Weight of a cross-entropy term on the chosen replies (0: off).
        sft_weight: f64,
    },
}

impl Objective {
    /// DPO with TRL's defaults (β 0.1, no SFT term).
    pub fn dpo() -> Self {
        Self::Dpo {
            beta: 0.1,
            sft_weight: 0.0,
        }
    }
}

/// What a run trains on: text rows (SFT) or preference pairs (DPO).
#[derive(Debug, Clone)]
pub enum TrainData {
    /// Tokenized text.
    Text(Prepared),
    /// Tokenized pairs.
    Pairs(PreparedPairs),
}

impl From<Prepared> for TrainData {
    fn from(p: Prepared) -> Self {
        Self::Text(p)
    }
}

impl From<PreparedPairs> for TrainData {
    fn from(p: PreparedPairs) -> Self {
        Self::Pairs(p)
    }
}

impl TrainData {
    fn train_lengths(&self) -> Vec<usize> {
        match self {
            Self::Text(p) => p.train.iter().map(|e| e.ids.len()).collect(),
            Self::Pairs(p) => p.train.iter().map(PairExample::len).collect(),
        }
    }

    fn train_len(&self) -> usize {
        match self {
            Self::Text(p) => p.train.len(),
            Self::Pairs(p) => p.train.len(),
        }
    }
}

/// The dtype training computes in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 on a CUDA GPU, f32 elsewhere.
    #[default]
    Auto,
    /// f32 throughout.
    F32,
    /// bf16 activations and weights (f32 layer-norm statistics and loss).
    Bf16,
}

impl Precision {
    /// The dtype on `device`.
    pub fn dtype(self, device: &Device) -> DType {
        match self {
            Self::Auto if device.is_cuda() => DType::BF16,
            Self::Auto | Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }

    /// By name (`auto`, `f32`, `bf16`).
    pub fn parse(s: &str) -> Result<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase()))
            .map_err(|_| Error::Config(format!("precision `{s}`: use auto, f32 or bf16")))
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self::seed_recipe()
    }
}

impl TrainConfig {
    /// The seed recipe: r 16, alpha 16, dropout 0.05 on q, k, v, dense, fc1,
    /// fc2; lr 2e-4 constant; batch 2; one epoch.
    pub fn seed_recipe() -> Self {
        Self {
            r: 16,
            alpha: 16.0,
            dropout: 0.05,
            targets: LoraTarget::ALL
                .iter()
                .map(|t| t.peft_name().to_owned())
                .collect(),
            lr: 2e-4,
            batch_size: 2,
            grad_accum: 1,
            epochs: 1,
            max_steps: None,
            schedule: Schedule::Constant,
            clip: Some(1.0),
            weight_decay: 0.0,
            eval_every: 50,
            checkpoint_every: 50,
            seed: 42,
            gradient_checkpointing: false,
            precision: Precision::Auto,
            objective: Objective::Sft,
        }
    }

    /// Takes `start`'s rank, alpha and targets (those in its first layer), so
    /// a run can begin from it.
    pub fn take_shape_of(&mut self, start: &LoraAdapter) -> Result<()> {
        let layer = start.layers.first();
        let targets: Vec<LoraTarget> = LoraTarget::ALL
            .into_iter()
            .filter(|&t| layer.and_then(|l| l.slot(t)).is_some())
            .collect();
        let first = targets
            .first()
            .and_then(|&t| layer?.slot(t))
            .ok_or_else(|| Error::Config("the starting adapter has no LoRA weights".into()))?;
        self.r = first.a.dims()[0];
        self.alpha = first.scale * self.r as f64;
        self.targets = targets.iter().map(|t| t.peft_name().to_owned()).collect();
        Ok(())
    }

    fn target_list(&self) -> Result<Vec<LoraTarget>> {
        self.targets
            .iter()
            .map(|n| {
                LoraTarget::ALL
                    .into_iter()
                    .find(|t| t.peft_name() == n)
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "`{n}` is not a Phi-2 module (q_proj, k_proj, v_proj, dense, fc1, fc2)"
                        ))
                    })
            })
            .collect()
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.into()));
        if self.r == 0 || self.r > 512 {
            return bad("the rank must be between 1 and 512");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout must be in [0, 1)");
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("batch size and accumulation must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr < 1.0) {
            return bad("the learning rate must be between 0 and 1");
        }
        if self.targets.is_empty() {
            return bad("choose at least one target module");
        }
        if let Objective::Dpo { beta, sft_weight } = self.objective
            && !(beta > 0.0 && beta <= 10.0 && (0.0..=10.0).contains(&sft_weight))
        {
            return bad("DPO's beta must be in (0, 10] and the SFT weight in [0, 10]");
        }
        self.target_list().map(|_| ())
    }
}

/// A progress report, once per optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainProgress {
    /// Steps done.
    pub step: usize,
    /// Steps in all.
    pub total_steps: usize,
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Training loss of this step.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens per second over this session.
    pub tokens_per_sec: f64,
    /// Tokens trained on in this session.
    pub tokens: usize,
    /// Seconds left at that pace.
    pub eta_secs: f64,
    /// Eval loss, on the steps it is measured.
    pub eval_loss: Option<f64>,
    /// Resident memory of the process (bytes), where the OS tells it.
    pub memory_bytes: Option<u64>,
    /// Set when a checkpoint was written at this step.
    pub checkpoint: bool,
    /// At checkpoints: greedy replies to the sample prompts with the adapter so far.
    pub samples: Vec<String>,
    /// DPO: the chosen reward minus the rejected one, averaged over this step's pairs.
    pub margin: Option<f64>,
    /// DPO: the share of this step's pairs whose chosen reward is higher.
    pub accuracy: Option<f64>,
    /// DPO, on the steps eval runs: the margin on the held-out pairs.
    pub eval_margin: Option<f64>,
    /// DPO, on the steps eval runs: the accuracy on the held-out pairs.
    pub eval_accuracy: Option<f64>,
    /// The data rows this step trained on, in order (the reader's 1-based row
    /// numbers; JSONL: lines), so another trainer can replay the run; empty
    /// for DPO.
    pub rows: Vec<usize>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every step is done.
    Finished,
    /// Cancelled; the last checkpoint holds everything up to the stop.
    Cancelled,
}

/// Where a run stands: everything a checkpoint needs besides the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Position {
    step: usize,
    epoch: usize,
    /// Micro-batches of this epoch already used.
    batch: usize,
    config: TrainConfig,
    losses: Vec<f64>,
    eval_losses: Vec<(usize, f64)>,
    /// DPO: each step's metrics.
    #[serde(default)]
    dpo: Vec<DpoMetrics>,
    /// DPO: the held-out metrics, with their step.
    #[serde(default)]
    eval_dpo: Vec<(usize, DpoMetrics)>,
}

/// A LoRA training run on a frozen base.
pub struct TrainingRun {
    model: Arc<Phi>,
    data: TrainData,
    /// The adapter the run started from, frozen (DPO's reference; `None`: the base).
    start: Option<LoraAdapter>,
    /// The reference's (chosen, rejected) sums per pair, computed once:
    /// keyed by (held out, index).
    reference_sums: HashMap<(bool, usize), (f64, f64)>,
    dir: PathBuf,
    names: Vec<String>,
    vars: Vec<Var>,
    /// (layer, target, index of A in `vars`) for each slot.
    slots: Vec<(usize, LoraTarget, usize)>,
    optimizer: AdamW,
    pos: Position,
    pad: u32,
    sample_prompts: Vec<Vec<u32>>,
    tokenizer: Option<dramatis_llm::PhiTokenizer>,
    /// This epoch's micro-batches (derived from the seed and the epoch).
    epoch_order: Option<(usize, Vec<Vec<usize>>)>,
}

impl std::fmt::Debug for TrainingRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainingRun")
            .field("dir", &self.dir)
            .field("step", &self.pos.step)
            .finish_non_exhaustive()
    }
}

/// The PEFT key of a LoRA matrix.
pub(crate) fn peft_key(layer: usize, t: LoraTarget, which: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{which}.weight",
        t.module_path()
    )
}

impl TrainingRun {
    /// Starts a run in `dir` from a fresh adapter, or resumes the one whose
    /// checkpoint is there (its configuration must match).
    pub fn new(
        model: Arc<Phi>,
        data: impl Into<TrainData>,
        config: TrainConfig,
        dir: &Path,
        pad: u32,
    ) -> Result<Self> {
        Self::new_from(model, data, config, dir, pad, None)
    }

    /// [`TrainingRun::new`] starting from `start`'s weights instead of a
    /// fresh adapter (it must have the configuration's rank, scale and every
    /// target in every layer); a DPO run keeps it as its reference.
    pub fn new_from(
        model: Arc<Phi>,
        data: impl Into<TrainData>,
        config: TrainConfig,
        dir: &Path,
        pad: u32,
        start: Option<&LoraAdapter>,
    ) -> Result<Self> {
        config.validate()?;
        // The sample replies at checkpoints run the prompt path, which
        // would copy a quantized token table to the GPU and keep it there.
        model.keep_embedding_on_host();
        let data = data.into();
        match (&data, config.objective) {
            (TrainData::Text(_), Objective::Dpo { .. }) => {
                return Err(Error::Config(
                    "DPO trains on preference pairs, not text".into(),
                ));
            }
            (TrainData::Pairs(_), Objective::Sft) => {
                return Err(Error::Config(
                    "preference pairs train with DPO: set the objective".into(),
                ));
            }
            _ => {}
        }
        let cfg = model.config().clone();
        let device = model.device().clone();
        let targets = config.target_list()?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let mut names = Vec::new();
        let mut vars = Vec::new();
        let mut slots = Vec::new();
        for layer in 0..cfg.num_hidden_layers {
            for &t in &targets {
                let (fan_in, fan_out) = t.shape(&cfg);
                // PEFT's init: A ~ U(±1/√in) (Kaiming, a = √5), B = 0.
                let bound = 1.0 / (fan_in as f32).sqrt();
                let a: Vec<f32> = (0..config.r * fan_in)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let (a, b) = match start {
                    None => (
                        Tensor::from_vec(a, (config.r, fan_in), &device)?,
                        Tensor::zeros((fan_out, config.r), DType::F32, &device)?,
                    ),
                    Some(s) => start_slot(s, layer, t, &config, (fan_in, fan_out), &device)?,
                };
                let a = Var::from_tensor(&a)?;
                let b = Var::from_tensor(&b)?;
                slots.push((layer, t, vars.len()));
                names.push(peft_key(layer, t, "A"));
                vars.push(a);
                names.push(peft_key(layer, t, "B"));
                vars.push(b);
            }
        }
        let optimizer = AdamW::new(&vars, config.weight_decay)?;
        let start = match start {
            Some(s) => Some(frozen(s)?),
            None => None,
        };
        let mut run = Self {
            model,
            data,
            start,
            reference_sums: HashMap::new(),
            dir: dir.to_owned(),
            names,
            vars,
            slots,
            optimizer,
            pos: Position {
                step: 0,
                epoch: 0,
                batch: 0,
                config,
                losses: Vec::new(),
                eval_losses: Vec::new(),
                dpo: Vec::new(),
                eval_dpo: Vec::new(),
            },
            pad,
            sample_prompts: Vec::new(),
            tokenizer: None,
            epoch_order: None,
        };
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        run.resume()?;
        Ok(run)
    }

    /// Prompts (already in the chat format) answered at every checkpoint,
    /// so progress can be read as well as plotted.
    pub fn set_sample_prompts(
        &mut self,
        tokenizer: dramatis_llm::PhiTokenizer,
        prompts: &[String],
    ) -> Result<()> {
        self.sample_prompts = prompts
            .iter()
            .map(|p| tokenizer.encode(p))
            .collect::<dramatis_llm::Result<_>>()?;
        self.tokenizer = Some(tokenizer);
        Ok(())
    }

    /// Greedy replies (up to 40 tokens) to the sample prompts with the adapter so far.
    fn samples(&self) -> Result<Vec<String>> {
        let Some(tok) = &self.tokenizer else {
            return Ok(Vec::new());
        };
        let mut session = dramatis_llm::Session::new(self.model.clone());
        session.set_adapter(Some(Arc::new(self.inference_adapter()?)));
        let params = dramatis_llm::GenerateParams {
            sampler: dramatis_llm::SamplerConfig {
                temperature: 0.0,
                ..Default::default()
            },
            max_new_tokens: 40,
            stop: vec!["</s>".into(), "<|user|>".into()],
            ..Default::default()
        };
        let mut out = Vec::new();
        for ids in &self.sample_prompts {
            let g = session.generate(tok, ids, &params, &AtomicBool::new(false), |_| {})?;
            out.push(g.text.trim().to_owned());
        }
        Ok(out)
    }

    /// Optimizer steps done.
    pub fn step(&self) -> usize {
        self.pos.step
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.pos.config
    }

    /// Training loss per step so far.
    pub fn losses(&self) -> &[f64] {
        &self.pos.losses
    }

    /// Eval losses so far, with their step.
    pub fn eval_losses(&self) -> &[(usize, f64)] {
        &self.pos.eval_losses
    }

    /// DPO metrics per step so far (empty for SFT).
    pub fn dpo_metrics(&self) -> &[DpoMetrics] {
        &self.pos.dpo
    }

    /// DPO metrics on the held-out pairs so far, with their step.
    pub fn eval_dpo_metrics(&self) -> &[(usize, DpoMetrics)] {
        &self.pos.eval_dpo
    }

    /// Micro-batches per epoch.
    fn batches_per_epoch(&self) -> usize {
        self.data.train_len().div_ceil(self.pos.config.batch_size)
    }

    /// Optimizer steps in the whole run.
    pub fn total_steps(&self) -> usize {
        let c = &self.pos.config;
        c.max_steps
            .unwrap_or_else(|| (self.batches_per_epoch() * c.epochs).div_ceil(c.grad_accum))
    }

    /// The adapter as trained so far; `dropout_seed` > 0 turns dropout on.
    fn adapter(&self, dropout_seed: Option<u64>) -> LoraAdapter {
        let c = &self.pos.config;
        let cfg = self.model.config();
        let mut layers = vec![LoraLayer::default(); cfg.num_hidden_layers];
        for (k, &(layer, t, i)) in self.slots.iter().enumerate() {
            layers[layer].set(
                t,
                LoraSlot {
                    a: self.vars[i].as_tensor().clone(),
                    b: self.vars[i + 1].as_tensor().clone(),
                    scale: c.alpha / c.r as f64,
                    out_offset: match t {
                        LoraTarget::K => cfg.hidden_size,
                        LoraTarget::V => 2 * cfg.hidden_size,
                        _ => 0,
                    },
                    dropout: if dropout_seed.is_some() && c.objective == Objective::Sft {
                        c.dropout
                    } else {
                        0.0
                    },
                    dropout_seed: dropout_seed.unwrap_or(0).wrapping_add(k as u64 * 7919),
                },
            );
        }
        LoraAdapter {
            layers,
            id: format!("training:{}:{}", self.dir.display(), self.pos.step),
        }
    }

    /// A copy of the adapter for inference (no dropout, no gradients).
    pub fn inference_adapter(&self) -> Result<LoraAdapter> {
        frozen(&self.adapter(None))
    }

    /// The LoRA matrices by PEFT key, for export.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.names
            .iter()
            .zip(&self.vars)
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_device(&Device::Cpu)?)))
            .collect()
    }

    /// Pads a batch: inputs, targets and weights, `[b, len - 1]` each.
    fn batch_tensors(&self, examples: &[&Example]) -> Result<(Tensor, Tensor, Tensor, usize)> {
        let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(2);
        let (mut inp, mut tgt, mut w) = (Vec::new(), Vec::new(), Vec::new());
        let mut tokens = 0;
        for e in examples {
            let n = e.ids.len();
            tokens += n;
            for t in 0..len - 1 {
                inp.push(if t < n { e.ids[t] } else { self.pad });
                tgt.push(if t + 1 < n { e.ids[t + 1] } else { self.pad });
                w.push(if t + 1 < n { e.weights[t] } else { 0.0 });
            }
        }
        let dev = self.model.device();
        let b = examples.len();
        Ok((
            Tensor::from_vec(inp, (b, len - 1), dev)?,
            Tensor::from_vec(tgt, (b, len - 1), dev)?,
            Tensor::from_vec(w, (b, len - 1), dev)?,
            tokens,
        ))
    }

    /// Weighted mean cross-entropy over a batch (no gradients), through the
    /// training passes in the run's dtype: the head's logits a chunk of
    /// rows at a time (a 2048-token row's `[seq, vocab]` logits in f32 and
    /// their log-softmax would be 0.84 GB at once on top of the run's peak).
    fn loss(&self, examples: &[&Example], adapter: &LoraAdapter) -> Result<f64> {
        let (inp, tgt, w, _) = self.batch_tensors(examples)?;
        let dtype = self.pos.config.precision.dtype(self.model.device());
        let picked = self.model.score_targets(&inp, &tgt, Some(adapter), dtype)?;
        let total = w.sum_all()?.to_scalar::<f32>()?.max(1.0);
        Ok(f64::from(
            (picked * w)?.sum_all()?.neg()?.to_scalar::<f32>()? / total,
        ))
    }

    /// Loss and LoRA gradients (in the order of `vars`) of a micro-batch.
    fn loss_and_grads(
        &self,
        examples: &[&Example],
        adapter: &LoraAdapter,
    ) -> Result<(f64, usize, Vec<Option<Tensor>>)> {
        let (inp, tgt, w, tokens) = self.batch_tensors(examples)?;
        let c = &self.pos.config;
        let out = self.model.lora_loss_and_grads(
            &inp,
            &tgt,
            &w,
            adapter,
            c.precision.dtype(self.model.device()),
            c.gradient_checkpointing,
        )?;
        let loss = out.loss;
        Ok((loss, tokens, self.slot_grads(out)?))
    }

    /// Mean loss over the eval rows (no gradients).
    pub fn eval_loss(&self) -> Result<Option<f64>> {
        let data = match &self.data {
            TrainData::Text(p) => p,
            TrainData::Pairs(_) => return Ok(None),
        };
        if data.eval.is_empty() {
            return Ok(None);
        }
        let adapter = self.inference_adapter()?;
        let mut sum = 0.0;
        for e in &data.eval {
            sum += self.loss(&[e], &adapter)?;
        }
        Ok(Some(sum / data.eval.len() as f64))
    }

    fn dpo_config(&self) -> DpoConfig {
        match self.pos.config.objective {
            Objective::Dpo { beta, sft_weight } => DpoConfig { beta, sft_weight },
            Objective::Sft => DpoConfig::default(),
        }
    }

    fn pairs(&self) -> &PreparedPairs {
        match &self.data {
            TrainData::Pairs(p) => p,
            TrainData::Text(_) => unreachable!("checked in new_from: DPO runs have pairs"),
        }
    }

    /// Pads pairs into a DPO batch: chosen rows, then rejected rows.
    fn pair_batch(&self, pairs: &[&PairExample]) -> Result<DpoBatch> {
        let rows: Vec<(&[u32], &[u32])> = pairs
            .iter()
            .map(|p| (p.prompt.as_slice(), p.chosen.as_slice()))
            .chain(
                pairs
                    .iter()
                    .map(|p| (p.prompt.as_slice(), p.rejected.as_slice())),
            )
            .collect();
        let seq = rows
            .iter()
            .map(|(p, r)| p.len() + r.len())
            .max()
            .unwrap_or(2)
            - 1;
        let (mut inp, mut tgt, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for (prompt, reply) in &rows {
            let n = prompt.len() + reply.len();
            let at = |i: usize| {
                if i < prompt.len() {
                    prompt[i]
                } else {
                    reply[i - prompt.len()]
                }
            };
            for t in 0..seq {
                inp.push(if t < n { at(t) } else { self.pad });
                tgt.push(if t + 1 < n { at(t + 1) } else { self.pad });
                // Position t predicts token t + 1: a reply token from the prompt's end.
                mask.push(f32::from(u8::from(t + 1 < n && t + 1 >= prompt.len())));
            }
        }
        let dev = self.model.device();
        let n = rows.len();
        Ok(DpoBatch {
            tokens: Tensor::from_vec(inp, (n, seq), dev)?,
            targets: Tensor::from_vec(tgt, (n, seq), dev)?,
            mask: Tensor::from_vec(mask, (n, seq), dev)?,
        })
    }

    /// The reference's sums for pairs `idx` (held out or not), chosen rows
    /// first, computed once per pair.
    fn reference_sums(&mut self, held_out: bool, idx: &[usize]) -> Result<Vec<f64>> {
        let missing: Vec<usize> = idx
            .iter()
            .copied()
            .filter(|i| !self.reference_sums.contains_key(&(held_out, *i)))
            .collect();
        if !missing.is_empty() {
            let data = self.pairs();
            let set = if held_out { &data.eval } else { &data.train };
            let pairs: Vec<&PairExample> = missing.iter().map(|&i| &set[i]).collect();
            let b = self.pair_batch(&pairs)?;
            let dtype = self.pos.config.precision.dtype(self.model.device());
            let sums = crate::dpo::sequence_logps(&self.model, &b, self.start.as_ref(), dtype)?;
            let k = missing.len();
            for (j, &i) in missing.iter().enumerate() {
                self.reference_sums
                    .insert((held_out, i), (sums[j], sums[k + j]));
            }
        }
        let got: Vec<(f64, f64)> = idx
            .iter()
            .map(|i| self.reference_sums[&(held_out, *i)])
            .collect();
        Ok(got
            .iter()
            .map(|g| g.0)
            .chain(got.iter().map(|g| g.1))
            .collect())
    }

    /// DPO metrics over the held-out pairs, a pair at a time.
    pub fn eval_dpo(&mut self) -> Result<Option<DpoMetrics>> {
        let n = match &self.data {
            TrainData::Pairs(p) if !p.eval.is_empty() => p.eval.len(),
            _ => return Ok(None),
        };
        let adapter = self.inference_adapter()?;
        let cfg = self.dpo_config();
        let dtype = self.pos.config.precision.dtype(self.model.device());
        let mut each = Vec::with_capacity(n);
        for i in 0..n {
            let reference = self.reference_sums(true, &[i])?;
            let b = self.pair_batch(&[&self.pairs().eval[i]])?;
            each.push(crate::dpo::dpo_eval(
                &self.model,
                &adapter,
                &reference,
                &b,
                cfg,
                dtype,
            )?);
        }
        Ok(Some(DpoMetrics::mean(&each)))
    }

    /// A DPO micro-batch's metrics, tokens and LoRA gradients.
    fn dpo_grads(
        &mut self,
        idx: &[usize],
        adapter: &LoraAdapter,
    ) -> Result<(DpoMetrics, usize, Vec<Option<Tensor>>)> {
        let reference = self.reference_sums(false, idx)?;
        let pairs: Vec<&PairExample> = idx.iter().map(|&i| &self.pairs().train[i]).collect();
        let tokens = pairs
            .iter()
            .map(|p| 2 * p.prompt.len() + p.chosen.len() + p.rejected.len())
            .sum();
        let b = self.pair_batch(&pairs)?;
        let c = &self.pos.config;
        let step = crate::dpo::dpo_step(
            &self.model,
            adapter,
            &reference,
            &b,
            self.dpo_config(),
            c.precision.dtype(self.model.device()),
            c.gradient_checkpointing,
        )?;
        Ok((step.metrics, tokens, self.slot_grads(step.grads)?))
    }

    /// The gradients by slot in the order of `vars`.
    fn slot_grads(&self, out: dramatis_llm::LossGrads) -> Result<Vec<Option<Tensor>>> {
        let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        for (layer, slot_grads) in out.grads.into_iter().enumerate() {
            for g in slot_grads {
                let &(_, _, v) = self
                    .slots
                    .iter()
                    .find(|s| s.0 == layer && s.1 == g.target)
                    .ok_or_else(|| {
                        Error::Config("a gradient for a slot that is not trained".into())
                    })?;
                grads[v] = Some(g.a);
                grads[v + 1] = Some(g.b);
            }
        }
        Ok(grads)
    }

    /// The next micro-batch, advancing the data position.
    /// The order is computed once per epoch, not per micro-batch.
    fn next_batch(&mut self) -> Vec<usize> {
        loop {
            if self.epoch_order.as_ref().map(|(e, _)| *e) != Some(self.pos.epoch) {
                let lengths = self.data.train_lengths();
                let c = &self.pos.config;
                let order = epoch_batches(&lengths, c.batch_size, c.seed, self.pos.epoch);
                self.epoch_order = Some((self.pos.epoch, order));
            }
            let (_, order) = self.epoch_order.as_ref().expect("set above");
            if let Some(b) = order.get(self.pos.batch) {
                self.pos.batch += 1;
                return b.clone();
            }
            self.pos.epoch += 1;
            self.pos.batch = 0;
        }
    }

    /// Trains until the last step or until `cancel` is set (checked before
    /// every step), reporting each step. Writes a checkpoint every
    /// `checkpoint_every` steps, on cancel, and at the end.
    pub fn run(
        &mut self,
        on_progress: &mut dyn FnMut(&TrainProgress),
        cancel: &AtomicBool,
    ) -> Result<Outcome> {
        let total = self.total_steps();
        let started = Instant::now();
        let mut tokens_seen = 0usize;
        let first_step = self.pos.step;
        while self.pos.step < total {
            if cancel.load(Ordering::SeqCst) {
                self.checkpoint()?;
                return Ok(Outcome::Cancelled);
            }
            let c = self.pos.config.clone();
            let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len()];
            let mut loss_sum = 0.0;
            let mut micro_dpo = Vec::new();
            let mut rows = Vec::new();
            for micro in 0..c.grad_accum {
                let idx = self.next_batch();
                let seed = c
                    .seed
                    .wrapping_mul(1_000_003)
                    .wrapping_add((self.pos.step * c.grad_accum + micro) as u64 + 1);
                let adapter = self.adapter(Some(seed));
                let (value, tokens, step_grads) = match &self.data {
                    TrainData::Text(p) => {
                        let examples: Vec<&Example> = idx.iter().map(|&i| &p.train[i]).collect();
                        rows.extend(examples.iter().map(|e| e.row));
                        self.loss_and_grads(&examples, &adapter)?
                    }
                    TrainData::Pairs(_) => {
                        let (m, tokens, g) = self.dpo_grads(&idx, &adapter)?;
                        micro_dpo.push(m);
                        (m.loss, tokens, g)
                    }
                };
                tokens_seen += tokens;
                loss_sum += value;
                for (i, gi) in step_grads.into_iter().enumerate() {
                    if let Some(gi) = gi {
                        grads[i] = Some(match grads[i].take() {
                            Some(acc) => (acc + gi)?,
                            None => gi,
                        });
                    }
                }
            }
            let grads: Vec<Tensor> = grads
                .into_iter()
                .zip(&self.vars)
                .map(|(g, v)| match g {
                    Some(g) => Ok((g / c.grad_accum as f64)?),
                    None => Ok(v.zeros_like()?),
                })
                .collect::<Result<_>>()?;
            let lr = c.schedule.lr(c.lr, self.pos.step, total);
            let grad_norm = self.optimizer.step(&self.vars, &grads, lr, c.clip)?;
            self.pos.step += 1;
            let loss = loss_sum / c.grad_accum as f64;
            self.pos.losses.push(loss);
            let is_dpo = matches!(self.data, TrainData::Pairs(_));
            let dpo = DpoMetrics::mean(&micro_dpo);
            if is_dpo {
                self.pos.dpo.push(dpo);
            }
            let last = self.pos.step == total;
            let mut eval_dpo = None;
            let eval_loss =
                if last || (c.eval_every > 0 && self.pos.step.is_multiple_of(c.eval_every)) {
                    let e = if is_dpo {
                        eval_dpo = self.eval_dpo()?;
                        if let Some(m) = eval_dpo {
                            self.pos.eval_dpo.push((self.pos.step, m));
                        }
                        eval_dpo.map(|m| m.loss)
                    } else {
                        self.eval_loss()?
                    };
                    if let Some(e) = e {
                        self.pos.eval_losses.push((self.pos.step, e));
                    }
                    e
                } else {
                    None
                };
            let checkpoint = last
                || (c.checkpoint_every > 0 && self.pos.step.is_multiple_of(c.checkpoint_every));
            let mut samples = Vec::new();
            if checkpoint {
                self.checkpoint()?;
                samples = self.samples()?;
            }
            let secs = started.elapsed().as_secs_f64();
            let done = (self.pos.step - first_step) as f64;
            on_progress(&TrainProgress {
                step: self.pos.step,
                total_steps: total,
                epoch: self.pos.epoch,
                loss,
                lr,
                grad_norm,
                tokens_per_sec: tokens_seen as f64 / secs.max(1e-9),
                tokens: tokens_seen,
                eta_secs: secs / done.max(1.0) * (total - self.pos.step) as f64,
                eval_loss,
                memory_bytes: dramatis_llm::rss_bytes(),
                checkpoint,
                samples,
                margin: is_dpo.then_some(dpo.margin),
                accuracy: is_dpo.then_some(dpo.accuracy),
                eval_margin: eval_dpo.map(|m| m.margin),
                eval_accuracy: eval_dpo.map(|m| m.accuracy),
                rows,
            });
        }
        Ok(Outcome::Finished)
    }

    fn checkpoint_dir(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }

    /// Writes the LoRA weights, optimizer moments and position: to a new
    /// folder first, then swapped in, so a failure leaves the last one whole.
    pub fn checkpoint(&self) -> Result<()> {
        let fin = self.checkpoint_dir();
        let tmp = self.dir.join("checkpoint.partial");
        let old = self.dir.join("checkpoint.old");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let write = || -> Result<()> {
            let lora = self.tensors()?;
            candle_core::safetensors::save(&lora, tmp.join("lora.safetensors"))?;
            let opt: HashMap<String, Tensor> = self
                .optimizer
                .state(&self.names)
                .into_iter()
                .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?)))
                .collect::<Result<_>>()?;
            candle_core::safetensors::save(&opt, tmp.join("optimizer.safetensors"))?;
            let state = serde_json::to_vec_pretty(&self.pos).expect("position serializes");
            std::fs::write(tmp.join("state.json"), state)
                .map_err(|e| Error::io(tmp.join("state.json"), e))?;
            for f in ["lora.safetensors", "optimizer.safetensors", "state.json"] {
                std::fs::File::open(tmp.join(f))
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io(tmp.join(f), e))?;
            }
            Ok(())
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let _ = std::fs::remove_dir_all(&old);
        if fin.exists() {
            std::fs::rename(&fin, &old).map_err(|e| Error::io(&fin, e))?;
        }
        std::fs::rename(&tmp, &fin).map_err(|e| Error::io(&fin, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Loads the newest whole checkpoint in the run folder, if any.
    fn resume(&mut self) -> Result<()> {
        let dir = [self.checkpoint_dir(), self.dir.join("checkpoint.old")]
            .into_iter()
            .find(|d| d.join("state.json").is_file());
        let Some(dir) = dir else { return Ok(()) };
        let bad = |m: String| Error::Checkpoint {
            path: dir.clone(),
            message: m,
        };
        let bytes = std::fs::read(dir.join("state.json"))
            .map_err(|e| Error::io(dir.join("state.json"), e))?;
        let pos: Position =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("unreadable state: {e}")))?;
        if pos.config != self.pos.config {
            return Err(bad(
                "it was written with other settings; start a new run or use the same settings"
                    .into(),
            ));
        }
        let device = self.model.device().clone();
        let lora = candle_core::safetensors::load(dir.join("lora.safetensors"), &device)
            .map_err(|e| bad(format!("unreadable LoRA weights: {e}")))?;
        for (n, v) in self.names.iter().zip(&self.vars) {
            let t = lora
                .get(n)
                .ok_or_else(|| bad(format!("`{n}` is missing")))?;
            if t.dims() != v.dims() {
                return Err(bad(format!("`{n}` has the wrong shape")));
            }
            v.set(t)?;
        }
        let opt = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &device)
            .map_err(|e| bad(format!("unreadable optimizer state: {e}")))?;
        self.optimizer
            .load_state(&self.names, &opt, pos.step)
            .ok_or_else(|| bad("the optimizer state is incomplete".into()))?;
        tracing::info!(step = pos.step, "resuming from a checkpoint");
        self.pos = pos;
        Ok(())
    }
}

/// A copy of `a` with no dropout, detached from any gradient.
fn frozen(a: &LoraAdapter) -> Result<LoraAdapter> {
    let mut a = a.clone();
    for l in &mut a.layers {
        for t in LoraTarget::ALL {
            if let Some(s) = l.slot(t) {
                let mut s = s.clone();
                s.a = s.a.detach().copy()?;
                s.b = s.b.detach().copy()?;
                s.dropout = 0.0;
                l.set(t, s);
            }
        }
    }
    Ok(a)
}

/// The (A, B) a run starting from `start` begins with in `layer`'s `t`, in f32.
fn start_slot(
    start: &LoraAdapter,
    layer: usize,
    t: LoraTarget,
    config: &TrainConfig,
    (fan_in, fan_out): (usize, usize),
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let s = start
        .layers
        .get(layer)
        .and_then(|l| l.slot(t))
        .ok_or_else(|| {
            Error::Config(format!(
                "the starting adapter has no {} in layer {layer}: train the targets it has",
                t.peft_name()
            ))
        })?;
    let want = config.alpha / config.r as f64;
    if s.a.dims() != [config.r, fan_in]
        || s.b.dims() != [fan_out, config.r]
        || (s.scale - want).abs() > 1e-6 * want.abs().max(1.0)
    {
        return Err(Error::Config(format!(
            "the starting adapter's {} in layer {layer} is rank {} with scale {}: \
             train with its rank and alpha",
            t.peft_name(),
            s.a.dims()[0],
            s.scale
        )));
    }
    let f32_on =
        |x: &Tensor| -> Result<Tensor> { Ok(x.to_dtype(DType::F32)?.to_device(device)?.copy()?) };
    Ok((f32_on(&s.a)?, f32_on(&s.b)?))
}
