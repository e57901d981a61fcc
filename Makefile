# softmax-kernels: developer commands. `make install test` is what CI runs (.ci/run).
# PY can point elsewhere, e.g. `make test-gpu PY=python3` on a GPU machine with PYTHONPATH=python.
VENV ?= .venv
PY ?= $(VENV)/bin/python
# Exact pin: this machine carries a local CPU wheel of torch 2.13.0; any other spec pulls
# several GB of CUDA packages from the registry.
TORCH_PIN = torch==2.13.0
# The Triton the interpreter tests were written against (its interpreter changes between
# releases; 3.6's breaks on NumPy 2.4). Users get any triton>=3.0 through the extra.
TRITON_PIN = triton==3.9.0

.PHONY: install test test-gpu lint format bench bench-quick kernels-check clean

install:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH_PIN) $(TRITON_PIN)
	$(VENV)/bin/pip install -q -e ".[test,triton,bench]"

# CPU test run: the NumPy backend, and the Triton backend through its interpreter on torch CPU
# tensors. GPU tests (marker `gpu`) skip with their reason. pytest's exit code 5 (no test
# collected) is reported as the failure it is.
test:
	@TRITON_INTERPRET=1 $(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; fi; exit $$rc

# On a machine with a CUDA GPU: the gpu-marked tests on CUDA tensors and CuPy arrays.
test-gpu:
	@$(PY) -m pytest -q -m gpu; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-gpu: pytest collected no tests"; fi; exit $$rc

lint:
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# The main job: benchmarks every available backend against its peers (GPU), or the NumPy
# backend against SciPy and torch CPU (no GPU); results and plots land in bench/results/.
bench:
	$(PY) -m bench

bench-quick:
	$(PY) -m bench --quick

# Compiles every CUDA kernel for sm_80 and sm_90 with `-Xptxas -v`; fails on any spill,
# stack frame or local memory. Needs nvcc only (no GPU).
kernels-check:
	$(PY) kernels/cuda/check.py

clean:
	rm -rf build dist *.egg-info python/*.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
