"""Loads a Dramatis-trained PEFT adapter with Python peft on the same tiny
PhiForCausalLM and compares logits with the ones Dramatis computed.

    DRAMATIS_PEFT_CHECK=/tmp/pc cargo test -p dramatis-train --test train -- --ignored write_peft_check
    python3 tests/device/peft_check.py src-tauri/crates/llm/tests/fixtures/tiny /tmp/pc
"""
import json
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import PhiForCausalLM

model_dir, check_dir = sys.argv[1], sys.argv[2]
ref = load_file(f"{check_dir}/reference.safetensors")
ids = ref["ids"].long().unsqueeze(0)
ours = ref["logits"].float()
base = PhiForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
with torch.no_grad():
    base_logits = base(ids).logits[0].float()
model = PeftModel.from_pretrained(base, f"{check_dir}/adapter").eval()
with torch.no_grad():
    theirs = model(ids).logits[0].float()
print(json.dumps({
    "tokens": ids.shape[1],
    "max_abs_diff_vs_peft": (ours - theirs).abs().max().item(),
    "max_abs_logit": theirs.abs().max().item(),
    "adapter_effect_max_abs": (theirs - base_logits).abs().max().item(),
    "argmax_agree": bool((ours.argmax(-1) == theirs.argmax(-1)).all().item()),
}))
