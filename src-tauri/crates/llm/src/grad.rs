//! Hand-written forward and backward passes of a block and of the head, for
//! LoRA training.
//!
//! candle's autograd is general: its backward pass computes the gradient of
//! every operand of a matmul (the frozen base weights too, which costs a
//! third more matmul work), starts each gradient from zeros and adds to it,
//! and keeps every intermediate of the graph alive until the end. A LoRA
//! step needs none of that: these functions compute only the gradients that
//! reach the LoRA slots and the block's input, with the fused kernels for
//! layer norm, softmax and rotary embedding in the forward pass, in the
//! dtype of the hidden states (bf16 on a GPU, f32 on the CPU; layer-norm
//! statistics and the loss in f32). The autograd path
//! ([`Phi::forward_train`]) stays as the reference they are tested against.

use candle_core::{D, DType, Tensor};

use crate::kernels;
use crate::linear::Linear;
use crate::lora::{LoraLayer, LoraSlot, LoraTarget};
use crate::model::Phi;
use crate::profile::phase;
use crate::{Error, Result};

/// Rows of logits computed at once by [`Phi::head_loss_backward`] (the
/// logits of a whole batch in f32 would be 0.8 GB for Phi-2 at 2×2048, and
/// its log-softmax and gradient as much again each).
const HEAD_CHUNK_ROWS: usize = 256;

/// What a block's backward pass needs from its forward pass. Kept when the
/// forward pass is asked to (no gradient checkpointing), recomputed from the
/// block's input otherwise.
#[derive(Debug)]
pub struct BlockActivations {
    /// Normed input, `[n, hidden]`.
    h: Tensor,
    /// Query (rotated, scaled), key (rotated) and value, `[b, heads, seq, head_dim]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// What attention keeps for its backward pass.
    attn: Attn,
    /// Attention output before the dense projection, `[n, hidden]`.
    o: Tensor,
    /// fc1's output before and after the activation, `[n, intermediate]`.
    u: Tensor,
    a: Tensor,
}

/// What the attention forward pass keeps for the backward pass.
#[derive(Debug)]
enum Attn {
    /// The probabilities, `[b, heads, seq, seq]`.
    Probs(Tensor),
    /// Each query's log-sum-exp, `[b, heads, seq]` (the flash kernels
    /// recompute the probabilities from it).
    #[cfg(feature = "cuda")]
    Lse(Tensor),
}

/// The gradients of one LoRA slot (f32, shaped like the slot's A and B).
#[derive(Debug, Clone)]
pub struct SlotGrads {
    /// Which module the slot adapts.
    pub target: LoraTarget,
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
}

/// `x Wᵀ + b` on 2-D `x`, the weight in `x`'s dtype (dequantized for this
/// call when the layer is quantized).
fn linear(lin: &Linear, x: &Tensor) -> Result<Tensor> {
    project(x, &lin.weight_as(x.dtype())?, lin.bias())
}

/// `x Wᵀ + b` with the weight at hand.
fn project(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dev = x.device();
    let y = phase(dev, "  matmul", || Ok(x.matmul(&w.t()?)?))?;
    match bias {
        Some(b) => phase(dev, "  bias", || kernels::bias_add(&y, b)),
        None => Ok(y),
    }
}

/// The LoRA slots of one projection, multiplied together: q, k and v of the
/// fused qkv projection share its input, so `x Aᵀ` is one product of all
/// their ranks (`R` columns) instead of one skinny product each, and one
/// dropout mask (the first slot's seed) serves them all — each slot still
/// drops its input elements with its probability; the masks of q, k and v
/// are the same one. The deltas come out of one product with a
/// block-diagonal `B`, each slot's block on its slice of the output.
struct Group<'a> {
    slots: &'a [(LoraTarget, &'a LoraSlot)],
    /// `[R, in]`: each slot's A times its scale, stacked.
    a: Tensor,
    /// `[out, R]`: each slot's B on its rows and its rank's columns.
    b: Tensor,
    dropout: f32,
    seed: u64,
}

