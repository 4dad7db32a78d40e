# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU-side torch/torchvision pair that lies on this machine's disk; a fresh machine elsewhere gets it from PyPI.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev,hf,onnx]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/python -m trainer demo --out demo

# Triton fixes interpreted vs compiled when it decorates a kernel, at import, so the kernel tests that run
# Triton's CPU interpreter (marked `interpreter`) get a pytest call of their own with TRITON_INTERPRET=1 set
# from the start. Each call's failure fails the target. A -m here replaces pyproject's `-m 'not slow'`, so the
# first call repeats it. pytest-xdist runs two test files at a time (whole files, so a module's fixtures are
# built once), one torch thread each: many tests wait on subprocesses, kills and disk, and two workers with
# two threads each would oversubscribe a 2-core machine.
XDIST := -n 2 --dist loadfile
test: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(XDIST) -m "not slow and not interpreter"
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q $(XDIST) -m interpreter tests/test_kernels_*.py

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
