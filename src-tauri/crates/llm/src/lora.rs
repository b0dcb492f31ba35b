//! LoRA adapters: `y = W x + (alpha / r) · B (A x)` on q, k, v, dense, fc1, fc2.
//! Read from PEFT folders (adapter_config.json + adapter_model.safetensors).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::{Error, PhiConfig, Result};

/// The modules a LoRA adapter can target, by their Hugging Face names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraTarget {
    /// self_attn.q_proj
    Q,
    /// self_attn.k_proj
    K,
    /// self_attn.v_proj
    V,
    /// self_attn.dense
    Dense,
    /// mlp.fc1
    Fc1,
    /// mlp.fc2
    Fc2,
}

impl LoraTarget {
    /// All targets, in PEFT's usual order.
    pub const ALL: [Self; 6] = [Self::Q, Self::K, Self::V, Self::Dense, Self::Fc1, Self::Fc2];

    /// The module name in PEFT configs (`q_proj`, ..., `fc2`).
    pub fn peft_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::Dense => "dense",
            Self::Fc1 => "fc1",
            Self::Fc2 => "fc2",
        }
    }

    /// The module's path inside a layer (`self_attn.q_proj`, `mlp.fc1`, ...).
    pub fn module_path(self) -> &'static str {
        match self {
            Self::Q => "self_attn.q_proj",
            Self::K => "self_attn.k_proj",
            Self::V => "self_attn.v_proj",
            Self::Dense => "self_attn.dense",
            Self::Fc1 => "mlp.fc1",
            Self::Fc2 => "mlp.fc2",
        }
    }

    /// `(in, out)` of the module for a config.
    pub fn shape(self, cfg: &PhiConfig) -> (usize, usize) {
        let h = cfg.hidden_size;
        match self {
            Self::Q | Self::K | Self::V | Self::Dense => (h, h),
            Self::Fc1 => (h, cfg.intermediate_size),
            Self::Fc2 => (cfg.intermediate_size, h),
        }
    }

    /// Where its output lands in the fused qkv projection (0 for the others).
    pub(crate) fn fused_offset(self, cfg: &PhiConfig) -> usize {
        match self {
            Self::K => cfg.hidden_size,
            Self::V => 2 * cfg.hidden_size,
            _ => 0,
        }
    }

    fn from_peft(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.peft_name() == name)
    }
}

/// One low-rank delta: `scale · (x Aᵀ) Bᵀ`.
#[derive(Debug, Clone)]
pub struct LoraSlot {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// `alpha / r` (or `alpha / √r` with rsLoRA).
    pub scale: f64,
    /// First output column the delta lands on (q, k, v inside a fused qkv).
    pub out_offset: usize,
    /// Training only: the probability of zeroing an input element (0 at inference).
    pub dropout: f32,
    /// Training only: picks the dropout mask, so a step can be replayed
    /// exactly. In training the slots of one projection (q, k and v) share
    /// one mask, the first slot's (see `grad::Group`).
    pub dropout_seed: u64,
}

impl LoraSlot {
    /// The delta for input `x` (`[.., in]` → `[.., out]`).
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let x = if x.dtype() == self.a.dtype() {
            x.clone()
        } else {
            x.to_dtype(self.a.dtype())?
        };
        let x = if self.dropout > 0.0 {
            x.mul(&dropout_mask(
                x.shape(),
                self.dropout,
                self.dropout_seed,
                x.device(),
            )?)?
        } else {
            x
        };
        let h = x.broadcast_matmul(&self.a.t()?)?;
        let d = h.broadcast_matmul(&self.b.t()?)?;
        let d = (d * self.scale)?;
        Ok(if d.dtype() == x.dtype() {
            d
        } else {
            d.to_dtype(x.dtype())?
        })
    }
}