impl<'a> Group<'a> {
    /// The group of `slots` for a projection of `out` columns, in `dt`.
    /// The slots' A and B are detached: the slots of a training run are
    /// candle `Var`s, and anything computed from a `Var` records its graph,
    /// which would keep every intermediate of every block alive.
    fn new(slots: &'a [(LoraTarget, &'a LoraSlot)], out: usize, dt: DType) -> Result<Self> {
        let first = slots[0].1;
        if slots.iter().any(|(_, s)| s.dropout != first.dropout) {
            return Err(crate::Error::Invalid(
                "LoRA slots on one projection with different dropout".into(),
            ));
        }
        let mut a = Vec::with_capacity(slots.len());
        let mut b = Vec::with_capacity(slots.len());
        for (_, s) in slots {
            let (sa, sb) = (s.a.detach().to_dtype(dt)?, s.b.detach().to_dtype(dt)?);
            let (w, r) = sb.dims2()?;
            if s.out_offset + w > out {
                return Err(crate::Error::Invalid(format!(
                    "a LoRA slot writes columns {}..{} of a {out}-column projection",
                    s.out_offset,
                    s.out_offset + w
                )));
            }
            a.push((sa * s.scale)?);
            let dev = sb.device().clone();
            let mut rows = Vec::with_capacity(3);
            if s.out_offset > 0 {
                rows.push(Tensor::zeros((s.out_offset, r), dt, &dev)?);
            }
            rows.push(sb);
            if s.out_offset + w < out {
                rows.push(Tensor::zeros((out - s.out_offset - w, r), dt, &dev)?);
            }
            b.push(Tensor::cat(&rows, 0)?);
        }
        Ok(Self {
            slots,
            a: Tensor::cat(&a, 0)?,
            b: Tensor::cat(&b, 1)?,
            dropout: first.dropout,
            seed: first.dropout_seed,
        })
    }

    /// The group's dropout applied to `x` (its input, or the gradient of its
    /// input: the mask depends only on the shape and the seed).
    fn dropped(&self, x: &Tensor) -> Result<Tensor> {
        if self.dropout <= 0.0 {
            return Ok(x.clone());
        }
        phase(x.device(), "  dropout", || {
            kernels::dropout(x, self.dropout, self.seed)
        })
    }

    /// `Σ scale · (dropout(x) Aᵀ) Bᵀ` on each slot's columns, for 2-D `x`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let z = self.dropped(x)?.matmul(&self.a.t()?)?;
        Ok(z.matmul(&self.b.t()?)?)
    }

    /// The slots' gradients for output gradient `g` (`[n, out]`), appended
    /// to `grads` in slot order, and their part of the input's gradient.
    fn backward(&self, x: &Tensor, g: &Tensor, grads: &mut Vec<SlotGrads>) -> Result<Tensor> {
        let xd = self.dropped(x)?;
        // z (scaled), then every slot's B gradient among the blocks of gᵀz.
        let z = xd.matmul(&self.a.t()?)?;
        let gb = g.t()?.matmul(&z)?;
        // g B per slot (unscaled), then A's gradient: scale · (g B)ᵀ dropout(x).
        let gz = g.matmul(&self.b)?;
        let ga = gz.t()?.matmul(&xd)?;
        let mut rank = 0;
        for &(target, s) in self.slots {
            let (w, r) = s.b.dims2()?;
            grads.push(SlotGrads {
                target,
                a: (ga.narrow(0, rank, r)? * s.scale)?.to_dtype(DType::F32)?,
                b: gb
                    .narrow(0, s.out_offset, w)?
                    .narrow(1, rank, r)?
                    .to_dtype(DType::F32)?,
            });
            rank += r;
        }
        self.dropped(&gz.matmul(&self.a)?)
    }
}

/// A linear layer with its LoRA slots (see [`Group`]).
fn adapted(lin: &Linear, x: &Tensor, slots: &[(LoraTarget, &LoraSlot)]) -> Result<Tensor> {
    let y = linear(lin, x)?;
    if slots.is_empty() {
        return Ok(y);
    }
    let d = phase(x.device(), "  lora", || {
        Group::new(slots, y.dim(1)?, x.dtype())?.forward(x)
    })?;
    phase(x.device(), "  lora add", || Ok((y + d)?))
}

