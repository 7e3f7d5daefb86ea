#!/usr/bin/env bash
# The prepared GPU check (issue 20): run where a GPU is lent, from the repository root, with
# the project installed (torch and triton come with the machine; nothing is downloaded).
#   bash scripts/gpu_check.sh [OUT_DIR]
# 1. the triton kernel tests on CUDA (the interpreter tests skip themselves there): paged
#    decode, tiered decode and quantizing writes against the CPU references;
# 2. the decode kernel's achieved bandwidth against the device's copy bandwidth at
#    32 requests x 8k tokens, Llama-3-8B heads (8 KV heads, GQA 4, head dim 128): JSON.
# About 2 minutes; every step is bounded.
set -euo pipefail
out="${1:-${OUT:-/tmp/gpu_check}}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/device.txt"
timeout 300 python -m pytest -q -p no:cacheprovider tests/test_kv_triton.py \
  tests/test_kv_triton_tiered.py -k "cuda" 2>&1 | tee "$out/tests.txt"
timeout 240 python scripts/triton_decode_bench.py --json "$out/triton_decode.json" \
  2>&1 | tee "$out/bench.txt"
