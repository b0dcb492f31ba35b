use candle_core::{CpuStorage, D, DType, Layout, Tensor};

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
    /// keys turned by `rotation`, values as they are, and makes sure the
    /// buffers hold `to + len` tokens. What lies at other positions is
    /// untouched, the held length too: the caller sets it (see
    /// [`KvCache::set_len`]).
    pub(crate) fn move_block(
        &mut self,
        from: usize,
        to: usize,
        len: usize,
        rotation: &KeyRotation,
    ) -> Result<()> {
        if from + len > self.len || to + len > self.max_len {
            return Err(crate::Error::Invalid(format!(
                "cannot move {len} cached tokens from {from} to {to}: {} held, {} at most",
                self.len, self.max_len
            )));
        }
        let held = self.len;
        let mut tables = None;
        for lc in &mut self.layers {
            for (slot, is_key) in [(&mut lc.k, true), (&mut lc.v, false)] {
                let Some(buf) = slot.as_ref() else { continue };
                if to + len > buf.dim(2)? {
                    let (b, h, _, d) = buf.dims4()?;
                    let new_cap = (to + len)
                        .div_ceil(GROW)
                        .saturating_mul(GROW)
                        .min(self.max_len);
                    let grown = Tensor::zeros((b, h, new_cap, d), buf.dtype(), buf.device())?;
                    grown.slice_set(&buf.narrow(2, 0, held)?.contiguous()?, 2, 0)?;
                    *slot = Some(grown);
                }
                let buf = slot.as_ref().expect("set");
                let rotate = is_key.then_some(rotation);
                if buf.device().is_cpu() {
                    // One pass in place: no copy of the block, no temporaries.
                    buf.inplace_op1(&MoveRows {
                        from,
                        to,
                        len,
                        rotate,
                    })?;
                } else {
                    let block = buf.narrow(2, from, len)?.contiguous()?;
                    let block = match rotate {
                        Some(r) => {
                            if tables.is_none() {
                                tables = Some(r.tables(len, buf.device())?);
                            }
                            r.apply_with(&block, tables.as_ref().expect("set"))?
                        }
                        None => block,
                    };
                    buf.slice_set(&block, 2, to)?;
                }
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

/// A turn of the rotary part of cached keys by a whole number of positions:
/// per pair `i` of the first `2·cos.len()` dimensions (GPT-NeoX halves),
/// `(x₁, x₂) → (x₁ cos − x₂ sin, x₂ cos + x₁ sin)`.
#[derive(Debug, Clone)]
pub(crate) struct KeyRotation {
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
}

impl KeyRotation {
    /// The rotated copy of keys `[b, heads, n, head_dim]` (any device), in their dtype.
    #[cfg(test)]
    pub(crate) fn apply(&self, k: &Tensor) -> Result<Tensor> {
        let tables = self.tables(k.dim(2)?, k.device())?;
        self.apply_with(k, &tables)
    }

    /// cos and sin as `[n, pairs]` tensors on `device`: made once per move,
    /// not once per layer (each is a host-to-device copy on a GPU).
    pub(crate) fn tables(
        &self,
        n: usize,
        device: &candle_core::Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.cos.len();
        let row = |v: &[f32]| -> Result<Tensor> {
            Ok(Tensor::from_slice(v, (1, half), device)?
                .broadcast_as((n.max(1), half))?
                .contiguous()?)
        };
        Ok((row(&self.cos)?, row(&self.sin)?))
    }

    /// [`KeyRotation::apply`] with tables from [`KeyRotation::tables`].
    pub(crate) fn apply_with(&self, k: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Result<Tensor> {
        let rd = 2 * self.cos.len();
        if k.dim(2)? == 0 {
            return Ok(k.clone());
        }
        let out = k.to_dtype(DType::F32)?.contiguous()?;
        let rot = out.narrow(D::Minus1, 0, rd)?.contiguous()?;
        let rot = candle_nn::rotary_emb::rope(&rot, cos, sin)?;
        // The copy is ours: write the turned dims back into it.
        out.slice_set(&rot, 3, 0)?;
        Ok(out.to_dtype(k.dtype())?)
    }

    fn turn(&self, row: &mut [f32]) {
        let half = self.cos.len();
        for i in 0..half {
            let (x1, x2) = (row[i], row[i + half]);
            row[i] = x1 * self.cos[i] - x2 * self.sin[i];
            row[i + half] = x2 * self.cos[i] + x1 * self.sin[i];
        }
    }
}

/// Moves rows `from..from+len` of every `[capacity, head_dim]` plane of a
/// contiguous `[b, heads, capacity, head_dim]` buffer to start at `to`, in
/// place, turning each moved row by `rotate` when given.
struct MoveRows<'a> {
    from: usize,
    to: usize,
    len: usize,
    rotate: Option<&'a KeyRotation>,
}

impl MoveRows<'_> {
    fn run<T: Copy>(
        &self,
        data: &mut [T],
        layout: &Layout,
        to_f32: impl Fn(T) -> f32,
        from_f32: impl Fn(f32) -> T,
    ) -> candle_core::Result<()> {
        let (b, h, cap, hd) = layout.shape().dims4()?;
        if !layout.is_contiguous() {
            candle_core::bail!("the KV cache buffer is not contiguous");
        }
        let data = &mut data[layout.start_offset()..layout.start_offset() + b * h * cap * hd];
        let mut row = vec![0f32; hd];
        for plane in data.chunks_exact_mut(cap * hd) {
            let src = self.from * hd..(self.from + self.len) * hd;
            plane.copy_within(src, self.to * hd);
            let Some(r) = self.rotate else { continue };
            for dst in plane[self.to * hd..(self.to + self.len) * hd].chunks_exact_mut(hd) {
                for (x, y) in row.iter_mut().zip(dst.iter()) {
                    *x = to_f32(*y);
                }
                r.turn(&mut row);
                for (y, x) in dst.iter_mut().zip(&row) {
                    *y = from_f32(*x);
                }
            }
        }
        Ok(())
    }
}

impl candle_core::InplaceOp1 for MoveRows<'_> {
    fn name(&self) -> &'static str {
        "kv-move-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        match storage {
            CpuStorage::F32(v) => self.run(v, layout, |x| x, |x| x),
            CpuStorage::F16(v) => self.run(v, layout, |x| x.to_f32(), half::f16::from_f32),
            CpuStorage::BF16(v) => self.run(v, layout, |x| x.to_f32(), half::bf16::from_f32),
            _ => candle_core::bail!("a KV cache must be f32, f16 or bf16 to move"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rotation() -> KeyRotation {
        let (cos, sin) = (0..8)
            .map(|i| ((i as f32 * 0.7).cos(), (i as f32 * 0.7).sin()))
            .unzip();
        KeyRotation { cos, sin }
    }

    /// A cache of one layer holding `n` random tokens, and its K and V as vectors.
    fn filled(n: usize) -> KvCache {
        let mut c = KvCache::new(1, 64);
        let k = Tensor::randn(0f32, 1.0, (1, 3, n, 20), &Device::Cpu).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 3, n, 20), &Device::Cpu).unwrap();
        c.append(0, &k, &v).unwrap();
        c.advance(n);
        c
    }

    fn held(c: &KvCache, n: usize) -> (Tensor, Tensor) {
        let l = &c.layers[0];
        (
            l.k.as_ref().unwrap().narrow(2, 0, n).unwrap(),
            l.v.as_ref().unwrap().narrow(2, 0, n).unwrap(),
        )
    }

    /// Positions `at..at + len` of a `[b, h, n, d]` tensor, flattened.
    fn rows(t: &Tensor, at: usize, len: usize) -> Vec<f32> {
        t.narrow(2, at, len)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn moving_in_place_equals_the_generic_ops_for_overlapping_moves() {
        for (from, to, len) in [(10, 4, 20), (2, 9, 25), (30, 0, 10), (5, 5, 7)] {
            let mut c = filled(40);
            let (k0, v0) = held(&c, 40);
            let r = rotation();
            // The expectation, with the generic tensor ops (what a GPU runs).
            let block = k0.narrow(2, from, len).unwrap().contiguous().unwrap();
            let k_block = rows(&r.apply(&block).unwrap(), 0, len);
            let v_block = rows(&v0, from, len);
            c.move_block(from, to, len, &r).unwrap();
            c.set_len(to + len).unwrap();
            let (k1, v1) = held(&c, to + len);
            let (got_k, got_v) = (rows(&k1, to, len), rows(&v1, to, len));
            assert_eq!(got_v, v_block, "values move unchanged ({from}->{to})");
            let err = got_k
                .iter()
                .zip(&k_block)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-6, "keys ({from}->{to}): {err}");
            // What lies before the destination is untouched.
            let before = to.min(from);
            assert_eq!(rows(&k1, 0, before), rows(&k0, 0, before));
        }
    }

    #[test]
    fn a_move_past_the_limit_is_refused_and_changes_nothing() {
        let mut c = filled(40);
        let (k0, _) = held(&c, 40);
        assert!(c.move_block(30, 0, 20, &rotation()).is_err());
        assert!(c.move_block(0, 50, 20, &rotation()).is_err());
        assert_eq!(c.len(), 40);
        let (k1, _) = held(&c, 40);
        assert_eq!(rows(&k0, 0, 40), rows(&k1, 0, 40));
    }
}
