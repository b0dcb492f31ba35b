use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The shape of a Phi-2-architecture model (Hugging Face `PhiForCausalLM`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhiConfig {
    /// Rows of the embedding and of the output layer.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Transformer blocks.
    pub num_hidden_layers: usize,
    /// Attention heads (Phi-2 has no grouped-query attention).
    pub num_attention_heads: usize,
    /// Fraction of each head's dimensions that rotate.
    pub partial_rotary_factor: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
}

/// Hugging Face's config.json, as loose as the versions that wrote it.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    partial_rotary_factor: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<serde_json::Value>,
    layer_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    hidden_act: Option<String>,
    qk_layernorm: Option<bool>,
}

impl PhiConfig {
    /// The synthetic models of the unit tests: Phi-2's layout at a tenth of
    /// its width (2 blocks, 4 heads of 64, quarter-size rotary part, rows of
    /// one K-quant block), `vocab` tokens and `positions` at most.
    #[cfg(test)]
    pub(crate) fn tiny(vocab: usize, positions: usize) -> Self {
        Self {
            vocab_size: vocab,
            hidden_size: 256,
            intermediate_size: 512,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            partial_rotary_factor: 0.5,
            rope_theta: 10000.0,
            layer_norm_eps: 1e-5,
            max_position_embeddings: positions,
        }
    }

    /// microsoft/phi-2.
    pub fn phi2() -> Self {
        Self {
            vocab_size: 51200,
            hidden_size: 2560,
            intermediate_size: 10240,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            partial_rotary_factor: 0.4,
            rope_theta: 10000.0,
            layer_norm_eps: 1e-5,
            max_position_embeddings: 2048,
        }
    }

    /// Dimensions per head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Dimensions per head that RoPE rotates (32 of 80 for Phi-2).
    pub fn rotary_dim(&self) -> usize {
        (self.partial_rotary_factor * self.head_dim() as f64) as usize
    }

    /// Reads a Hugging Face config.json and checks it describes a Phi model.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let hf: HfConfig = serde_json::from_slice(&bytes)
            .map_err(|e| Error::bad(path, format!("not a readable config.json: {e}")))?;
        let is_phi = hf.model_type.as_deref() == Some("phi")
            || hf.architectures.iter().any(|a| a == "PhiForCausalLM");
        if !is_phi {
            let found = hf
                .model_type
                .clone()
                .or_else(|| hf.architectures.first().cloned())
                .unwrap_or_else(|| "unknown".into());
            return Err(Error::UnknownArchitecture {
                path: path.into(),
                found,
            });
        }
        if hf
            .num_key_value_heads
            .is_some_and(|k| k != hf.num_attention_heads)
        {
            return Err(Error::bad(
                path,
                "grouped-query attention is not part of Phi-2",
            ));
        }
        if hf.qk_layernorm == Some(true) {
            return Err(Error::bad(path, "qk_layernorm is not part of Phi-2"));
        }
        if let Some(act) = hf.hidden_act.as_deref().filter(|a| *a != "gelu_new") {
            return Err(Error::bad(
                path,
                format!("activation `{act}` is not Phi-2's gelu_new"),
            ));
        }
        // transformers 5 moved rope settings under `rope_parameters`.
        let rope = |key: &str| {
            hf.rope_parameters
                .as_ref()
                .and_then(|r| r.get(key))
                .and_then(serde_json::Value::as_f64)
        };
        let cfg = Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            partial_rotary_factor: hf
                .partial_rotary_factor
                .or_else(|| rope("partial_rotary_factor"))
                .unwrap_or(0.5),
            rope_theta: hf
                .rope_theta
                .or_else(|| rope("rope_theta"))
                .unwrap_or(10000.0),
            layer_norm_eps: hf.layer_norm_eps.unwrap_or(1e-5),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
        };
        cfg.validate().map_err(|m| Error::bad(path, m))?;
        Ok(cfg)
    }

    /// Checks the numbers are consistent, so later shape errors cannot happen.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden size {} is not a multiple of {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let rd = self.rotary_dim();
        if rd == 0 || !rd.is_multiple_of(2) || rd > self.head_dim() {
            return Err(format!(
                "rotary dimension {rd} must be even and at most the head size {}",
                self.head_dim()
            ));
        }
        if self.vocab_size == 0 || self.num_hidden_layers == 0 || self.intermediate_size == 0 {
            return Err("the model has an empty dimension".into());
        }
        if self.max_position_embeddings == 0 {
            return Err("the context length is zero".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phi2_shapes() {
        let c = PhiConfig::phi2();
        assert_eq!(c.head_dim(), 80);
        assert_eq!(c.rotary_dim(), 32);
        c.validate().unwrap();
    }

    #[test]
    fn reads_both_config_generations_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, r#"{"model_type":"phi","vocab_size":51200,"hidden_size":2560,"intermediate_size":10240,
            "num_hidden_layers":32,"num_attention_heads":32,"partial_rotary_factor":0.4,"rope_theta":10000.0,
            "layer_norm_eps":1e-05,"max_position_embeddings":2048,"hidden_act":"gelu_new"}"#).unwrap();
        assert_eq!(PhiConfig::from_hf_file(&p).unwrap(), PhiConfig::phi2());
        std::fs::write(
            &p,
            r#"{"model_type":"llama","vocab_size":1,"hidden_size":1,"intermediate_size":1,
            "num_hidden_layers":1,"num_attention_heads":1}"#,
        )
        .unwrap();
        let err = PhiConfig::from_hf_file(&p).unwrap_err().to_string();
        assert!(
            err.contains("architecture `llama`") && err.contains("config.json"),
            "{err}"
        );
        std::fs::write(&p, "{").unwrap();
        assert!(
            PhiConfig::from_hf_file(&p)
                .unwrap_err()
                .to_string()
                .contains("not a readable config.json")
        );
    }
}
