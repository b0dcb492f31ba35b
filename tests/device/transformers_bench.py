#!/usr/bin/env python3
"""Hugging Face transformers baseline on the GPU: a random-init PhiForCausalLM
with microsoft/phi-2's exact shapes in fp16, the seed's inference pipeline.
Measures prefill (512 tokens) and decode (128 tokens, KV cache) tokens/s,
as dramatis-cli bench does. Prints one JSON object."""
import json
import sys
import time

import torch
from transformers import PhiConfig, PhiForCausalLM

prompt_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 512
gen_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 128
cfg = PhiConfig(
    vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
    num_attention_heads=32, partial_rotary_factor=0.4, max_position_embeddings=2048,
    layer_norm_eps=1e-5, rope_theta=10000.0, hidden_act="gelu_new", tie_word_embeddings=False,
)
torch.manual_seed(0)
with torch.device("cuda"):
    model = PhiForCausalLM(cfg).half().eval()
ids = torch.randint(0, 50000, (1, prompt_tokens), device="cuda")


@torch.no_grad()
def run():
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(ids, use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(gen_tokens - 1):
        out = model(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


run()  # warm-up
runs = [run() for _ in range(3)]
prefill = min(r[0] for r in runs)
decode = min(r[1] for r in runs)
print(json.dumps({
    "runtime": f"transformers {__import__('transformers').__version__} fp16, torch {torch.__version__}",
    "gpu": torch.cuda.get_device_name(),
    "prefill_tok_s": prompt_tokens / prefill,
    "decode_tok_s": (gen_tokens - 1) / decode,
    "peak_mem_bytes": torch.cuda.max_memory_allocated(),
}))
