#!/usr/bin/env bash
# The CUDA engine against llama.cpp, side by side, on the files users download.
#   tests/device/gpu_bench.sh prep  CLI LLAMA_SRC WORK   build llama.cpp's llama-bench and
#                                                         llama-quantize with CUDA (sm_90), write a
#                                                         synthetic F16 Phi-2, quantize it to Q4_K_M
#                                                         and Q8_0
#   tests/device/gpu_bench.sh bench CLI WORK             per file: llama-bench (pp512, pp2048 in
#                                                         512-token batches, tg128, tg128 at depth
#                                                         1024), then dramatis-cli bench with the
#                                                         decode kernels, replayed as a CUDA graph,
#                                                         and with the tensor path
# CLI is a release dramatis-cli built with `--features cuda`; LLAMA_SRC is vendor/llama.cpp of the
# llama-cpp-python sdist. Run the CLI with LD_LIBRARY_PATH set to CUDA's libraries.
#
# One call of about seven minutes does it all (2026-12-05: 414 s), with the CLI, the llm crate's
# CUDA unit-test binary (`cargo test --release -p dramatis-llm --features cuda --target-dir
# target/cuda --no-run --lib`) and the llama.cpp tree compressed into an ignored folder that
# travels with the call (the CLI is 72 MB, 11 MB as .xz):
#   xz -dc cli.xz >/tmp/cli; xz -dc llm-tests.xz >/tmp/llmt; tar xJf llama.tar.xz -C /tmp/ll
#   (setsid nohup tests/device/gpu_bench.sh prep /tmp/cli /tmp/ll/llama.cpp /tmp/w >/tmp/prep.log 2>&1 &)
#   CARGO_MANIFEST_DIR=$PWD/src-tauri/crates/llm /tmp/llmt gpu:: --test-threads 1 --nocapture
#   CLI=/tmp/cli CHECK_ONLY=1 tests/device/cuda_check.sh
#   (wait for prep.log to list the .gguf files) tests/device/gpu_bench.sh bench /tmp/cli /tmp/w
set -euo pipefail
cmd=$1; cli=$2
case $cmd in
prep)
  src=$3; work=$4; mkdir -p "$work"
  cmake -S "$src" -B "$work/llama-cuda" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >"$work/cmake.log" 2>&1 &
  cm=$!
  "$cli" bench --synthetic phi-2 --quant f16 --synthetic-path "$work/phi2-f16.gguf" --device cpu \
    --prompt-tokens 4 --gen-tokens 1 --turn-tokens 1 >"$work/f16.log" 2>&1
  wait $cm
  cmake --build "$work/llama-cuda" -j"$(nproc)" --target llama-bench llama-quantize \
    >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
  q="$work/llama-cuda/bin/llama-quantize"
  "$q" "$work/phi2-f16.gguf" "$work/phi2-q4km.gguf" Q4_K_M "$(nproc)" >"$work/q4km.log" 2>&1
  "$q" "$work/phi2-f16.gguf" "$work/phi2-q8_0.gguf" Q8_0 "$(nproc)" >"$work/q8.log" 2>&1
  ls -la "$work"/*.gguf
  ;;
bench)
  work=$3
  lb="$work/llama-cuda/bin/llama-bench"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  for f in phi2-q4km phi2-q8_0; do
    echo "== $f"
    "$lb" -m "$work/$f.gguf" -ngl 99 -p 512,2048 -b 512 -n 128 -r 3 -o md 2>/dev/null | grep -E "pp|tg"
    "$lb" -m "$work/$f.gguf" -ngl 99 -p 0 -n 128 -d 1024 -r 3 -o md 2>/dev/null | grep -E "tg"
    for path in kernels graphs tensors; do
      echo "-- dramatis, decode on the $path"
      case $path in
        kernels) vars=(DRAMATIS_GPU_GRAPH=0) ;;
        graphs) vars=() ;;
        tensors) vars=(DRAMATIS_NO_GPU_DECODE=1) ;;
      esac
      env ${vars[@]+"${vars[@]}"} "$cli" bench --model "$work/$f.gguf" --device cuda 2>&1 | grep -v '^{'
      env ${vars[@]+"${vars[@]}"} "$cli" bench --model "$work/$f.gguf" --device cuda --prompt-tokens 1024 \
        --turn-tokens 8 2>&1 | grep -E "decode|prefill"
    done
  done
  ;;
esac
