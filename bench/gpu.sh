#!/usr/bin/env bash
# Everything that needs a GPU, in one call: install, the GPU-marked tests, then bench.gpu_check
# (correctness at the target shape, timings and memory of every provider, a config sweep).
# Results land in $OUT (the device tool's folder) or bench/results/gpu. Extra args go to gpu_check.
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # peers carried as wheels (the GPU machine has no network)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# No install: a source checkout imports as is (fused_rlvr maps kernels/ to fused_rlvr.kernels itself).
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv \
  | tee "$OUT/nvidia-smi.txt"
timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -15 | tee "$OUT/pytest_gpu.txt"
PYTHONUNBUFFERED=1 python3 -m bench.gpu_check --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
