# Open-AutoGLM — every entry point a developer or operator needs.
#   make run    start the whole mesh locally (creates .venv, installs, builds the model once)
#   make test   lint, check generated code, build the model once, run every test
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# ONNX Runtime flavour: the CUDA build where an NVIDIA driver is present, the CPU build otherwise.
ORT_EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
EXTRAS := $(ORT_EXTRA),model-build,postgres,dev
BUF := tools/node_modules/.bin/buf
PYTEST_ARGS ?=

.PHONY: help install gen check-gen lint test run clean

help:
	@echo "make run        start the whole mesh (router, inference, billing, sidecars) on embedded defaults"
	@echo "make test       lint + generated-code check + model build + the whole test suite"
	@echo "make gen        regenerate gen/ from protos/"
	@echo "make check-gen  fail if gen/ is out of date"
	@echo "make lint       buf lint, ruff, mypy"
	@echo "make model      build (or reuse) the INT8 ONNX model in the cache"
	@echo "make bench-<area>  run a benchmark (inference, billing, router, sidecar, mesh, http, console)"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	touch $@

$(BUF): tools/package.json
	cd tools && npm install --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed $(BUF)

gen: $(VENV)/.installed
	$(PY) scripts/genproto.py

check-gen: $(VENV)/.installed
	$(PY) scripts/genproto.py --check

lint: $(VENV)/.installed $(BUF)
	cd protos && ../$(BUF) lint
	$(VENV)/bin/ruff check services sidecar tests scripts bench
	$(VENV)/bin/mypy

# Area fragments: model build, benchmarks, node example, ...
-include mk/*.mk

test: install check-gen lint $(TEST_PREREQS)
	$(PY) -m pytest $(PYTEST_ARGS)

run: install $(RUN_PREREQS)
	$(VENV)/bin/autoglm up --config deploy/local/mesh.yaml

clean:
	rm -rf $(VENV) tools/node_modules .pytest_cache .mypy_cache .ruff_cache
