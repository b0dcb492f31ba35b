"""Training speed and memory, Dramatis against transformers + peft, on a random-init
Phi-2 of the real shapes (run on the GPU host; no download).

    python3 tests/device/train_bench.py setup /tmp/tb        # model (bf16 safetensors), tokenizer, data
    python3 tests/device/train_bench.py peft /tmp/tb [LEN]   # transformers + peft, the seed recipe
                                                             # (sequence LEN, default 2048)
    python3 tests/device/train_bench.py watch /tmp/tb -- CMD  # CMD's peak GPU memory (nvidia-smi)
    dramatis-cli train --device cuda --model /tmp/tb/model --tokenizer /tmp/tb/tokenizer.json \
        --data /tmp/tb/rows.jsonl --out /tmp/tb/run --batch 2 --max-len 2048 --max-steps 6 \
        --gradient-checkpointing --eval-fraction 0

The loss curve against peft (same data, same initial adapter, same order of rows):

    python3 tests/device/train_bench.py curve-setup /tmp/tb  # after setup: learnable rows (a random
                                                             # Markov chain), peft's initial adapter
    dramatis-cli train --device cuda --model /tmp/tb/model --tokenizer /tmp/tb/tokenizer.json \
        --data /tmp/tb/curve.jsonl --start-adapter /tmp/tb/init --out /tmp/tb/curve-run --max-len 512 \
        --max-steps 200 --gradient-checkpointing --eval-fraction 0 --log /tmp/tb/dramatis.jsonl
    python3 tests/device/train_bench.py curve-peft /tmp/tb /tmp/tb/dramatis.jsonl SEED 512 OUT.jsonl
                                                             # replays the log's rows, step by step
    python3 tests/device/train_bench.py curve-compare dramatis.jsonl peft-1.jsonl peft-2.jsonl OUT.svg

The seed recipe throughout: LoRA r 16, alpha 16, dropout 0.05 on q/k/v/dense/fc1/fc2,
lr 2e-4, batch 2, sequence 2048. peft runs a bf16 base with gradient checkpointing.
"""
import json
import os
import random
import sys
import time

mode, root = sys.argv[1], sys.argv[2]
if mode != "curve-compare":  # compare reads logs and plots: no torch needed
    import torch
if mode == "setup":
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
    # Initialized on the GPU where there is one (minutes faster than on the CPU).
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
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

    length = int(sys.argv[3]) if len(sys.argv) > 3 else 2048
    # peft with its best attention here: flash-attention-2 where that package is
    # installed, else PyTorch's scaled-dot-product attention.
    try:
        import flash_attn  # noqa: F401

        attn = "flash_attention_2"
    except ImportError:
        attn = "sdpa"
    model = PhiForCausalLM.from_pretrained(f"{root}/model", torch_dtype=torch.bfloat16,
                                           attn_implementation=attn).cuda()
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, 50000, (2, length), device="cuda")
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
        "runtime": f"transformers+peft bf16, gradient checkpointing, {attn}, length {length}",
        "tokens_per_sec": n * 2 * length / dt,
        "step_s": dt / n,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
    }))
elif mode == "curve-setup":
    # Rows a LoRA can learn on a random base: a first-order Markov chain over
    # 1,000 words, three equally likely successors each (the best loss is
    # ln 3 = 1.10 per token; the random base starts near ln 51,200 = 10.8).
    from peft import LoraConfig, get_peft_model
    from transformers import PhiForCausalLM

    rng = random.Random(1)
    succ = [[rng.randrange(1000) for _ in range(3)] for _ in range(1000)]
    with open(f"{root}/curve.jsonl", "w") as f:
        for _ in range(256):
            w = rng.randrange(1000)
            words = []
            for _ in range(600):
                words.append(f"w{w}")
                w = rng.choice(succ[w])
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    torch.manual_seed(0)
    model = PhiForCausalLM.from_pretrained(f"{root}/model", torch_dtype=torch.bfloat16).cuda()
    model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]))
    model.save_pretrained(f"{root}/init")
    print("curve setup done")
