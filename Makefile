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
