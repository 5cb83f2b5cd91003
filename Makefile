# Quick start:  make train   (set up, get CIFAR-10, train the paper's model)
#               make test    (set up, lint, run the whole test suite: what CI runs)
#               make check   (lint and the fast tier, in-process only: after every edit)
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(or $(CIFAR_DIST_DATA),$(HOME)/.cache/cifar_dist)
SHARED_DATA := ../shared/data/build_cifar10.py
CONFIG ?= configs/seed.yaml
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup data train lint check test bench clean

setup:
	@bash scripts/setup.sh

# CIFAR-10 into $(DATA): built from ../shared/data/cifar10-jpeg.tar.gz when that copy exists, else a download.
data: setup
	@if [ ! -f "$(DATA)/cifar-10-batches-py/test_batch" ] && [ -f "$(SHARED_DATA)" ]; then \
		$(PY) $(SHARED_DATA) "$(DATA)"; fi
	@$(VENV)/bin/cifar-dist prepare --root "$(DATA)"

train: data
	CIFAR_DIST_DATA="$(DATA)" $(VENV)/bin/cifar-dist train --config $(CONFIG) $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

# The fast tier: no test marked slow, and nothing that starts a process (conftest refuses).
check: lint
	CIFAR_DIST_TIER=check $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/cifar-dist bench $(ARGS)

clean:
	rm -rf runs .pytest_cache .cache
