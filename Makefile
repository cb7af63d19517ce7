# One entry point for a fresh machine: `make demo` and `make test` install everything first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= runs/demo
APT_PACKAGES := dataset-fashion-mnist chromium g++ python3-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps demo test test-engine-off test-slow test-all test-torch-latest doctest lint import-tree docs bench clean

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned first so that no CUDA build is pulled in by a dependency.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,dev]"
	touch $@

# The NUTS virtual machine's C library is built once per installation (about 10 s), not per model.
install: system-deps $(VENV)/.installed
	@$(BIN)/python -c "from vilab.inference.engine.backends.vm import build_library; build_library()" \
	  || echo "note: the NUTS virtual machine could not be built; traced steps run as fx code"

demo: install
	$(BIN)/vilab compare --out $(OUT)

test: install
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider

# NUTS and SVI with the engine off (every step plain eager PyTorch): they hold no fusion or
# scheduling logic of their own, so they pass without it; tests of the engine's own paths
# (marked engine_path) are skipped.
test-engine-off: install
	VILAB_ENGINE=off $(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider tests/inference/nuts tests/inference/svi

# The engine's tests again on the newest torch this machine installs (a CUDA build that runs on
# the CPU), in a second environment; CI runs it after `make test`.
TORCH_LATEST ?= 2.14.1
VENV_LATEST  ?= .venv-torch-latest
$(VENV_LATEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/pip install -q --upgrade pip
	$(VENV_LATEST)/bin/pip install -q torch==$(TORCH_LATEST)
	$(VENV_LATEST)/bin/pip install -q -e ".[test]"
	touch $@

test-torch-latest: system-deps $(VENV_LATEST)/.installed
	$(VENV_LATEST)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider -o log_level=WARNING \
	  tests/inference/engine tests/inference/nuts/test_fast_nuts.py tests/inference/nuts/test_fast_tree.py tests/inference/nuts/test_nuts.py tests/inference/nuts/test_nuts_backends.py tests/inference/svi/test_svi.py

# Runnable examples in the public docstrings.
DOCTEST_MODULES := tests/test_docstring_examples.py

doctest: install
	$(BIN)/python -m pytest -q -p no:cacheprovider $(DOCTEST_MODULES)

# ruff (lint and format), mypy on the public API, and the import layers (pyproject.toml).
lint: install import-tree
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd $(IMPORT_TREE) && PYTHONPATH=. $(CURDIR)/$(BIN)/lint-imports --config $(CURDIR)/pyproject.toml

# import-linter reads a package from one folder; vilab's subpackages live beside it (package-dir),
# so it reads a tree of links that puts them where the installed package has them.
IMPORT_TREE := build/import-tree
import-tree:
	rm -rf $(IMPORT_TREE) && mkdir -p $(IMPORT_TREE)/vilab
	for f in vilab/*; do ln -s $(CURDIR)/$$f $(IMPORT_TREE)/vilab/; done
	for d in models guides inference; do ln -s $(CURDIR)/$$d $(IMPORT_TREE)/vilab/$$d; done

# The documentation, with warnings as errors.
docs: install
	$(BIN)/sphinx-build -W --keep-going -q -b html docs build/site

test-slow: install
	$(BIN)/python -m pytest -q -m slow -p no:cacheprovider

test-all: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: install
	$(BIN)/python benchmarks/small_problems.py

clean:
	rm -rf $(VENV) runs .pytest_cache build site *.egg-info
