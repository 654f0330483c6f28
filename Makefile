# `make demo` and `make test` work on a fresh machine: .venv is created and filled when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export JAX_PLATFORMS ?= cpu

.PHONY: demo test test-fast lint bench report dry-run-70b clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch (pulled by deepspeed) drags in a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[torch,dev]'
	# tcmalloc, the trainers' host allocator (configs/hostmem.py); best effort: without it, glibc's reuse policy
	-@$(BIN)/python -c 'import sys; from configs.hostmem import tcmalloc_library; sys.exit(tcmalloc_library() is None)' \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && { apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
	            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1; }; } \
	       || echo 'note: libtcmalloc-minimal4 not installed (needs root and apt-get); trainers use glibc malloc (configs/hostmem.py)'; }
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jax_impl.train --preset small --mesh fsdp=8 --steps 100 --name demo-$$(date +%Y%m%d-%H%M%S)

# fast tier, then the slow tier; pytest's exit 5 ("no tests collected") is a failure here
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q
	$(BIN)/python -m pytest -m slow -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py

# JAX vs DeepSpeed parity + throughput for every layout runnable here, plus the study's table
report: $(STAMP)
	$(BIN)/python -m compare.report --reference compare/data/aurora_reference_runs.csv

dry-run-70b: $(STAMP)
	$(BIN)/python -m jax_impl.train --preset llama2-70b --mesh fsdp=96 --dry-run

clean:
	rm -rf runs .pytest_cache

# ----------------------------------------------------------------------------- torch_ref on Aurora's torch stack
# Not part of `make test`. aurora-torch-env, on Aurora after `module load frameworks/2025.3.1`: a venv over the
# module's Python and packages (--system-site-packages) with configs/aurora/torch-env.txt and this project on top,
# installed --no-deps so pip never touches the module's torch; it then checks the stack (python -m torch_ref.stack).
# test-torch210: that stack's CPU emulation (Python 3.12, torch 2.10, the same DeepSpeed, no JAX) in .venv-torch210,
# from PYTHON=... if given, else python3.12, else pyenv's 3.12.1; then the torch_stack tier in it. pytest exits
# non-zero (5) when it collects no test, so an empty tier fails.
AURORA_PYTHON ?= python
AURORA_TORCH_VENV := .venv-aurora-torch
T210 := .venv-torch210
T210_PYTHONS = $(or $(PYTHON),python3.12 $(HOME)/.pyenv/versions/3.12.1/bin/python)
T210_EXT := $(CURDIR)/$(T210)/torch_extensions

.PHONY: aurora-torch-env test-torch210

aurora-torch-env:
	@$(AURORA_PYTHON) -c 'import torch' 2>/dev/null || { echo "error: '$(AURORA_PYTHON)' cannot import torch;" \
	  "run 'module load frameworks/2025.3.1' first (or set AURORA_PYTHON to the module's python)" >&2; exit 2; }
	test -x $(AURORA_TORCH_VENV)/bin/python || $(AURORA_PYTHON) -m venv --system-site-packages $(AURORA_TORCH_VENV)
	@$(AURORA_TORCH_VENV)/bin/python -c 'import torch; print("module torch", torch.__version__, torch.__file__)'
	$(AURORA_TORCH_VENV)/bin/pip install --no-deps -r configs/aurora/torch-env.txt
	$(AURORA_TORCH_VENV)/bin/pip install --no-deps -e .
	$(AURORA_TORCH_VENV)/bin/python -m torch_ref.stack --expect configs/aurora/torch-env.txt

# (DeepSpeed's CPU shm op is compiled once at install, not by every rank of the first test at once)
$(T210)/.installed: configs/aurora/torch210-ci.txt
	@test -x $(T210)/bin/python || { py=; for c in $(T210_PYTHONS); do \
	    "$$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { py=$$c; break; }; done; \
	  test -n "$$py" || { echo "error: no Python 3.12 among: $(T210_PYTHONS); set PYTHON=/path/to/python3.12" >&2; \
	    exit 2; }; echo "$$py -m venv $(T210)"; "$$py" -m venv $(T210); }
	$(T210)/bin/pip install -q -r configs/aurora/torch210-ci.txt
	$(T210)/bin/pip install -q --no-deps -e .
	TORCH_EXTENSIONS_DIR=$(T210_EXT) $(T210)/bin/python -c 'from deepspeed.accelerator import get_accelerator; \
	  get_accelerator().create_op_builder("ShareMemCommBuilder").load()'
	touch $@

test-torch210: $(T210)/.installed
	TORCH_EXTENSIONS_DIR=$(T210_EXT) $(T210)/bin/python -m pytest -m torch_stack tests/torch_stack -q
