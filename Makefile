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

.PHONY: install demo lint test test-full bench clean

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

# Every scripts/bench_*.py at one size, one table of ratios (scripts/bench_all.py); JSON under runs/bench/.
# BENCH_SIZE=mid for larger CPU shapes, large on a GPU machine.
BENCH_SIZE ?= tiny
bench: $(STAMP)
	$(PY) scripts/bench_all.py --size $(BENCH_SIZE)

clean:
	rm -rf $(VENV) .hf_home runs outputs .pytest_cache
