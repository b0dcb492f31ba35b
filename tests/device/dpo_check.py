"""The DPO loss and LoRA gradients of Dramatis's trainer against the same loss
written in torch on transformers + peft (TRL's sigmoid DPO loss, and its
`rpo_alpha` term for the SFT weight), on the tiny PhiForCausalLM fixture:
same pairs (token rows and reply masks written by Dramatis), same starting
adapter (a Dramatis PEFT export, which must load in peft as is), f32, no
dropout (TRL's `disable_dropout=True`).

    DRAMATIS_DPO_CHECK=$PWD/tests/device/fixtures/dpo \
        cargo test -p dramatis-train --test dpo_run -- --ignored write_dpo_check
    python3 tests/device/dpo_check.py src-tauri/crates/llm/tests/fixtures/tiny tests/device/fixtures/dpo

Prints one JSON object; exits 1 where a difference is above 1e-4.
"""
import json
import sys

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import PhiForCausalLM

TOL = 1e-4
model_dir, check_dir = sys.argv[1], sys.argv[2]
ours = load_file(f"{check_dir}/dpo_reference.safetensors")
cases = json.load(open(f"{check_dir}/dpo_reference.json"))
tokens, targets, mask = ours["tokens"].long(), ours["targets"].long(), ours["mask"].float()
k = tokens.shape[0] // 2

base = PhiForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
model = PeftModel.from_pretrained(base, f"{check_dir}/adapter", is_trainable=True).eval()


def sums(m):
    logp = F.log_softmax(m(input_ids=tokens).logits.float(), -1)
    return (logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)


with torch.no_grad():
    logits = model(input_ids=tokens[:1]).logits[0].float()
report = {"peft_logits_max_abs_diff": (logits - ours["logits"]).abs().max().item()}
ok = report["peft_logits_max_abs_diff"] <= TOL
for name, c in cases.items():
    with torch.no_grad():
        if c["reference"] == "base":
            with model.disable_adapter():
                ref = sums(model)
        else:
            ref = sums(model)
    model.zero_grad()
    pol = sums(model)
    z = c["beta"] * ((pol[:k] - ref[:k]) - (pol[k:] - ref[k:]))
    loss = -F.logsigmoid(z).mean()
    if c["sft_weight"]:
        loss = loss + c["sft_weight"] * (-pol[:k].sum() / mask[:k].sum())
    loss.backward()
    worst, largest, n = 0.0, 0.0, 0
    for pname, p in model.named_parameters():
        if "lora_" not in pname:
            continue
        key = f"{name}." + pname.replace(".default", "")
        diff = (p.grad - ours[key]).abs().max().item()
        worst, largest, n = max(worst, diff), max(largest, p.grad.abs().max().item()), n + 1
    report[name] = {
        "loss_torch": loss.item(),
        "loss_dramatis": c["loss"],
        "loss_abs_diff": abs(loss.item() - c["loss"]),
        "grad_max_abs_diff": worst,
        "grad_max_abs": largest,
        "lora_tensors": n,
    }
    ok = ok and report[name]["loss_abs_diff"] <= TOL and worst <= TOL and n > 0
report["ok"] = ok
print(json.dumps(report, indent=1))
sys.exit(0 if ok else 1)