elif mode == "curve-peft":
    # python3 train_bench.py curve-peft ROOT LOG SEED LEN OUT.jsonl: the
    # seed recipe on transformers + peft from ROOT/init, each step on the
    # rows Dramatis's LOG says it trained on, tokenized as Dramatis does (no
    # special tokens, <|endoftext|> appended, cut at LEN), with Dramatis's
    # optimizer: AdamW (0.9, 0.999, eps 1e-8, no weight decay), constant
    # rate, gradients clipped to norm 1. SEED seeds the dropout masks.
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import PhiForCausalLM

    log, seed, length, out = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    steps = [json.loads(line) for line in open(log)]
    if [s["step"] for s in steps] != list(range(1, len(steps) + 1)):
        sys.exit(f"{log} is not one run from its first step (a resumed or appended log?)")
    # Dramatis numbers JSONL rows by their line in the file.
    lines = open(f"{root}/curve.jsonl").read().split("\n")
    texts = {i + 1: json.loads(line)["text"] for i, line in enumerate(lines) if line.strip()}
    tok = Tokenizer.from_file(f"{root}/tokenizer.json")
    eos = tok.token_to_id("<|endoftext|>")

    def ids(row):
        t = tok.encode(texts[row], add_special_tokens=False).ids + [eos]
        return t[:length]

    torch.manual_seed(seed)
    base = PhiForCausalLM.from_pretrained(f"{root}/model", torch_dtype=torch.bfloat16,
                                          attn_implementation="sdpa").cuda()
    base.gradient_checkpointing_enable()
    base.enable_input_require_grads()
    model = PeftModel.from_pretrained(base, f"{root}/init", is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model.train()
    t = time.time()
    with open(out, "w") as f:
        for s in steps:
            batch = [ids(r) for r in s["rows"]]
            if len({len(b) for b in batch}) != 1:
                sys.exit("rows of different lengths: the replay pads nothing")
            x = torch.tensor(batch, device="cuda")
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
            f.write(json.dumps({"step": s["step"], "loss": loss.item(), "grad_norm": norm.item()}) + "\n")
            f.flush()  # a run cut short keeps its steps
    print(json.dumps({"steps": len(steps), "seconds": time.time() - t}))
elif mode == "curve-compare":
    # python3 train_bench.py curve-compare DRAMATIS.jsonl PEFT_A.jsonl PEFT_B.jsonl OUT.svg:
    # the first step's losses (no dropout acts yet: LoRA's B starts at 0),
    # then the distance between 10-step running means of the curves, Dramatis
    # against each peft run and the two peft runs (different dropout masks:
    # the noise) against each other; and the three curves as an SVG plot.
    runs = {"Dramatis": root, "peft, seed 1": sys.argv[3], "peft, seed 2": sys.argv[4]}
    svg = sys.argv[5]
    curves = {k: [json.loads(line)["loss"] for line in open(v)] for k, v in runs.items()}
    n = min(len(c) for c in curves.values())

    def smooth(c):
        return [sum(c[max(0, i - 9):i + 1]) / len(c[max(0, i - 9):i + 1]) for i in range(n)]

    sm = {k: smooth(c) for k, c in curves.items()}

    def dist(a, b):
        d = [abs(x - y) for x, y in zip(sm[a], sm[b])]
        return {"mean": sum(d) / n, "max": max(d)}

    d, a, b = runs
    print(json.dumps({
        "steps": n,
        "first_loss": {k: c[0] for k, c in curves.items()},
        "first_loss_diff": abs(curves[d][0] - curves[a][0]),
        "last_10_mean": {k: sum(c[n - 10:n]) / 10 for k, c in curves.items()},
        "smoothed_distance": {f"{d} vs {a}": dist(d, a), f"{d} vs {b}": dist(d, b),
                              f"{a} vs {b} (noise)": dist(a, b)},
    }, indent=1))
    lo = min(min(c[:n]) for c in curves.values())
    hi = max(max(c[:n]) for c in curves.values())
    W, H, L, B = 720, 420, 60, 40

    def xy(i, v):
        return L + (W - L - 20) * i / max(1, n - 1), 20 + (H - 20 - B) * (hi - v) / (hi - lo)

    colors = {d: "#c2410c", a: "#1d4ed8", b: "#60a5fa"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'font-family="sans-serif" font-size="12"><rect width="{W}" height="{H}" fill="white"/>']
    for k in range(6):
        v = lo + (hi - lo) * k / 5
        _, y = xy(0, v)
        parts.append(f'<line x1="{L}" x2="{W - 20}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>'
                     f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for k in range(0, n + 1, 50):
        x, _ = xy(max(0, k - 1), hi)
        parts.append(f'<text x="{x:.1f}" y="{H - B + 16}" text-anchor="middle">{k}</text>')
    parts.append(f'<text x="{(W + L) / 2}" y="{H - 6}" text-anchor="middle">step</text>'
                 f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" '
                 f'text-anchor="middle">training loss</text>')
    for j, (k, c) in enumerate(curves.items()):
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in enumerate(c[:n])))
        parts.append(f'<polyline fill="none" stroke="{colors[k]}" stroke-width="1.2" points="{pts}"/>'
                     f'<line x1="{W - 190}" x2="{W - 170}" y1="{34 + 18 * j}" y2="{34 + 18 * j}" '
                     f'stroke="{colors[k]}" stroke-width="2"/>'
                     f'<text x="{W - 164}" y="{38 + 18 * j}">{k}</text>')
    parts.append("</svg>")
    open(svg, "w").write("\n".join(parts) + "\n")
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
