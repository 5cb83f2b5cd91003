# Quick start:  make train   (set up what training needs, get CIFAR-10, train the paper's model)
#               make test    (set up everything the tests need, lint, run the whole suite: what CI runs)
#               make check   (lint and the fast tier, in-process only: after every edit)
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(or $(CIFAR_DIST_DATA),$(HOME)/.cache/cifar_dist)
CIFAR_ARCHIVE ?= ../shared/data/cifar10-jpeg.tar.gz
CONFIG ?= configs/seed.yaml
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup setup-lean data train lint check test bench gpu-check clean

# Everything the tests need (dev tools, DeepSpeed, FFCV, as root the Debian packages of FFCV and Slurm).
setup:
	@bash scripts/setup.sh

# What training needs, nothing more (the package, torch, torchvision, accelerate, light dependencies).
setup-lean:
	@bash scripts/setup.sh --lean

# CIFAR-10 into $(DATA): built from the JPEG archive $(CIFAR_ARCHIVE) when it exists, else downloaded.
data: setup-lean
	@if [ -f "$(CIFAR_ARCHIVE)" ]; then \
		$(VENV)/bin/cifar-dist prepare --quiet --root "$(DATA)" --from-archive "$(CIFAR_ARCHIVE)"; \
	else $(VENV)/bin/cifar-dist prepare --quiet --root "$(DATA)"; fi

train: data
	CIFAR_DIST_DATA="$(DATA)" $(VENV)/bin/cifar-dist train --config $(CONFIG) $(ARGS)

# ruff's rules, ruff's formatting and mypy over the package: what .pre-commit-config.yaml runs too.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The fast tier: no test marked slow, and nothing that starts a process (conftest refuses).
check: lint
	CIFAR_DIST_TIER=check $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup-lean
	$(VENV)/bin/cifar-dist bench $(ARGS)

# On a machine with one NVIDIA GPU and its own PyTorch (no setup, no network): environment,
# sync check, bench table, one timed epoch; FULL=1 adds the full recipes. See docs/benchmarks.md.
gpu-check:
	@bash scripts/gpu_check.sh $(if $(FULL),--full) $(ARGS)

clean:
	rm -rf runs .pytest_cache .cache
