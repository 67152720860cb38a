# Two commands do all the set-up: `make demo` (the main job) and `make test`.
# Both create or reuse .venv and install pinned versions (torch 2.13.0, CPU).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Offline by construction: no hub look-ups (each would cost ~20 s of retries),
# and a project-local cache so nothing outside the checkout is touched.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HOME := $(CURDIR)/.hf_home
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: install demo lint test test-full bench clean gpu-wheels gpu-check

install: $(STAMP)

$(STAMP): setup.py requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, alone: an unconstrained torch would pull several GB of CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rag-demo

# ruff.toml: line length 120, import order, pyflakes. CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-full: $(STAMP)
	$(PY) -m pytest -q tests

# GPU machines: their image brings torch / transformers / lightning (and often no network). `make gpu-wheels`,
# run where a registry is reachable, fetches what such an image lacks as cp312 manylinux x86_64 wheels
# (< 40 MiB, git-ignored); `make gpu-check` runs under the machine's own Python, installs those wheels
# offline into .gpu_deps (never torch), runs `pytest -m gpu` and the benchmarks at paper size (< 6 min).
# pyarrow (55 MB) and pandas (12 MB) would break the 40 MiB budget: an image without them skips `datasets`.
GPU_WHEELS := wheels/gpu
GPU_PYTHON ?= python3
GPU_PACKAGES := faiss-cpu hydra-core omegaconf datasets dill multiprocess xxhash pytest iniconfig pluggy pygments \
	psutil pypdf
GPU_PLATFORM := --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
	--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64

gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS).tmp && mkdir -p $(GPU_WHEELS).tmp
	$(PY) -m pip download -q --no-deps $(GPU_PLATFORM) -c requirements/constraints.txt -d $(GPU_WHEELS).tmp \
		$(GPU_PACKAGES)
	# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 pins) is published as source only: build its pure wheel.
	$(PY) -m pip wheel -q --no-deps -c requirements/constraints.txt -w $(GPU_WHEELS).tmp antlr4-python3-runtime
	rm -rf $(GPU_WHEELS) && mv $(GPU_WHEELS).tmp $(GPU_WHEELS)
	@du -sh $(GPU_WHEELS); test $$(du -sm $(GPU_WHEELS) | cut -f1) -lt 40 || { echo "over 40 MiB"; exit 1; }

gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py
# Every scripts/bench_*.py at one size, one table of ratios (scripts/bench_all.py); JSON under runs/bench/.
# BENCH_SIZE=mid for larger CPU shapes, large on a GPU machine.
BENCH_SIZE ?= tiny
bench: $(STAMP)
	$(PY) scripts/bench_all.py --size $(BENCH_SIZE)

clean:
	rm -rf $(VENV) .hf_home runs outputs .pytest_cache
