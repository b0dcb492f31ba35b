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
    /// The CPU kernels' buffers (a model runs either these or the tensors).
    host: Option<HostKv>,
}

/// One layer's keys and values for the CPU kernels' forward pass: f16 (half
/// the bytes the attention reads per token), `[heads, capacity, head_dim]`
/// each, so a head's keys are one contiguous run.
#[derive(Debug, Clone)]
pub(crate) struct HostKv {
    pub(crate) k: Vec<half::f16>,
    pub(crate) v: Vec<half::f16>,
    pub(crate) heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) cap: usize,
}

impl HostKv {
    fn new(heads: usize, head_dim: usize, cap: usize) -> Self {
        let n = heads * cap * head_dim;
        // Zeros from the allocator's zeroed pages (`vec![f16::ZERO; n]`
        // would write every element): a page becomes resident only when a
        // token is written to it, so growing costs the copy alone.
        let zeros = || half::vec::HalfBitsVecExt::reinterpret_into(vec![0u16; n]);
        Self {
            k: zeros(),
            v: zeros(),
            heads,
            head_dim,
            cap,
        }
    }

    /// A copy with room for `cap` tokens holding the first `held` of these.
    fn grown(&self, cap: usize, held: usize) -> Self {
        let mut g = Self::new(self.heads, self.head_dim, cap);
        let (old, new, n) = (
            self.cap * self.head_dim,
            cap * self.head_dim,
            held * self.head_dim,
        );
        for h in 0..self.heads {
            g.k[h * new..h * new + n].copy_from_slice(&self.k[h * old..h * old + n]);
            g.v[h * new..h * new + n].copy_from_slice(&self.v[h * old..h * old + n]);
        }
        g
    }

    /// Head `h`'s keys and values at positions `0..n`.
    pub(crate) fn head(&self, h: usize, n: usize) -> (&[half::f16], &[half::f16]) {
        let at = h * self.cap * self.head_dim;
        let len = n * self.head_dim;
        (&self.k[at..at + len], &self.v[at..at + len])
    }
}

/// Tokens added to a buffer's capacity at a time.
const GROW: usize = 256;

