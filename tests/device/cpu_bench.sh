#!/usr/bin/env bash
# The CPU engine against llama.cpp, side by side, on the files users download.
#   tests/device/cpu_bench.sh prep  CLI LLAMA_SRC WORK   build llama.cpp (CPU), write a synthetic
#                                                         F16 Phi-2, quantize it to Q4_K_M and Q8_0
#   tests/device/cpu_bench.sh prep-avx2 CLI LLAMA_SRC WORK  llama.cpp again in WORK/llama-avx2 with
#                                                         AVX2 as its widest unit (no AVX-512, no
#                                                         VNNI): an AVX2-only CPU's build
#   tests/device/cpu_bench.sh bench CLI WORK THREADS...  llama-bench (pp512, tg128, tg128 at depth
#                                                         1024) then dramatis-cli bench, per file and
#                                                         thread count, one after the other
#   tests/device/cpu_bench.sh decode CLI WORK THREADS PAIRS  decode from an empty context (tg128),
#                                                         llama.cpp and dramatis PAIRS times, each
#                                                         first in every other pair; prints each pair
#                                                         and the median ratio (PAIRS odd; decode moves
#                                                         ±20% between runs here)
#   tests/device/cpu_bench.sh mem   CLI WORK THREADS...  how fast THREADS threads stream the Q8_0
#                                                         file's bytes: mapped from the page cache, and
#                                                         as anonymous copies (tests/device/mem_probe.c)
# CLI is a release dramatis-cli; LLAMA_SRC is vendor/llama.cpp of the llama-cpp-python sdist.
# LLAMA_BUILD=WORK/llama-avx2 makes `bench` use the AVX2 build; DRAMATIS_NO_AVX512=1 and
# DRAMATIS_NO_VNNI=1 do the same to dramatis (see BENCHMARKS.md).
set -euo pipefail
cmd=$1; cli=$2
case $cmd in
prep)
  src=$3; work=$4; mkdir -p "$work"
  cmake -S "$src" -B "$work/llama-build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >"$work/cmake.log" 2>&1 &
  cm=$!
  "$cli" bench --synthetic phi-2 --quant f16 --synthetic-path "$work/phi2-f16.gguf" --device cpu \
    --prompt-tokens 4 --gen-tokens 1 --turn-tokens 1 >"$work/f16.log" 2>&1
  wait $cm
  cmake --build "$work/llama-build" -j"$(nproc)" --target llama-bench llama-quantize >"$work/build.log" 2>&1
  q="$work/llama-build/bin/llama-quantize"
  "$q" "$work/phi2-f16.gguf" "$work/phi2-q4km.gguf" Q4_K_M "$(nproc)" >"$work/q4km.log" 2>&1
  "$q" "$work/phi2-f16.gguf" "$work/phi2-q8_0.gguf" Q8_0 "$(nproc)" >"$work/q8.log" 2>&1
  grep -oE "converting to q[0-9a-zA-Z_]+" "$work/q4km.log" | sort | uniq -c
  ls -la "$work"/*.gguf
  ;;
prep-avx2)
  src=$3; work=$4
  cmake -S "$src" -B "$work/llama-avx2" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON \
    -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    >"$work/cmake-avx2.log" 2>&1
  cmake --build "$work/llama-avx2" -j"$(nproc)" --target llama-bench >"$work/build-avx2.log" 2>&1
  ;;
bench)
  work=$3; shift 3
  lb="${LLAMA_BUILD:-$work/llama-build}/bin/llama-bench"
  if grep -q -w avx512f /proc/cpuinfo; then echo "widest vector unit: avx512f"; else echo "widest vector unit: avx2"; fi
  for f in phi2-q4km phi2-q8_0; do
    for t in "$@"; do
      echo "== $f, $t threads"
      "$lb" -m "$work/$f.gguf" -p 512 -n 128 -t "$t" -r 2 -o md 2>/dev/null | grep -E "pp|tg"
      "$lb" -m "$work/$f.gguf" -p 0 -n 128 -d 1024 -t "$t" -r 1 -o md 2>/dev/null | grep -E "tg"
      "$cli" bench --model "$work/$f.gguf" --device cpu --threads "$t" 2>&1 | grep -v '^{'
      "$cli" bench --model "$work/$f.gguf" --device cpu --threads "$t" --prompt-tokens 1024 \
        --turn-tokens 8 2>&1 | grep -E "decode|prefill"
    done
  done
  ;;
decode)
  work=$3; t=$4; pairs=${5:-5}
  lb="${LLAMA_BUILD:-$work/llama-build}/bin/llama-bench"
  # tok/s of one tg128 run of each on file $f.
  llama() {
    "$lb" -m "$work/$f.gguf" -p 0 -n 128 -t "$t" -r 1 -o jsonl 2>/dev/null |
      grep -o '"avg_ts": *[0-9.]*' | grep -oE '[0-9.]+$'
  }
  ours() {
    "$cli" bench --model "$work/$f.gguf" --device cpu --threads "$t" --prompt-tokens 1 \
      --gen-tokens 128 --turn-tokens 1 --json 2>/dev/null |
      grep -o '"decode_empty_tok_s": *[0-9.]*' | grep -oE '[0-9.]+$'
  }
  for f in phi2-q4km phi2-q8_0; do
    echo "== $f, $t threads, tg128 from an empty context: llama.cpp, dramatis, ratio"
    rows=$(for i in $(seq "$pairs"); do
      # Each goes first in every other pair.
      if [ $((i % 2)) = 1 ]; then l=$(llama); o=$(ours); else o=$(ours); l=$(llama); fi
      if [ -z "$l" ] || [ -z "$o" ]; then echo "pair $i failed (llama.cpp '$l', dramatis '$o')" >&2; exit 1; fi
      echo "$l $o" | awk '{printf "%8.2f %8.2f %6.3f\n", $1, $2, $2 / $1}'
    done) || exit 1
    echo "$rows"
    echo "$rows" | sort -k3 -n | awk '{r[NR] = $3} END {printf "median ratio %.3f (of %d pairs)\n", r[int((NR + 1) / 2)], NR}'
  done
  ;;
mem)
  work=$3; shift 3
  lscpu | grep -E "Model name|NUMA|Socket|Core|L3" || true
  cc -O2 -mavx2 -pthread "$(dirname "$0")/mem_probe.c" -o "$work/mem_probe"
  for t in "$@"; do "$work/mem_probe" "$work/phi2-q8_0.gguf" "$t"; done
  ;;
esac
