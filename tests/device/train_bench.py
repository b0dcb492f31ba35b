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
    # the noise) against each other, each pair over the steps both ran; and an
    # SVG: the three curves, and under them the running means' differences
    # (the curves lie on top of each other at the first panel's scale).
    runs = {"Dramatis": root, "peft, seed 1": sys.argv[3], "peft, seed 2": sys.argv[4]}
    svg = sys.argv[5]

    def curve(path):
        # Steps 1, 2, ... in order; a log holding a second run (Dramatis
        # appends to --log) or a gap is refused rather than misread.
        losses = []
        for line in open(path):
            if line.strip():
                s = json.loads(line)
                if s["step"] != len(losses) + 1:
                    sys.exit(f"{path}: step {s['step']} where {len(losses) + 1} was due (two runs in one log?)")
                losses.append(s["loss"])
        if len(losses) < 10:
            sys.exit(f"{path}: {len(losses)} steps; the comparison needs 10 or more")
        return losses

    curves = {k: curve(v) for k, v in runs.items()}

    def smooth(c):
        return [sum(c[max(0, i - 9):i + 1]) / len(c[max(0, i - 9):i + 1]) for i in range(len(c))]

    sm = {k: smooth(c) for k, c in curves.items()}

    def diff(a, b):  # over the steps both ran
        return [x - y for x, y in zip(sm[a], sm[b])]

    def dist(a, b):
        d = [abs(v) for v in diff(a, b)]
        return {"steps": len(d), "mean": sum(d) / len(d), "max": max(d)}

    d, a, b = runs
    pairs = [(d, a), (d, b), (a, b)]
    shared = min(len(c) for c in curves.values())
    print(json.dumps({
        "steps": {k: len(c) for k, c in curves.items()},
        "first_loss": {k: c[0] for k, c in curves.items()},
        "first_loss_diff": abs(curves[d][0] - curves[a][0]),
        f"mean of steps {shared - 9}-{shared}": {k: sum(c[shared - 10:shared]) / 10 for k, c in curves.items()},
        "smoothed_distance": {f"{x} vs {y}" + (" (noise)" if x != d else ""): dist(x, y) for x, y in pairs},
    }, indent=1))
    n = max(len(c) for c in curves.values())
    W, L, R = 860, 60, 230  # the legends sit right of the plots
    top, bottom = (20, 300), (340, 540)  # the panels' y ranges
    H = bottom[1] + 40
    colors = {d: "#c2410c", a: "#1d4ed8", b: "#60a5fa"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'font-family="sans-serif" font-size="12"><rect width="{W}" height="{H}" fill="white"/>']

    def panel(rng, series, label, fmt):
        lo = min(min(v) for _, v, _ in series)
        hi = max(max(v) for _, v, _ in series)
        if hi - lo < 1e-9:
            lo, hi = lo - 1, hi + 1

        def xy(i, v):
            return L + (W - L - R) * i / max(1, n - 1), rng[0] + (rng[1] - rng[0]) * (hi - v) / (hi - lo)

        for k in range(5):
            v = lo + (hi - lo) * k / 4
            _, y = xy(0, v)
            parts.append(f'<line x1="{L}" x2="{W - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>'
                         f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{v:{fmt}}</text>')
        mid = (rng[0] + rng[1]) / 2
        parts.append(f'<text x="14" y="{mid}" transform="rotate(-90 14 {mid})" '
                     f'text-anchor="middle">{label}</text>')
        for j, (name, v, color) in enumerate(series):
            pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, u) for i, u in enumerate(v)))
            dash = ' stroke-dasharray="5 3"' if name == d else ""
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.4"{dash} points="{pts}"/>'
                         f'<line x1="{W - R + 16}" x2="{W - R + 36}" y1="{rng[0] + 14 + 18 * j}" '
                         f'y2="{rng[0] + 14 + 18 * j}" stroke="{color}" stroke-width="2"{dash}/>'
                         f'<text x="{W - R + 42}" y="{rng[0] + 18 + 18 * j}">{name}</text>')

    # Dramatis drawn last and dashed, so the curves under it show through.
    panel(top, [(k, curves[k], colors[k]) for k in (a, b, d)], "training loss", ".2f")
    panel(bottom, [(f"{x} − {y}", diff(x, y), c) for (x, y), c in zip(pairs, ("#c2410c", "#f59e0b", "#6b7280"))],
          "difference of 10-step means", "+.3f")
    for k in range(0, n + 1, 50):
        x = L + (W - L - R) * max(0, k - 1) / max(1, n - 1)
        parts.append(f'<text x="{x:.1f}" y="{bottom[1] + 16}" text-anchor="middle">{k}</text>')
    parts.append(f'<text x="{(W + L) / 2}" y="{H - 6}" text-anchor="middle">step</text></svg>')
    open(svg, "w", encoding="utf-8").write("\n".join(parts) + "\n")
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
