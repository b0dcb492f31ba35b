#!/usr/bin/env bash
# Runs on a machine with an NVIDIA GPU, from the repository root, with a CUDA
# build of dramatis-cli at $CLI (default ./dramatis-cli). Checks that CUDA
# gives the same greedy tokens as the CPU on the tiny fixture (f32 and Q4_K),
# then benchmarks a synthetic Phi-2 Q4_K on the GPU. Results go to $OUT.
set -euo pipefail
CLI=${CLI:-./dramatis-cli}
OUT=${OUT:-/tmp/dramatis-cuda}
mkdir -p "$OUT"
fx=src-tauri/crates/llm/tests/fixtures/tiny
prompt=$(python3 -c 'import json;print(json.load(open("'$fx'/reference.json"))["prompt"])')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

"$CLI" quantize --input "$fx" --output "$OUT/tiny-q4k.gguf" --type q4_k
for model in "$fx" "$OUT/tiny-q4k.gguf"; do
  for dev in cpu cuda; do
    "$CLI" generate --model "$model" --tokenizer "$fx/tokenizer.json" --device "$dev" \
      --temperature 0 --max-tokens 32 --json --prompt "$prompt" > "$OUT/greedy-$(basename "$model")-$dev.json"
  done
  python3 - "$OUT/greedy-$(basename "$model")-cpu.json" "$OUT/greedy-$(basename "$model")-cuda.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
same = a["token_ids"] == b["token_ids"]
print(f"{sys.argv[1].split('greedy-')[1]}: CPU and CUDA greedy tokens {'identical' if same else 'DIFFER'} ({len(a['token_ids'])} tokens)")
sys.exit(0 if same else 1)
PY
done

"$CLI" bench --synthetic phi-2 --quant q4_k --synthetic-path "$OUT/phi2-q4k.gguf" --device cuda --json > "$OUT/bench-cuda-q4k.json"
cat "$OUT/bench-cuda-q4k.json"