/// The input gradient of [`adapted`] (frozen weight plus slots), and the
/// slots' gradients appended to `grads`.
fn adapted_backward(
    lin: &Linear,
    x: &Tensor,
    g: &Tensor,
    slots: &[(LoraTarget, &LoraSlot)],
    grads: &mut Vec<SlotGrads>,
) -> Result<Tensor> {
    let w = lin.weight_as(g.dtype())?;
    let gx = phase(g.device(), "  matmul back", || Ok(g.matmul(&w)?))?;
    if slots.is_empty() {
        return Ok(gx);
    }
    let gxs = phase(g.device(), "  lora back", || {
        Group::new(slots, g.dim(1)?, x.dtype())?.backward(x, g, grads)
    })?;
    Ok((gx + gxs)?)
}

fn targets<'a>(l: &'a LoraLayer, ts: &[LoraTarget]) -> Vec<(LoraTarget, &'a LoraSlot)> {
    ts.iter()
        .filter_map(|&t| l.slot(t).map(|s| (t, s)))
        .collect()
}

fn layer_norm(n: &candle_nn::LayerNorm, x: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let w = n.weight().to_dtype(dt)?;
    let b = match n.bias() {
        Some(b) => b.to_dtype(dt)?,
        None => w.zeros_like()?,
    };
    Ok(candle_nn::ops::layer_norm(x, &w, &b, eps as f32)?)
}

impl Phi {
    /// Gradient-free rotary embedding of the first `rotary_dim` dims of each
    /// head; `inverse` rotates back (the backward pass of a rotation).
    fn rotate(&self, x: &Tensor, seq: usize, inverse: bool) -> Result<Tensor> {
        let rd = self.cfg.rotary_dim();
        let hd = self.cfg.head_dim();
        let dt = x.dtype();
        let cos = self.cos.narrow(0, 0, seq)?.to_dtype(dt)?;
        let sin = self.sin.narrow(0, 0, seq)?.to_dtype(dt)?;
        let sin = if inverse { sin.neg()? } else { sin };
        let rot = x.narrow(D::Minus1, 0, rd)?.contiguous()?;
        let rot = candle_nn::rotary_emb::rope(&rot, &cos, &sin)?;
        if rd == hd {
            return Ok(rot);
        }
        let pass = x.narrow(D::Minus1, rd, hd - rd)?;
        Ok(Tensor::cat(&[&rot, &pass], D::Minus1)?.contiguous()?)
    }

    #[cfg(feature = "cuda")]
    fn qkv_shape(&self, batch: usize, seq: usize) -> kernels::QkvShape {
        kernels::QkvShape {
            batch,
            seq,
            heads: self.cfg.num_attention_heads,
            head_dim: self.cfg.head_dim(),
            rotary_dim: self.cfg.rotary_dim(),
            scale: 1.0 / (self.cfg.head_dim() as f32).sqrt(),
        }
    }

    /// The fused projection `[b·seq, 3·hidden]` split into q (rotated and
    /// scaled by 1/√head_dim), k (rotated) and v, each `[b, heads, seq, head_dim]`.
    fn split_rotate(&self, qkv: &Tensor, b: usize, seq: usize) -> Result<(Tensor, Tensor, Tensor)> {
        if qkv.device().is_cuda() {
            #[cfg(feature = "cuda")]
            {
                let s = self.qkv_shape(b, seq);
                let out = kernels::qkv_rope(qkv, &self.cos, &self.sin, s, false)?;
                return Ok((out.get(0)?, out.get(1)?, out.get(2)?));
            }
        }
        let (heads, hd) = (self.cfg.num_attention_heads, self.cfg.head_dim());
        let qkv = qkv.reshape((b, seq, 3, heads, hd))?;
        let part = |j: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, j, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let scale = 1.0 / (hd as f64).sqrt();
        Ok((
            (self.rotate(&part(0)?, seq, false)? * scale)?,
            self.rotate(&part(1)?, seq, false)?,
            part(2)?,
        ))
    }