/// The capacity to allocate for `need` tokens when `cap` are there: whole
/// steps, at least double, never past `max_len`.
fn grow_to(need: usize, cap: usize, max_len: usize) -> usize {
    need.div_ceil(GROW)
        .saturating_mul(GROW)
        .max(cap * 2)
        .min(max_len)
        .max(need)
}

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
        let tensors: usize = self
            .layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        let host: usize = self
            .layers
            .iter()
            .filter_map(|l| l.host.as_ref())
            .map(|h| (h.k.len() + h.v.len()) * 2)
            .sum();
        tensors + host
    }

    /// Writes a layer's new keys and values for the CPU kernels (`[new,
    /// heads, head_dim]` rows of f32, as the qkv product lays them out) after
    /// the held ones, stored as f16, and returns the layer's buffers.
    /// [`KvCache::advance`] commits the length once every layer has appended.
    pub(crate) fn append_host(
        &mut self,
        simd: crate::cpu::Avx2,
        layer: usize,
        k: &[f32],
        v: &[f32],
        heads: usize,
        head_dim: usize,
    ) -> Result<&HostKv> {
        let new = k.len() / (heads * head_dim);
        let need = self.len + new;
        if need > self.max_len {
            return Err(crate::Error::Invalid(format!(
                "the context is full: {need} tokens exceed the model's {}",
                self.max_len
            )));
        }
        let held = self.len;
        let cap = self.layers[layer].host.as_ref().map_or(0, |h| h.cap);
        let new_cap = grow_to(need, cap, self.max_len);
        let lc = &mut self.layers[layer];
        match &mut lc.host {
            Some(h) if h.heads == heads && h.head_dim == head_dim => {
                if need > h.cap {
                    *h = h.grown(new_cap, held);
                }
            }
            Some(h) if held > 0 => {
                return Err(crate::Error::Invalid(format!(
                    "the cache holds {held} tokens of {} heads × {}, not {heads} × {head_dim}",
                    h.heads, h.head_dim
                )));
            }
            slot => *slot = Some(HostKv::new(heads, head_dim, new_cap)),
        }
        let h = lc.host.as_mut().expect("set above");
        let plane = h.cap * head_dim;
        // Head `head`'s plane of `dst` gets its rows of `src`.
        let write = |head: usize, src: &[f32], dst: &mut [half::f16]| {
            for t in 0..new {
                let from = (t * heads + head) * head_dim;
                let to = (held + t) * head_dim;
                simd.narrow(&src[from..from + head_dim], &mut dst[to..to + head_dim]);
            }
        };
        if new < 8 {
            for (head, (kp, vp)) in h.k.chunks_mut(plane).zip(h.v.chunks_mut(plane)).enumerate() {
                write(head, k, kp);
                write(head, v, vp);
            }
        } else {
            // A prompt's rows: a head's plane a task.
            crate::cpu::pool::chunks(&mut h.k, plane, |head, kp| write(head, k, kp));
            crate::cpu::pool::chunks(&mut h.v, plane, |head, vp| write(head, v, vp));
        }
        Ok(h)
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
        let (b, h, _, d) = k.dims4()?;
        let (kb, vb) = self.reserve(layer, need, (b, h, d), k.dtype(), k.device())?;
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }

    /// Layer `layer`'s key and value buffers, `[b, heads, capacity,
    /// head_dim]` in `dtype` on `device`, grown to hold `need` tokens with the
    /// held ones kept. Buffers of another shape or dtype are replaced while
    /// nothing is held, and an error once something is.
    pub(crate) fn reserve(
        &mut self,
        layer: usize,
        need: usize,
        (b, h, d): (usize, usize, usize),
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<(Tensor, Tensor)> {
        if need > self.max_len {
            return Err(crate::Error::Invalid(format!(
                "the context is full: {need} tokens exceed the model's {}",
                self.max_len
            )));
        }
        let held = self.len;
        let lc = &mut self.layers[layer];
        for slot in [&mut lc.k, &mut lc.v] {
            let cap = slot.as_ref().map_or(0, |t| t.dim(2).unwrap_or(0));
            let same_shape = slot.as_ref().is_some_and(|t| {
                t.dim(0).ok() == Some(b)
                    && t.dim(1).ok() == Some(h)
                    && t.dim(3).ok() == Some(d)
                    && t.dtype() == dtype
            });
            if slot.is_some() && !same_shape && held > 0 {
                let t = slot.as_ref().expect("checked");
                return Err(crate::Error::Invalid(format!(
                    "the cache holds {held} tokens as {:?} {:?}, not [{b}, {h}, _, {d}] {dtype:?}",
                    t.dims(),
                    t.dtype()
                )));
            }
            if need > cap || !same_shape {
                let new_cap = grow_to(need, if same_shape { cap } else { 0 }, self.max_len);
                let buf = Tensor::zeros((b, h, new_cap, d), dtype, device)?;
                if let Some(old) = slot.as_ref().filter(|_| same_shape && held > 0) {
                    buf.slice_set(&old.narrow(2, 0, held)?.contiguous()?, 2, 0)?;
                }
                *slot = Some(buf);
            }
        }
        Ok((
            lc.k.clone().expect("allocated above"),
            lc.v.clone().expect("allocated above"),
        ))
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
        let moves = MoveRows {
            from,
            to,
            len,
            rotate: None,
        };
        for lc in &mut self.layers {
            if let Some(h) = &mut lc.host {
                if to + len > h.cap {
                    *h = h.grown(grow_to(to + len, h.cap, self.max_len), held);
                }
                let (plane, hd) = (h.cap * h.head_dim, h.head_dim);
                for (data, rotate) in [(&mut h.k, Some(rotation)), (&mut h.v, None)] {
                    let m = MoveRows { rotate, ..moves };
                    m.planes(data, plane, hd, |x| x.to_f32(), half::f16::from_f32);
                }
            }
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
            .filter_map(|l| match (&l.host, &l.k) {
                (Some(h), _) => Some(h.cap),
                (None, Some(t)) => Some(t.dim(2).unwrap_or(0)),
                (None, None) => None,
            })
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
        rotate_pairs(row, &self.cos, &self.sin);
    }
}

/// Turns the first `2·cos.len()` dimensions of one head (GPT-NeoX halves:
/// pair `i` is `(i, i + half)`), as candle's `rope` does: the rotary
/// embedding of the CPU pass and the re-rotation of moved keys.
pub(crate) fn rotate_pairs(row: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for i in 0..half {
        let (x1, x2) = (row[i], row[i + half]);
        row[i] = x1 * cos[i] - x2 * sin[i];
        row[i + half] = x2 * cos[i] + x1 * sin[i];
    }
}

/// Moves rows `from..from+len` of every `[capacity, head_dim]` plane of a
/// contiguous `[b, heads, capacity, head_dim]` buffer to start at `to`, in
/// place, turning each moved row by `rotate` when given.
#[derive(Clone, Copy)]
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
        self.planes(data, cap * hd, hd, to_f32, from_f32);
        Ok(())
    }

    /// The move on each `plane`-long run of `data` (rows of `hd`).
    fn planes<T: Copy>(
        &self,
        data: &mut [T],
        plane: usize,
        hd: usize,
        to_f32: impl Fn(T) -> f32,
        from_f32: impl Fn(f32) -> T,
    ) {
        let mut row = vec![0f32; hd];
        for plane in data.chunks_exact_mut(plane) {
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
    fn the_cpu_passes_f16_buffers_move_like_the_tensors() {
        let (heads, hd, n) = (3, 20, 40);
        let k = Tensor::randn(0f32, 1.0, (1, heads, n, hd), &Device::Cpu).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, heads, n, hd), &Device::Cpu).unwrap();
        // The CPU pass appends rows as [token, head, dim].
        let token_rows = |t: &Tensor| -> Vec<f32> {
            t.squeeze(0)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        for (from, to, len) in [(10, 4, 20), (2, 9, 25), (30, 0, 10), (5, 50, 12)] {
            let mut tensors = KvCache::new(1, 64);
            tensors.append(0, &k, &v).unwrap();
            tensors.advance(n);
            let mut host = KvCache::new(1, 64);
            let Some(simd) = crate::cpu::Avx2::detect() else {
                return;
            };
            host.append_host(simd, 0, &token_rows(&k), &token_rows(&v), heads, hd)
                .unwrap();
            host.advance(n);
            let r = rotation();
            for c in [&mut tensors, &mut host] {
                c.move_block(from, to, len, &r).unwrap();
                c.set_len(to + len).unwrap();
            }
            let (k1, v1) = held(&tensors, to + len);
            let h = host.layers[0].host.as_ref().unwrap();
            for head in 0..heads {
                let (hk, hv) = h.head(head, to + len);
                for (got, want) in [(hk, &k1), (hv, &v1)] {
                    let want = rows(&want.narrow(1, head, 1).unwrap(), to, len);
                    let got: Vec<f32> = got[to * hd..].iter().map(|x| x.to_f32()).collect();
                    // Per row of head_dim: f16 keeps 11 bits, so a value is off by
                    // at most 2⁻¹¹ of the largest in its row, rounded before the
                    // turn and again after it (which mixes two of them).
                    for (g, w) in got.chunks_exact(hd).zip(want.chunks_exact(hd)) {
                        let largest = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                        let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                        assert!(
                            err <= 3.0 * largest / 2048.0,
                            "({from}->{to}) head {head}: {err} in a row up to {largest}"
                        );
                    }
                }
            }
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

    /// Growing keeps what is held; buffers of another shape or dtype are an
    /// error once tokens are held (the GPU decode step asks for f16), and
    /// the held tokens survive the refusal.
    #[test]
    fn reserving_grows_keeps_and_refuses_another_layout() {
        let mut c = filled(40);
        let (k0, v0) = held(&c, 40);
        let (k, v) = c
            .reserve(0, 64, (1, 3, 20), DType::F32, &Device::Cpu)
            .unwrap();
        assert_eq!((k.dim(2).unwrap(), v.dim(2).unwrap()), (64, 64));
        assert_eq!(rows(&k, 0, 40), rows(&k0, 0, 40));
        assert_eq!(rows(&v, 0, 40), rows(&v0, 0, 40));
        let err = c.reserve(0, 41, (1, 3, 20), DType::F16, &Device::Cpu);
        assert!(err.unwrap_err().to_string().contains("40 tokens"));
        assert!(
            c.reserve(0, 41, (1, 4, 20), DType::F32, &Device::Cpu)
                .is_err()
        );
        assert!(
            c.reserve(0, 65, (1, 3, 20), DType::F32, &Device::Cpu)
                .is_err()
        );
        assert_eq!(rows(&held(&c, 40).0, 0, 40), rows(&k0, 0, 40));
        // Empty, another layout replaces the buffers.
        c.clear();
        let (k, _) = c
            .reserve(0, 10, (1, 3, 20), DType::F16, &Device::Cpu)
            .unwrap();
        assert_eq!(k.dtype(), DType::F16);
    }
}
