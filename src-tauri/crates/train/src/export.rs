//! Export as a PEFT adapter folder: adapter_config.json and
//! adapter_model.safetensors with Hugging Face key names.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{Error, Result, TrainConfig, TrainingRun};

/// Writes `run`'s adapter as a PEFT folder at `dir` (created if needed).
pub fn export_peft(run: &TrainingRun, dir: &Path) -> Result<()> {
    write_peft(run.config(), &run.tensors()?, dir)
}

/// Writes the adapter of a run's last checkpoint as a PEFT folder, without
/// loading the model.
pub fn export_checkpoint(run_dir: &Path, dir: &Path) -> Result<()> {
    let ck = run_dir.join("checkpoint");
    let bad = |m: String| Error::Checkpoint {
        path: ck.clone(),
        message: m,
    };
    let state =
        std::fs::read(ck.join("state.json")).map_err(|e| Error::io(ck.join("state.json"), e))?;
    let v: serde_json::Value =
        serde_json::from_slice(&state).map_err(|e| bad(format!("unreadable state: {e}")))?;
    let config: TrainConfig = serde_json::from_value(v["config"].clone())
        .map_err(|e| bad(format!("unreadable settings: {e}")))?;
    let tensors = candle_core::safetensors::load(ck.join("lora.safetensors"), &Device::Cpu)
        .map_err(|e| bad(format!("unreadable LoRA weights: {e}")))?;
    write_peft(&config, &tensors, dir)
}

fn write_peft(c: &TrainConfig, tensors: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "microsoft/phi-2",
        "r": c.r,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "target_modules": c.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "use_rslora": false,
        "use_dora": false,
    });
    let cfg_path = dir.join("adapter_config.json");
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&config).expect("json"))
        .map_err(|e| Error::io(&cfg_path, e))?;
    let weights = dir.join("adapter_model.safetensors");
    let tmp = dir.join("adapter_model.safetensors.partial");
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::rename(&tmp, &weights).map_err(|e| Error::io(&weights, e))?;
    Ok(())
}