    /// The backward pass of [`Phi::split_rotate`]: the gradient of the fused
    /// projection from those of q, k and v.
    fn rotate_back(
        &self,
        g_q: &Tensor,
        g_k: &Tensor,
        g_v: &Tensor,
        b: usize,
        seq: usize,
    ) -> Result<Tensor> {
        let hidden = self.cfg.hidden_size;
        if g_q.device().is_cuda() {
            #[cfg(feature = "cuda")]
            {
                let s = self.qkv_shape(b, seq);
                let stacked = Tensor::stack(&[g_q, g_k, g_v], 0)?;
                return kernels::qkv_rope(&stacked, &self.cos, &self.sin, s, true);
            }
        }
        let scale = 1.0 / (self.cfg.head_dim() as f64).sqrt();
        let g_q = self.rotate(&(g_q * scale)?, seq, true)?;
        let g_k = self.rotate(g_k, seq, true)?;
        Ok(Tensor::stack(
            &[
                g_q.transpose(1, 2)?,
                g_k.transpose(1, 2)?,
                g_v.transpose(1, 2)?,
            ],
            2,
        )?
        .reshape((b * seq, 3 * hidden))?)
    }

    fn block_at(&self, i: usize) -> Result<&crate::model::Block> {
        self.blocks
            .get(i)
            .ok_or_else(|| Error::Invalid(format!("no block {i}")))
    }

    /// Block `i` on hidden states `x` (`[b, seq, hidden]` from position 0,
    /// in the training dtype), without a graph. With `keep`, also returns
    /// what [`Phi::block_backward`] needs, so it need not recompute it.
    pub fn block_forward(
        &self,
        i: usize,
        x: &Tensor,
        lora: &LoraLayer,
        keep: bool,
    ) -> Result<(Tensor, Option<BlockActivations>)> {
        let block = self.block_at(i)?;
        let (b, seq, hidden) = x.dims3()?;
        let n = b * seq;
        let eps = self.cfg.layer_norm_eps;
        let dev = x.device();
        let x2 = x.reshape((n, hidden))?;
        let h = phase(dev, "fwd norm", || layer_norm(&block.norm, &x2, eps))?;

        let qkv = phase(dev, "fwd qkv", || {
            adapted(
                &block.qkv,
                &h,
                &targets(lora, &[LoraTarget::Q, LoraTarget::K, LoraTarget::V]),
            )
        })?;
        let (q, k, v) = phase(dev, "fwd rope", || self.split_rotate(&qkv, b, seq))?;
        let (attn_kept, o) = phase(dev, "fwd attention", || {
            #[cfg(feature = "cuda")]
            if crate::flash::takes(&q) {
                let (o, lse) = crate::flash::forward(&q, &k, &v)?;
                return Ok((Attn::Lse(lse), o));
            }
            let scores = phase(dev, "  fwd q·k", || Ok(q.matmul(&k.t()?)?))?;
            let p = phase(dev, "  fwd softmax", || kernels::causal_softmax(&scores))?;
            drop(scores);
            let o = phase(dev, "  fwd p·v", || {
                Ok(p.matmul(&v)?.transpose(1, 2)?.reshape((n, hidden))?)
            })?;
            Ok((Attn::Probs(p), o))
        })?;
        let attn = phase(dev, "fwd dense", || {
            adapted(&block.dense, &o, &targets(lora, &[LoraTarget::Dense]))
        })?;
        let (u, a, mlp) = phase(dev, "fwd mlp", || {
            let u = adapted(&block.fc1, &h, &targets(lora, &[LoraTarget::Fc1]))?;
            let a = phase(dev, "  gelu", || Ok(u.gelu()?))?;
            let mlp = adapted(&block.fc2, &a, &targets(lora, &[LoraTarget::Fc2]))?;
            Ok((u, a, mlp))
        })?;
        let y = ((attn + mlp)? + &x2)?.reshape((b, seq, hidden))?;
        let acts = keep.then_some(BlockActivations {
            h,
            q,
            k,
            v,
            attn: attn_kept,
            o,
            u,
            a,
        });
        Ok((y, acts))
    }

