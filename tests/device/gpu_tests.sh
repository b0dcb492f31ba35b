#!/usr/bin/env bash
# The gradient tests on the GPU: the hand-written training passes and their
# fused CUDA kernels against finite differences, dropout, kept vs recomputed
# activations, bf16 vs f32 (src-tauri/crates/llm/tests/gradients.rs runs every
# check on the CPU and, in a CUDA build on a machine with a GPU, on CUDA too).
#
# Build here (nvcc on PATH, e.g. from ../shared/tools/cuda-env.sh):
#   cargo test --release -p dramatis-llm --features cuda --target-dir target/cuda \
#       --no-run --test gradients        # prints the binary's path
# then, on the GPU machine, from the repository root:
#   TESTS=path/to/gradients tests/device/gpu_tests.sh
set -euo pipefail
TESTS=${TESTS:?the gradients test binary of a CUDA build}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The binary finds the fixtures through the manifest directory at run time.
CARGO_MANIFEST_DIR="$PWD/src-tauri/crates/llm" "$TESTS" --test-threads 1
