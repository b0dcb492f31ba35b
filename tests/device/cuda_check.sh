#!/usr/bin/env bash
# Runs on a machine with an NVIDIA GPU, from the repository root, with a CUDA
# build of dramatis-cli at $CLI (default ./dramatis-cli). Checks that CUDA
# gives the same greedy tokens as the CPU on the tiny fixture (f32, Q4_K, Q5_K, Q8_0,
# each with and without its LoRA adapter; decode kernels and tensor path),
# then (unless CHECK_ONLY=1) benchmarks a synthetic Phi-2 Q4_K on the GPU. Results go to $OUT.
set -euo pipefail
CLI=${CLI:-./dramatis-cli}
OUT=${OUT:-/tmp/dramatis-cuda}
mkdir -p "$OUT"
fx=src-tauri/crates/llm/tests/fixtures/tiny
prompt=$(python3 -c 'import json;print(json.load(open("'$fx'/reference.json"))["prompt"])')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

work=$(mktemp -d)
# Greedy tokens of each model on the CPU, on CUDA with the decode kernels and
# on CUDA with the tensor path only (DRAMATIS_NO_GPU_DECODE=1), with and
# without the fixture's adapter: how many leading tokens each CUDA run shares
# with the CPU's. A report: the fixture's random weights leave near-ties
# that any rounding difference flips (the CUDA tensor path too); the
# assertion on logits is llm/src/gpu.rs's decode_steps_equal_the_tensor_path.
models=("$fx")
for q in q4_k q5_k q8_0; do
  "$CLI" quantize --input "$fx" --output "$work/tiny-$q.gguf" --type "$q" >/dev/null
  models+=("$work/tiny-$q.gguf")
done
for model in "${models[@]}"; do
  for adapter in "" "$fx/adapter"; do
    name="$(basename "$model")${adapter:+ + adapter}"
    for run in cpu cuda cuda-tensors; do
      dev=${run%-tensors}
      env $([ "$run" = cuda-tensors ] && echo DRAMATIS_NO_GPU_DECODE=1) \
        "$CLI" generate --model "$model" --tokenizer "$fx/tokenizer.json" --device "$dev" \
        ${adapter:+--adapter "$adapter"} --temperature 0 --max-tokens 32 --json \
        --prompt "$prompt" > "$work/$run.json"
    done
    python3 - "$work" "$name" <<'PY'
import json, sys
w, name = sys.argv[1:3]
ids = {r: json.load(open(f"{w}/{r}.json"))["token_ids"] for r in ("cpu", "cuda", "cuda-tensors")}
def same(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
cpu = ids["cpu"]
print(f"{name}: of {len(cpu)} greedy tokens, the first {same(ids['cuda'], cpu)} (decode kernels) "
      f"and {same(ids['cuda-tensors'], cpu)} (tensor path) equal the CPU's")
PY
  done
done

[ "${CHECK_ONLY:-0}" = 1 ] && exit 0
"$CLI" bench --synthetic phi-2 --quant q4_k --synthetic-path "$OUT/phi2-q4k.gguf" --device cuda --json > "$OUT/bench-cuda-q4k.json"
cat "$OUT/bench-cuda-q4k.json"