    /// The backward pass of block `i`: from the gradient `gy` of its output,
    /// the gradient of its input `x` and of every LoRA slot in `lora`.
    /// `acts` from [`Phi::block_forward`] with `keep`, or `None` to recompute
    /// them (gradient checkpointing).
    pub fn block_backward(
        &self,
        i: usize,
        x: &Tensor,
        lora: &LoraLayer,
        acts: Option<BlockActivations>,
        gy: &Tensor,
    ) -> Result<(Tensor, Vec<SlotGrads>)> {
        let acts = match acts {
            Some(a) => a,
            None => self
                .block_forward(i, x, lora, true)?
                .1
                .expect("kept when asked"),
        };
        let block = self.block_at(i)?;
        let (b, seq, hidden) = x.dims3()?;
        let n = b * seq;
        let heads = self.cfg.num_attention_heads;
        let hd = self.cfg.head_dim();
        let gy = gy.to_dtype(x.dtype())?.reshape((n, hidden))?;
        let mut grads = Vec::new();

        let dev = x.device();
        let BlockActivations {
            h,
            q,
            k,
            v,
            attn,
            o,
            u,
            a,
        } = acts;

        // MLP: fc2(gelu(fc1(h))).
        let mut g_h = phase(dev, "bwd mlp", || {
            let fc2 = targets(lora, &[LoraTarget::Fc2]);
            let g_a = adapted_backward(&block.fc2, &a, &gy, &fc2, &mut grads)?;
            drop(a);
            let g_u = kernels::gelu_backward(&u, &g_a)?;
            drop(u);
            let fc1 = targets(lora, &[LoraTarget::Fc1]);
            adapted_backward(&block.fc1, &h, &g_u, &fc1, &mut grads)
        })?;

        // Attention: dense(softmax(q kᵀ + mask) v).
        let g_o = phase(dev, "bwd dense", || {
            let dense = targets(lora, &[LoraTarget::Dense]);
            adapted_backward(&block.dense, &o, &gy, &dense, &mut grads)
        })?;
        let (g_q, g_k, g_v) = phase(dev, "bwd attention", || match attn {
            #[cfg(feature = "cuda")]
            Attn::Lse(lse) => Ok(crate::flash::backward(&q, &k, &v, &o, &lse, &g_o)?),
            Attn::Probs(p) => {
                // Taken by value: the [n, hidden] gradient is freed once
                // copied into the heads' layout, before the peak below.
                let g_o = { g_o }
                    .reshape((b, seq, heads, hd))?
                    .transpose(1, 2)?
                    .contiguous()?;
                let g_v = phase(dev, "  bwd pᵀ·g", || Ok(p.t()?.matmul(&g_o)?))?;
                let g_p = phase(dev, "  bwd g·vᵀ", || Ok(g_o.matmul(&v.t()?)?))?;
                let g_s = phase(dev, "  bwd softmax", || kernels::softmax_backward(&p, &g_p))?;
                drop(g_p);
                let g_q = phase(dev, "  bwd g·k", || Ok(g_s.matmul(&k)?))?;
                let g_k = phase(dev, "  bwd gᵀ·q", || Ok(g_s.t()?.matmul(&q)?))?;
                Ok((g_q, g_k, g_v))
            }
        })?;
        drop(o);
        let g_qkv = phase(dev, "bwd rope", || {
            self.rotate_back(&g_q, &g_k, &g_v, b, seq)
        })?;
        g_h = phase(dev, "bwd qkv", || {
            let qkv = targets(lora, &[LoraTarget::Q, LoraTarget::K, LoraTarget::V]);
            Ok((g_h + adapted_backward(&block.qkv, &h, &g_qkv, &qkv, &mut grads)?)?)
        })?;

        let x2 = x.reshape((n, hidden))?;
        let gx = phase(dev, "bwd norm", || {
            Ok((kernels::layer_norm_backward(
                &x2,
                block.norm.weight(),
                self.cfg.layer_norm_eps,
                &g_h,
            )? + &gy)?)
        })?;
        Ok((gx.reshape((b, seq, hidden))?, grads))
    }

