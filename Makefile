# The two commands of the README:
#   make quickstart   set everything up and run the main job on the embedded default corpus
#   make test         set everything up and run the test suite (what CI runs)
PY ?= python3

.PHONY: install quickstart test test-slurm

# torch==2.13.0 is the CPU build on machines without CUDA; a bare `torch` requirement with no
# torch installed would pull a multi-GB CUDA build. megatron-core is the tests' reference for the
# dataset indices; --no-deps, since its datasets need only torch, numpy and packaging (the test
# extra) and its full requirements would pull far more.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps megatron-core==0.16.1

quickstart: install
	$(PY) -m megalite quickstart --output-dir runs/quickstart

test: install
	$(PY) -m pytest tests

# Only the real-SLURM tests (two slurmd nodes on this machine; also part of `make test`).
test-slurm: install
	$(PY) -m pytest -m slurm tests/integration/test_slurm.py
