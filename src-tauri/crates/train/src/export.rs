//! Export as a PEFT adapter folder: adapter_config.json and
//! adapter_model.safetensors with Hugging Face key names.

use std::path::Path;

use crate::{Error, Result, TrainConfig, TrainingRun};

/// Writes `run`'s adapter as a PEFT folder at `dir` (created if needed).
pub fn export_peft(run: &TrainingRun, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let c: &TrainConfig = run.config();
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
    candle_core::safetensors::save(&run.tensors()?, &tmp)?;
    std::fs::rename(&tmp, &weights).map_err(|e| Error::io(&weights, e))?;
    Ok(())
}