    /// The head and the loss: weighted cross-entropy of the logits of the
    /// last hidden states `x` (`[b, seq, hidden]`) against `targets` (u32)
    /// with per-position `weights` (f32, both `[b, seq]`), divided by
    /// `denom`. Returns the loss (a scalar on the device: reading it waits
    /// for the GPU) and its gradient with respect to `x`, the logits computed
    /// a chunk of rows at a time.
    pub fn head_loss_backward(
        &self,
        x: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        denom: f64,
    ) -> Result<(Tensor, Tensor)> {
        let (b, seq, hidden) = x.dims3()?;
        let n = b * seq;
        let dt = x.dtype();
        let x2 = x.reshape((n, hidden))?;
        let tgt = targets.flatten_all()?.unsqueeze(1)?;
        let w = (weights.flatten_all()?.to_dtype(DType::F32)? / denom)?.unsqueeze(1)?;
        let eps = self.cfg.layer_norm_eps;
        // Once for every chunk (a quantized head is dequantized here).
        let w_head = self.lm_head.weight_as(dt)?;
        let mut loss: Option<Tensor> = None;
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let rows = HEAD_CHUNK_ROWS.min(n - start);
            let xc = x2.narrow(0, start, rows)?;
            let tc = tgt.narrow(0, start, rows)?;
            let wc = w.narrow(0, start, rows)?;
            let hf = layer_norm(&self.final_norm, &xc, eps)?;
            let logits = project(&hf, &w_head, self.lm_head.bias())?;
            let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
            drop(logits);
            let picked = logp.gather(&tc, 1)?;
            // Summed on the device: reading it back would wait for the GPU.
            let l = (picked * &wc)?.sum_all()?;
            loss = Some(match loss {
                Some(acc) => (acc + l)?,
                None => l,
            });
            // d loss / d logits = w · (softmax − one-hot(target)).
            let g = logp.exp()?.broadcast_mul(&wc)?;
            drop(logp);
            g.scatter_add_set(&tc, &wc.neg()?, 1)?;
            let g_hf = g.to_dtype(dt)?.matmul(&w_head)?;
            drop(g);
            parts.push(kernels::layer_norm_backward(
                &xc,
                self.final_norm.weight(),
                eps,
                &g_hf,
            )?);
            start += rows;
        }
        let gx = Tensor::cat(&parts, 0)?.reshape((b, seq, hidden))?;
        let loss = match loss {
            Some(l) => l.neg()?,
            None => Tensor::zeros((), DType::F32, x.device())?,
        };
        Ok((loss, gx))
    }
}

/// A training forward pass waiting for its backward pass.
#[derive(Debug)]
pub struct TrainForward {
    inputs: Vec<Tensor>,
    kept: Vec<Option<BlockActivations>>,
    /// The last block's output, `[b, seq, hidden]`.
    pub hidden: Tensor,
}

/// The loss of a batch and the gradients of every LoRA slot.
#[derive(Debug)]
pub struct LossGrads {
    /// Weighted mean cross-entropy.
    pub loss: f64,
    /// Per block, the gradients of its slots.
    pub grads: Vec<Vec<SlotGrads>>,
}

impl Phi {
    /// One training pass: the weighted cross-entropy of `tokens` (`[b, seq]`,
    /// u32) predicting `targets` with per-position `weights` (divided by their
    /// sum, at least 1), and the gradients of `lora`'s slots. The passes run
    /// in `dtype`; with `checkpointing`, only each block's input is kept and
    /// the block is recomputed in the backward pass (the activation memory of
    /// one block instead of all, for a third more compute).
    pub fn lora_loss_and_grads(
        &self,
        tokens: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        lora: &crate::LoraAdapter,
        dtype: DType,
        checkpointing: bool,
    ) -> Result<LossGrads> {
        let denom = f64::from(
            weights
                .sum_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?,
        )
        .max(1.0);
        self.lora_weighted_grads(tokens, targets, weights, denom, lora, dtype, checkpointing)
    }

