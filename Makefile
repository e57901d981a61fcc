# softmax-kernels: developer commands. On a fresh clone `make test` and `make bench` build the
# virtual environment first (.venv, about a minute); `.ci/run` is `make install lint
# kernels-check test`. PY can point elsewhere, e.g. `make test-gpu PY=python3` on a GPU machine
# with PYTHONPATH=python: then no virtual environment is built.
VENV ?= .venv
PY ?= $(VENV)/bin/python
# torch: a CPU build by default, from PyTorch's CPU index (PyPI's default Linux wheel is a CUDA
# build of several GB). For a CUDA build: make install TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (The pin is exact: CI machines carry a local CPU wheel of torch 2.13.0, which pip finds there.)
TORCH_PIN = torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# The Triton the interpreter tests were written against (its interpreter changes between
# releases; 3.6's breaks on NumPy 2.4). GPU runs work from Triton 3.6 (the extra's floor).
TRITON_PIN = triton==3.9.0
# The extras installed for development: the test tools, both optional CPU/GPU paths that run on
# a CPU (Triton's interpreter, the compiled CPU kernels) and the benchmark's plotting.
EXTRAS = torch,test,triton,bench,cpu
STAMP = $(VENV)/.installed
ifeq ($(PY),$(VENV)/bin/python)
ENV_DEP = $(STAMP)
endif

.PHONY: install test test-gpu doctest lint format bench bench-quick kernels-check clean

# Rebuilds the environment's packages (the stamp records that it is complete).
install:
	rm -f $(STAMP)
	$(MAKE) $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH_PIN) --index-url $(TORCH_INDEX) --retries 1 --timeout 30
	$(VENV)/bin/pip install -q $(TRITON_PIN)
	$(VENV)/bin/pip install -q -e ".[$(EXTRAS)]"
	@# the clone's root on the venv's path: `python -m bench` from any folder of the clone
	$(VENV)/bin/python -c "import site; open(site.getsitepackages()[0] + '/softmax_kernels_clone.pth', 'w').write('$(CURDIR)\n')"
	touch $@

# CPU test run (about 8 minutes on 2 cores): the NumPy backend, the Triton backend through its
# interpreter on torch CPU tensors, the CUDA sources through their CPU emulation, the doctests
# of the package. GPU tests (marker `gpu`) skip with their reason. pytest's exit code 5 (no test
# collected) is reported as the failure it is.
test: $(ENV_DEP)
	@TRITON_INTERPRET=1 $(PY) -m pytest -q tests python/softmax_kernels --doctest-modules \
		--ignore=python/softmax_kernels/kernels; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; fi; exit $$rc

# On a machine with a CUDA GPU: the gpu-marked tests on CUDA tensors and CuPy arrays.
test-gpu:
	@$(PY) -m pytest -q -m gpu tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-gpu: pytest collected no tests"; fi; exit $$rc

lint: $(ENV_DEP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

format: $(ENV_DEP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# The main job: benchmarks every available backend against its peers (GPU), or the NumPy
# backend against SciPy and torch CPU (no GPU; about 9 minutes); results and plots land in
# bench/results/.
bench: $(ENV_DEP)
	$(PY) -m bench

bench-quick: $(ENV_DEP)
	$(PY) -m bench --quick

# Compiles every CUDA kernel for sm_80 and sm_90 with `-Xptxas -v`; fails on any spill,
# stack frame or local memory. Needs nvcc only (no GPU).
kernels-check: $(ENV_DEP)
	$(PY) kernels/cuda/check.py

clean:
	rm -rf build dist *.egg-info python/*.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
