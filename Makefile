# Set-up and everyday commands. On a fresh Debian machine, as root:
#   ./run.sh demo (= make demo) installs everything (apt packages, .venv with all extras) and runs the main job on the tiny default
#   ./run.sh test (= make test) installs what the tests need into .venv and runs the fast test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints/cpu.txt
DEMO_DIR ?= .cache/demo
QUESTION ?= Describe the image.

# DeepSpeed compiles its ops once into this cache; Ray runs locally without token auth.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test lint protos system venv install-dev install-all clean

system:
	bash scripts/install-system.sh

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

# Stamp files: reinstall only when the dependency list changes.
$(VENV)/.dev-installed: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

$(VENV)/.all-installed: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev,serve,train]'
	touch $@ $(VENV)/.dev-installed

install-dev: $(VENV)/.dev-installed
install-all: system $(VENV)/.all-installed

demo: install-all
	DEMO_DIR=$(DEMO_DIR) bash scripts/demo.sh "$(QUESTION)"

test: install-all
	$(PY) -m pytest -q

lint: install-all
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(PY) scripts/gen_protos.py --check

protos: install-all
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