    /// [`Phi::lora_loss_and_grads`] with the weights divided by `denom` as
    /// given (any sign): the loss is `-Σ w·log p / denom`. Objectives other
    /// than cross-entropy (DPO) set per-position weights to their gradient
    /// with respect to each sequence's log-probability.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_weighted_grads(
        &self,
        tokens: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        denom: f64,
        lora: &crate::LoraAdapter,
        dtype: DType,
        checkpointing: bool,
    ) -> Result<LossGrads> {
        let fwd = self.lora_train_forward(tokens, lora, dtype, checkpointing)?;
        self.lora_backward(fwd, targets, weights, denom, lora)
    }

    /// The forward half of a training pass: the final hidden states, and
    /// what the backward pass needs (each block's input, and with
    /// `checkpointing` off its activations). Objectives whose weights
    /// depend on the forward's result (DPO) read [`Phi::target_logps`] of
    /// it, then finish with [`Phi::lora_backward`]: one forward, not two.
    pub fn lora_train_forward(
        &self,
        tokens: &Tensor,
        lora: &crate::LoraAdapter,
        dtype: DType,
        checkpointing: bool,
    ) -> Result<TrainForward> {
        let n = self.num_blocks();
        if lora.layers.len() != n {
            return Err(Error::Invalid(format!(
                "the adapter has {} layers, the model {n}",
                lora.layers.len()
            )));
        }
        let mut inputs = Vec::with_capacity(n);
        let mut kept = Vec::with_capacity(n);
        let mut x = self.train_embed(tokens, dtype)?;
        for (i, layer) in lora.layers.iter().enumerate() {
            let (y, acts) = self.block_forward(i, &x, layer, !checkpointing)?;
            debug_assert!(!y.track_op(), "the training passes record no graph");
            inputs.push(x);
            kept.push(acts);
            x = y;
        }
        Ok(TrainForward {
            inputs,
            kept,
            hidden: x,
        })
    }

    /// The backward half: the head's loss and gradient from `fwd`, then
    /// each block's, back to the first.
    pub fn lora_backward(
        &self,
        fwd: TrainForward,
        targets: &Tensor,
        weights: &Tensor,
        denom: f64,
        lora: &crate::LoraAdapter,
    ) -> Result<LossGrads> {
        let TrainForward {
            mut inputs,
            mut kept,
            hidden: x,
        } = fwd;
        let n = inputs.len();
        let (loss, mut g) = phase(x.device(), "head and loss", || {
            self.head_loss_backward(&x, targets, weights, denom)
        })?;
        drop(x);
        let mut grads = vec![Vec::new(); n];
        for i in (0..n).rev() {
            let x = inputs.pop().expect("one input per block");
            let acts = kept.pop().expect("one entry per block");
            let (gx, slot_grads) = self.block_backward(i, &x, &lora.layers[i], acts, &g)?;
            grads[i] = slot_grads;
            g = gx;
        }
        let loss = f64::from(loss.to_scalar::<f32>()?);
        Ok(LossGrads { loss, grads })
    }

    /// `log p(target)` at every position of final hidden states `x`
    /// (`[b, seq, hidden]`): `[b, seq]` f32, computed in row chunks so the
    /// `[b, seq, vocab]` logits never exist at once.
    pub fn target_logps(&self, x: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b, seq, hidden) = x.dims3()?;
        let n = b * seq;
        let x2 = x.reshape((n, hidden))?;
        let tgt = targets.flatten_all()?.unsqueeze(1)?;
        let w_head = self.lm_head.weight_as(x.dtype())?;
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let rows = HEAD_CHUNK_ROWS.min(n - start);
            let hf = layer_norm(
                &self.final_norm,
                &x2.narrow(0, start, rows)?,
                self.cfg.layer_norm_eps,
            )?;
            let logits = project(&hf, &w_head, self.lm_head.bias())?;
            let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
            parts.push(logp.gather(&tgt.narrow(0, start, rows)?, 1)?);
            start += rows;
        }
        Ok(Tensor::cat(&parts, 0)?.reshape((b, seq))?)
    }

    /// `log p(target)` at every position with `lora` (or the base alone),
    /// keeping nothing for a backward pass: `[b, seq]` f32. For scoring and
    /// a DPO reference.
    pub fn score_targets(
        &self,
        tokens: &Tensor,
        targets: &Tensor,
        lora: Option<&crate::LoraAdapter>,
        dtype: DType,
    ) -> Result<Tensor> {
        let none = crate::LoraLayer::default();
        let mut x = self.train_embed(tokens, dtype)?;
        for i in 0..self.num_blocks() {
            let layer = lora.and_then(|l| l.layers.get(i)).unwrap_or(&none);
            x = self.block_forward(i, &x, layer, false)?.0;
        }
        self.target_logps(&x, targets)
    }
}