/// A dropout mask (`0`, or `1 / (1 - p)` to keep the expected value) that
/// depends only on the shape, `p` and `seed`: [`crate::kernels::dropout`]'s
/// mask (a hash of each element's index), on the device, so a training step
/// replays exactly after a resume without any random state to save.
pub fn dropout_mask(
    shape: &candle_core::Shape,
    p: f32,
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    crate::kernels::dropout(&Tensor::ones(shape, DType::F32, device)?, p, seed)
}

/// The slots of one transformer block.
#[derive(Debug, Clone, Default)]
pub struct LoraLayer {
    /// q_proj
    pub q: Option<LoraSlot>,
    /// k_proj
    pub k: Option<LoraSlot>,
    /// v_proj
    pub v: Option<LoraSlot>,
    /// dense
    pub dense: Option<LoraSlot>,
    /// fc1
    pub fc1: Option<LoraSlot>,
    /// fc2
    pub fc2: Option<LoraSlot>,
}

impl LoraLayer {
    /// The slot for a target.
    pub fn slot(&self, t: LoraTarget) -> Option<&LoraSlot> {
        match t {
            LoraTarget::Q => self.q.as_ref(),
            LoraTarget::K => self.k.as_ref(),
            LoraTarget::V => self.v.as_ref(),
            LoraTarget::Dense => self.dense.as_ref(),
            LoraTarget::Fc1 => self.fc1.as_ref(),
            LoraTarget::Fc2 => self.fc2.as_ref(),
        }
    }

    /// Sets the slot for a target.
    pub fn set(&mut self, t: LoraTarget, slot: LoraSlot) {
        let place = match t {
            LoraTarget::Q => &mut self.q,
            LoraTarget::K => &mut self.k,
            LoraTarget::V => &mut self.v,
            LoraTarget::Dense => &mut self.dense,
            LoraTarget::Fc1 => &mut self.fc1,
            LoraTarget::Fc2 => &mut self.fc2,
        };
        *place = Some(slot);
    }
}

/// A whole adapter: per-layer slots, passed to [`crate::Phi::forward`].
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// One entry per transformer block.
    pub layers: Vec<LoraLayer>,
    /// Identity for caches: sessions reset their KV cache when it changes.
    pub id: String,
}

#[derive(Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    target_modules: serde_json::Value,
}

