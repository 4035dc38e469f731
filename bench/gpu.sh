#!/usr/bin/env bash
# Everything that needs a GPU, in one call (about 7-8 minutes on an H100): the GPU-marked tests, then
# bench.gpu_check (correctness of the op and the losses at the target shape, the GEMM ceiling and floor, a
# tile-config sweep), then bench.run (every op x provider at the target shape, scaling in tokens and
# vocabulary), then the trainer on CUDA with the tiny model. Results land in $OUT (the device tool's folder)
# or bench/results/gpu; `python -m bench.plot` draws them afterwards.
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT/run"
if ls .whl/*.whl >/dev/null 2>&1; then  # peers carried as wheels (the GPU machine has no network)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# No install: a source checkout imports as is (fused_rlvr maps kernels/ to fused_rlvr.kernels itself).
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv \
  | tee "$OUT/nvidia-smi.txt"
timeout "${PYTEST_S:-90}" python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -15 | tee "$OUT/pytest_gpu.txt"
timeout "${CHECK_S:-150}" python3 -m bench.gpu_check --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
timeout "${RUN_S:-240}" python3 -m bench.run --device cuda --out "$OUT/run" 2>&1 | tee "$OUT/run/run.log"
# The trainer on CUDA (Triton backend, bf16): the fused-vs-materialised update test and a tiny-model run.
# (SmolLM2's GGUF is 94 MB, over the device tool's carry limit: the GPU run uses the tiny random model.)
timeout "${TRAIN_S:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_train.py \
  -k "fused_update or short_run or resumed" 2>&1 | tail -5 | tee "$OUT/pytest_train.txt"
timeout "${TRAIN_S:-120}" python3 -m fused_rlvr.train --preset tiny --device cuda --steps 10 \
  --out-dir "$OUT/train-tiny" 2>&1 | tail -3 | tee "$OUT/train_tiny.txt"
