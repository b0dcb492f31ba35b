"""Training speed and memory, Dramatis against transformers + peft, on a random-init
Phi-2 of the real shapes (run on the GPU host; no download).

    python3 tests/device/train_bench.py setup /tmp/tb        # model (bf16 safetensors), tokenizer, data
    python3 tests/device/train_bench.py peft /tmp/tb         # transformers + peft, the seed recipe
    python3 tests/device/train_bench.py watch /tmp/tb -- CMD  # CMD's peak GPU memory (nvidia-smi)
    dramatis-cli train --device cuda --model /tmp/tb/model --tokenizer /tmp/tb/tokenizer.json \
        --data /tmp/tb/rows.jsonl --out /tmp/tb/run --batch 2 --max-len 2048 --max-steps 6 \
        --gradient-checkpointing --eval-fraction 0

The seed recipe throughout: LoRA r 16, alpha 16, dropout 0.05 on q/k/v/dense/fc1/fc2,
lr 2e-4, batch 2, sequence 2048. peft runs a bf16 base with gradient checkpointing.
"""
import json
import os
import random
import sys
import time

import torch

mode, root = sys.argv[1], sys.argv[2]
os.makedirs(root, exist_ok=True)
VOCAB = 51200


def config():
    from transformers import PhiConfig

    return PhiConfig(
        vocab_size=VOCAB, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.4,
        max_position_embeddings=2048, layer_norm_eps=1e-5, hidden_act="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
    )


if mode == "setup":
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PhiForCausalLM

    torch.manual_seed(0)
    model = PhiForCausalLM(config()).to(torch.bfloat16)
    model.save_pretrained(f"{root}/model", safe_serialization=True)
    vocab = {f"w{i}": i for i in range(50256)}
    vocab["<|endoftext|>"] = 50256
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(f"{root}/tokenizer.json")
    random.seed(0)
    with open(f"{root}/rows.jsonl", "w") as f:
        for _ in range(64):
            f.write(json.dumps({"text": " ".join(f"w{random.randrange(50000)}" for _ in range(2100))}) + "\n")
    print("setup done")
elif mode == "peft":
    from peft import LoraConfig, get_peft_model
    from transformers import PhiForCausalLM

    model = PhiForCausalLM.from_pretrained(f"{root}/model", torch_dtype=torch.bfloat16).cuda()
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, 50000, (2, 2048), device="cuda")
    model.train()

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.time()
    n = 5
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    dt = time.time() - t
    print(json.dumps({
        "runtime": "transformers+peft bf16, gradient checkpointing",
        "tokens_per_sec": n * 2 * 2048 / dt,
        "step_s": dt / n,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
    }))
elif mode == "watch":
    # python3 train_bench.py watch OUT.json -- COMMAND...: runs COMMAND and samples
    # the GPU's used memory every 50 ms (the same measure for every runtime).
    import subprocess

    cmd = sys.argv[sys.argv.index("--") + 1:]

    def used():
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        return int(out.split()[0])

    idle = used()
    peak = idle
    t = time.time()
    p = subprocess.Popen(cmd)
    while p.poll() is None:
        peak = max(peak, used())
        time.sleep(0.05)
    print(json.dumps({"cmd": " ".join(cmd)[:120], "rc": p.returncode, "wall_s": time.time() - t,
                      "idle_mib": idle, "peak_used_mib": peak, "peak_over_idle_mib": peak - idle}))