impl LoraAdapter {
    /// Loads a PEFT adapter folder for a model of shape `cfg`, checking every
    /// tensor's shape against it (an adapter for another base is refused).
    pub fn load_peft(dir: &Path, cfg: &PhiConfig, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let bytes = std::fs::read(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let pc: PeftConfig = serde_json::from_slice(&bytes).map_err(|e| Error::Adapter {
            path: cfg_path.clone(),
            message: format!("not a readable PEFT adapter_config.json: {e}"),
        })?;
        let refuse = |m: String| Error::Adapter {
            path: cfg_path.clone(),
            message: m,
        };
        if pc.peft_type.as_deref().is_some_and(|t| t != "LORA") {
            return Err(refuse(format!(
                "peft_type {:?} is not LORA",
                pc.peft_type.unwrap_or_default()
            )));
        }
        if pc.use_dora || pc.fan_in_fan_out {
            return Err(refuse(
                "DoRA and fan_in_fan_out adapters are not supported".into(),
            ));
        }
        if pc.r == 0 {
            return Err(refuse("r is 0".into()));
        }
        let scale = if pc.use_rslora {
            pc.lora_alpha / (pc.r as f64).sqrt()
        } else {
            pc.lora_alpha / pc.r as f64
        };
        if let serde_json::Value::Array(mods) = &pc.target_modules {
            for m in mods.iter().filter_map(|m| m.as_str()) {
                if LoraTarget::from_peft(m).is_none() {
                    return Err(refuse(format!("target module `{m}` is not a Phi-2 module")));
                }
            }
        }

        let weights_path = dir.join("adapter_model.safetensors");
        let data = std::fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
        let tensors = candle_core::safetensors::load_buffer(&data, &Device::Cpu).map_err(|e| {
            Error::Adapter {
                path: weights_path.clone(),
                message: format!("not a readable safetensors file: {e}"),
            }
        })?;
        let wrong = |m: String| Error::Adapter {
            path: weights_path.clone(),
            message: m,
        };
        let mut layers = vec![LoraLayer::default(); cfg.num_hidden_layers];
        let mut found = 0;
        for (name, tensor) in &tensors {
            let Some(rest) = name
                .strip_prefix("base_model.model.model.layers.")
                .and_then(|r| r.strip_suffix(".weight"))
            else {
                return Err(wrong(format!(
                    "unexpected tensor `{name}` (not a Phi-2 LoRA key)"
                )));
            };
            let Some((layer, rest)) = rest.split_once('.') else {
                continue;
            };
            let Some((module, which)) = rest.rsplit_once('.') else {
                continue;
            };
            if which == "lora_B" {
                continue; // read together with its lora_A
            }
            if which != "lora_A" {
                return Err(wrong(format!("unexpected tensor `{name}`")));
            }
            let layer: usize = layer
                .parse()
                .map_err(|_| wrong(format!("bad layer index in `{name}`")))?;
            if layer >= cfg.num_hidden_layers {
                return Err(wrong(format!(
                    "`{name}` is for layer {layer}, but the model has {} layers: this adapter is for another base",
                    cfg.num_hidden_layers
                )));
            }
            let target = LoraTarget::ALL
                .into_iter()
                .find(|t| t.module_path() == module)
                .ok_or_else(|| wrong(format!("`{name}` targets `{module}`, not a Phi-2 module")))?;
            let b_name = name.replace(".lora_A.weight", ".lora_B.weight");
            let b = tensors
                .get(&b_name)
                .ok_or_else(|| wrong(format!("`{b_name}` is missing")))?;
            let (fan_in, fan_out) = target.shape(cfg);
            let a_dims = tensor.dims().to_vec();
            let b_dims = b.dims().to_vec();
            if a_dims != [pc.r, fan_in] || b_dims != [fan_out, pc.r] {
                return Err(wrong(format!(
                    "`{name}` is {a_dims:?} and its B {b_dims:?}; this model needs [{}, {fan_in}] and [{fan_out}, {}]: the adapter is for another base",
                    pc.r, pc.r
                )));
            }
            let slot = LoraSlot {
                a: tensor.to_dtype(DType::F32)?.to_device(device)?,
                b: b.to_dtype(DType::F32)?.to_device(device)?,
                scale,
                out_offset: target.fused_offset(cfg),
                dropout: 0.0,
                dropout_seed: 0,
            };
            layers[layer].set(target, slot);
            found += 1;
        }
        if found == 0 {
            return Err(wrong("the adapter holds no LoRA weights".into()));
        }
        Ok(Self {
            layers,
            id: dir.display().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_masks_keep_the_expected_share_and_replay() {
        let shape = candle_core::Shape::from((4, 300, 256));
        let m = dropout_mask(&shape, 0.25, 7, &Device::Cpu).unwrap();
        let v: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        let kept = v.iter().filter(|&&x| x > 0.0).count() as f64 / v.len() as f64;
        assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
        assert!(v.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
        let again: Vec<f32> = dropout_mask(&shape, 0.25, 7, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(v, again);
        let other: Vec<f32> = dropout_mask(&shape, 0.25, 8, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let same = v.iter().zip(&other).filter(|(a, b)| a == b).count() as f64 / v.len() as f64;
        // Independent masks agree on about 0.75² + 0.25² = 62.5% of elements.
        assert!((same - 0.625).abs() < 0.02, "agreement {same}");
        // Neighbouring elements are not correlated.
        let pairs = v
            .windows(2)
            .filter(|w| (w[0] > 0.0) == (w[1] > 0.0))
            .count() as f64
            / (v.len() - 1) as f64;
        assert!((pairs - 0.625).abs() < 0.02, "neighbour agreement {pairs}");
    }
}
