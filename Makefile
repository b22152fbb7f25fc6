# Two commands do all the set-up on a fresh machine (Python >= 3.11 with venv):
#   make run    builds .venv, then runs the permuted-MNIST forgetting-curve experiment into runs/
#   make test   builds .venv, then runs lint and every test, notebooks included (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-all lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/nestlearn run permuted_mnist_forgetting --out runs/permuted_mnist_forgetting-$$(date +%Y%m%d-%H%M%S)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Two pytest workers (pytest-xdist), each taking whole test files so that module-scoped fixtures (shared
# compiled programs) are built once. --no-loadscope-reorder hands the files out in collection order:
# xdist's default sends files with the most tests first, which left the notebooks (few tests, the longest
# files) for last, one worker running them alone (cold cache, quiet 2 cores: 15.3 min, of which about 4
# with one worker). tests/test_0_notebook_06.py and tests/test_0_notebooks.py are named to come first.
test: lint
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile --no-loadscope-reorder

# Everything, including the end-to-end experiment runs marked slow (a few minutes more).
test-all: lint
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# Peers (Avalanche, PyTorch) install into their own environment; see benchmarks/README.md.
bench: $(STAMP)
	$(PY) benchmarks/permuted_mnist.py

clean:
	rm -rf $(VENV) runs .pytest_cache
