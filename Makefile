# Kairos-JAX: `make train` and `make test` work on a fresh machine.
# Both find a Python 3.12 interpreter, create .venv in the repo, install the package, then run.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= dev,sim,video,tfds
CONFIG ?= experiments/embedded.py
WORKDIR ?= runs/embedded
DATA_DIR ?= data/embedded
PYTEST_ARGS ?=
export MUJOCO_GL ?= egl
export PYTHONUNBUFFERED := 1

# A Python 3.12: $(PYTHON312) if given, else python3.12 on PATH (that actually runs),
# else the newest 3.12 that pyenv has installed.
PYTHON312 ?= $(shell \
  if python3.12 -c 'import sys' >/dev/null 2>&1; then command -v python3.12; \
  elif command -v pyenv >/dev/null 2>&1 && v=$$(pyenv versions --bare | grep -E '^3\.12(\.[0-9]+)?$$' | sort -V | tail -1) && [ -n "$$v" ]; then \
    echo "$$(pyenv root)/versions/$$v/bin/python3.12"; \
  elif ls $$HOME/.pyenv/versions/3.12*/bin/python3.12 >/dev/null 2>&1; then ls $$HOME/.pyenv/versions/3.12*/bin/python3.12 | sort -V | tail -1; \
  fi)

.PHONY: train test lint data install clean-venv

$(STAMP): setup.py
	@if [ -z "$(PYTHON312)" ]; then echo "error: no Python 3.12 found (put python3.12 on PATH, install it with pyenv, or pass PYTHON312=/path/to/python3.12)"; exit 1; fi
	@echo "Using $(PYTHON312)"
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

install: $(STAMP)

# Real local data: MuJoCo / dm_control episodes, generated once.
$(DATA_DIR)/.complete: $(STAMP)
	$(PY) -m data_pipelines.generate --preset=embedded --output=$(DATA_DIR)

data: $(DATA_DIR)/.complete

train: $(STAMP) $(DATA_DIR)/.complete
	$(PY) -m kairos_jax.train --config=$(CONFIG) --workdir=$(WORKDIR) --config.data.root=$(DATA_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

# Reference side for the video tokenizer's parity test (tests/tokenizer, marker `diffusers`):
# a separate Python 3.11 virtualenv with CPU torch + diffusers, kept out of the main .venv.
# `make diffusers-venv`, then `.venv/bin/python -m pytest -m diffusers tests/tokenizer`.
DIFFUSERS_VENV := .venv-diffusers
PYTHON311 ?= $(shell command -v python3.11 || command -v python3)
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch, e.g. a CPU-only wheel index; empty takes what pip finds.
TORCH_PIP_ARGS ?=

.PHONY: diffusers-venv
$(DIFFUSERS_VENV)/.installed:
	@if ! $(PYTHON311) -c 'import sys; assert sys.version_info[:2] == (3, 11)' >/dev/null 2>&1; then \
	  echo "error: no Python 3.11 found (pass PYTHON311=/path/to/python3.11)"; exit 1; fi
	$(PYTHON311) -m venv $(DIFFUSERS_VENV)
	$(DIFFUSERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(DIFFUSERS_VENV)/bin/python -m pip install -q $(TORCH_PIP_ARGS) "torch==$(TORCH_VERSION)"
	$(DIFFUSERS_VENV)/bin/python -m pip install -q diffusers safetensors numpy
	@touch $@

diffusers-venv: $(DIFFUSERS_VENV)/.installed
