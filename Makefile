# `make demo` and `make test` work on a fresh machine: .venv is created and filled when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export JAX_PLATFORMS ?= cpu

.PHONY: demo test test-fast test-aurora aurora-env aurora-old-loader lint bench report dry-run-70b clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch (pulled by deepspeed) drags in a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[torch,dev]'
	# tcmalloc, the trainers' host allocator (runtime/hostmem.py); best effort: without it, glibc's reuse policy
	-@$(BIN)/python -c 'import sys; from runtime.hostmem import tcmalloc_library; sys.exit(tcmalloc_library() is None)' \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && { apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
	            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1; }; } \
	       || echo 'note: libtcmalloc-minimal4 not installed (needs root and apt-get); trainers use glibc malloc (runtime/hostmem.py)'; }
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jax_impl.train --preset small --mesh fsdp=8 --steps 100 --name demo-$$(date +%Y%m%d-%H%M%S)

# fast tier, slow tier, then the Intel-GPU JAX stack's CPU tier; pytest's exit 5 ("no tests collected") fails.
# The main tiers run in PYTEST_WORKERS processes (pytest-xdist): most tests are compiles and small steps that leave
# a core idle (2 cores: fast tier 22.9 -> 11.3 min); 0 runs them in one process. Each worker has 8 fake devices.
MAIN_TIERS := not aurora_stack and not torch_stack
PYTEST_WORKERS ?= 2
MAIN_PYTEST = $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)
test: test-fast
	$(MAIN_PYTEST) -m "slow and $(MAIN_TIERS)"
	$(MAKE) --no-print-directory test-aurora
	$(MAKE) --no-print-directory test-torch-stack

test-fast: $(STAMP)
	$(MAIN_PYTEST) -m "not slow and $(MAIN_TIERS)"

# ---- Intel GPUs (Aurora): JAX 0.11.2 + JAX's oneapi plugin in .venv-aurora, Python >= 3.12 (docs/aurora.md)
AURORA_VENV := .venv-aurora
AURORA_STAMP := $(AURORA_VENV)/.installed
aurora-env: $(AURORA_STAMP)

$(AURORA_STAMP): configs/aurora/jax-env.txt pyproject.toml
	@py="$$(scripts/find_python312.sh)" || exit 2; echo "aurora-env: $$py"; \
	  test -x $(AURORA_VENV)/bin/python || "$$py" -m venv $(AURORA_VENV)
	$(AURORA_VENV)/bin/pip install -q --upgrade pip
	$(AURORA_VENV)/bin/pip install -q -r configs/aurora/jax-env.txt
	$(AURORA_VENV)/bin/pip install -q --no-deps -e .
	touch $(AURORA_STAMP)

# Debian 12's Level Zero loader (1.8, too old for the plugin), unpacked for the test of that message
aurora-old-loader: $(AURORA_STAMP)
	@test -d $(AURORA_VENV)/opt/libze1-debian || { mkdir -p $(AURORA_VENV)/opt && cd $(AURORA_VENV)/opt && \
	  { apt-get download -q libze1 >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get download -q libze1; }; } && \
	  dpkg -x libze1_*.deb libze1-debian && rm -f libze1_*.deb; } \
	  || echo 'note: could not unpack Debian libze1 (needs apt-get); its test will fail'

# the stack's tests on CPU: run when a Python >= 3.12 exists; under CI=true its absence is an error
test-aurora: $(STAMP)
	@if scripts/find_python312.sh >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory aurora-env aurora-old-loader && \
	  $(AURORA_VENV)/bin/python -m pytest -q tests/aurora_stack \
	    tests/test_pipeline.py::test_pipeline_loss_and_grads_equal_single_device \
	    tests/test_resume.py::test_resume_continues_bit_identically_on_another_mesh \
	    tests/test_resume.py::test_kill9_at_a_random_step_then_resume_is_bit_identical \
	    tests/test_train.py::test_70b_dry_run_on_96_fake_devices; \
	elif [ "$${CI:-}" = true ]; then scripts/find_python312.sh; echo "CI: the Intel-GPU stack tier needs it" >&2; exit 1; \
	else echo "test-aurora SKIPPED: $$(scripts/find_python312.sh 2>&1)"; fi

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
# aurora-torch-env, on Aurora after `module load frameworks/2025.3.1`: a venv over the
# module's Python and packages (--system-site-packages) with configs/aurora/torch-env.txt and this project on top,
# installed --no-deps so pip never touches the module's torch; it then checks the stack (python -m torch_ref.stack).
# test-torch210: that stack's CPU emulation (Python 3.12, torch 2.10, the same DeepSpeed, no JAX) in .venv-torch210,
# from PYTHON=... if given, else python3.12, else pyenv's 3.12.1; then the torch_stack tier in it. pytest exits
# non-zero (5) when it collects no test, so an empty tier fails.
AURORA_PYTHON ?= python
AURORA_TORCH_VENV := .venv-aurora-torch
T210 := .venv-torch210
T210_EXT := $(CURDIR)/$(T210)/torch_extensions

.PHONY: aurora-torch-env test-torch210 test-torch-stack

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
	@test -x $(T210)/bin/python || { py="$$(scripts/find_python312.sh)" || exit 2; \
	  echo "$$py -m venv $(T210)"; "$$py" -m venv $(T210); }
	$(T210)/bin/pip install -q -r configs/aurora/torch210-ci.txt
	$(T210)/bin/pip install -q --no-deps -e .
	TORCH_EXTENSIONS_DIR=$(T210_EXT) $(T210)/bin/python -c 'from deepspeed.accelerator import get_accelerator; \
	  get_accelerator().create_op_builder("ShareMemCommBuilder").load()'
	touch $@

test-torch210: $(T210)/.installed
	TORCH_EXTENSIONS_DIR=$(T210_EXT) $(T210)/bin/python -m pytest -m torch_stack tests/torch_stack -q

# in `make test`: the torch-stack tier when a Python >= 3.12 exists; under CI=true its absence is an error
test-torch-stack:
	@if scripts/find_python312.sh >/dev/null 2>&1; then $(MAKE) --no-print-directory test-torch210; \
	elif [ "$${CI:-}" = true ]; then scripts/find_python312.sh; echo "CI: the torch-stack tier needs it" >&2; exit 1; \
	else echo "test-torch-stack SKIPPED: $$(scripts/find_python312.sh 2>&1)"; fi
