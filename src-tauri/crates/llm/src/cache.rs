use candle_core::Tensor;

use crate::Result;

/// Keys and values of the tokens seen so far, per layer, in buffers that grow
/// in steps (a 2048-token Phi-2 cache is 1.3 GB in f32; most chats use less).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    max_len: usize,
}

#[derive(Debug, Clone, Default)]
struct LayerCache {
    /// `[b, heads, capacity, head_dim]` each.
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// Tokens added to a buffer's capacity at a time.
const GROW: usize = 256;

impl KvCache {
    /// An empty cache for `layers` blocks and at most `max_len` tokens.
    pub fn new(layers: usize, max_len: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); layers],
            len: 0,
            max_len,
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most tokens it can hold.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forgets everything after the first `len` tokens (prefix reuse).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Writes a layer's new keys and values (`[b, heads, new, d]`) after the
    /// held ones and returns views of all of them. [`KvCache::advance`]
    /// commits the length once every layer has appended.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let new = k.dim(2)?;
        let need = self.len + new;
        if need > self.max_len {
            return Err(crate::Error::Invalid(format!(
                "the context is full: {need} tokens exceed the model's {}",
                self.max_len
            )));
        }
        let lc = &mut self.layers[layer];
        for (slot, src) in [(&mut lc.k, k), (&mut lc.v, v)] {
            let cap = slot.as_ref().map_or(0, |t| t.dim(2).unwrap_or(0));
            let same_shape = slot.as_ref().is_some_and(|t| {
                t.dim(0).ok() == src.dim(0).ok()
                    && t.dim(1).ok() == src.dim(1).ok()
                    && t.dtype() == src.dtype()
            });
            if need > cap || !same_shape {
                let new_cap = need
                    .div_ceil(GROW)
                    .saturating_mul(GROW)
                    .max(cap * 2)
                    .min(self.max_len)
                    .max(need);
                let (b, h, _, d) = src.dims4()?;
                let buf = Tensor::zeros((b, h, new_cap, d), src.dtype(), src.device())?;
                if let Some(old) = slot.as_ref().filter(|_| same_shape && self.len > 0) {
                    buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                *slot = Some(buf);
            }
            let buf = slot.as_ref().expect("allocated above");
            buf.slice_set(&src.contiguous()?, 2, self.len)?;
        }
        let k_all = lc.k.as_ref().expect("set").narrow(2, 0, need)?;
        let v_all = lc.v.as_ref().expect("set").narrow(2, 0, need)?;
        Ok((k_all, v_all))
    }

    /// Moves the `len` tokens held at `from` to start at `to` in every layer,
    /// keys passed through `keys` (the rotary re-rotation), values as they
    /// are, and makes sure the buffers hold `to + len` tokens. What lies at
    /// other positions is untouched, the held length too: the caller sets it
    /// (see [`KvCache::set_len`]).
    pub(crate) fn move_block(
        &mut self,
        from: usize,
        to: usize,
        len: usize,
        keys: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        if from + len > self.len || to + len > self.max_len {
            return Err(crate::Error::Invalid(format!(
                "cannot move {len} cached tokens from {from} to {to}: {} held, {} at most",
                self.len, self.max_len
            )));
        }
        let held = self.len;
        for lc in &mut self.layers {
            for (slot, is_key) in [(&mut lc.k, true), (&mut lc.v, false)] {
                let Some(buf) = slot.as_ref() else { continue };
                let block = buf.narrow(2, from, len)?.contiguous()?;
                let block = if is_key { keys(&block)? } else { block };
                let cap = buf.dim(2)?;
                if to + len > cap {
                    let (b, h, _, d) = buf.dims4()?;
                    let new_cap = (to + len)
                        .div_ceil(GROW)
                        .saturating_mul(GROW)
                        .min(self.max_len);
                    let grown = Tensor::zeros((b, h, new_cap, d), buf.dtype(), buf.device())?;
                    grown.slice_set(&buf.narrow(2, 0, held)?.contiguous()?, 2, 0)?;
                    *slot = Some(grown);
                }
                slot.as_ref().expect("set").slice_set(&block, 2, to)?;
            }
        }
        Ok(())
    }

    /// Declares the first `len` positions held: after [`KvCache::move_block`]
    /// and the tokens computed before the moved block. `len` must not pass
    /// what the buffers hold.
    pub(crate) fn set_len(&mut self, len: usize) -> Result<()> {
        let cap = self
            .layers
            .iter()
            .filter_map(|l| l.k.as_ref())
            .map(|t| t.dim(2).unwrap_or(0))
            .min()
            .unwrap_or(0);
        if len > cap.min(self.max_len) {
            return Err(crate::Error::Invalid(format!(
                "the cache holds {cap} positions, not {len}"
            )));
        }
        self.len = len;
        Ok(())
    }

    /// Commits `new` appended tokens.
    pub(crate) fn advance(&mut self, new: usize) {
        self.len += new;
    }
}
