#!/usr/bin/env bash
# The GPU tests: the hand-written training passes and their fused CUDA kernels
# against finite differences, dropout, kept vs recomputed activations, bf16 vs
# f32 (src-tauri/crates/llm/tests/gradients.rs runs every check on the CPU
# and, in a CUDA build on a machine with a GPU, on CUDA too), once on the
# materialized attention and once on the flash-attention kernels; then the
# library's own GPU tests (the decode kernels, `gpu::`, and the flash kernels
# against the materialized path, `flash::`).
#
# Build here (nvcc on PATH, e.g. from ../shared/tools/cuda-env.sh):
#   cargo test --release -p dramatis-llm --features cuda --target-dir target/cuda \
#       --no-run --test gradients        # prints the binary's path
#   cargo test --release -p dramatis-llm --features cuda --target-dir target/cuda \
#       --no-run --lib                   # the library's tests
# then, on the GPU machine, from the repository root:
#   TESTS=path/to/gradients LIB_TESTS=path/to/dramatis_llm-… tests/device/gpu_tests.sh
set -uo pipefail
TESTS=${TESTS:?the gradients test binary of a CUDA build}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The binaries find the fixtures through the manifest directory at run time.
export CARGO_MANIFEST_DIR="$PWD/src-tauri/crates/llm"
fail=0
echo "== gradients, materialized attention (DRAMATIS_FLASH_ATTENTION=0)"
DRAMATIS_FLASH_ATTENTION=0 "$TESTS" --test-threads 1 || fail=1
echo "== gradients, flash attention"
"$TESTS" --test-threads 1 || fail=1
if [ -n "${LIB_TESTS:-}" ]; then
  echo "== flash kernels against the materialized path"
  "$LIB_TESTS" flash:: --test-threads 1 --nocapture || fail=1
  echo "== decode kernels"
  "$LIB_TESTS" gpu:: --test-threads 1 --nocapture || fail=1
fi
exit $fail
