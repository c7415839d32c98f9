# Every target sets up what it needs on first use: a virtual environment from the lock file
# and, when run as root, the Debian packages the tests and the demo use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
PYTEST  ?= $(BIN)/pytest

.PHONY: help run test test-fast lint fmt lock bench bench-warmup bench-fuse bench-coldstart \
        bench-admission golden system-deps images push test-images lock-runtime clean

help:
	@echo "make run        inject the examples and run the local demo (no cluster needed)"
	@echo "make test       the whole test suite (lint, types, unit, golden, http, e2e)"
	@echo "make bench      benchmarks (tests/bench), results to compare with BENCHMARKS.md"
	@echo "make lock       re-resolve requirements.lock from pyproject.toml (make lock-runtime: the images' lock)"
	@echo "make golden     regenerate golden files (MODELCACHE_UPDATE_GOLDEN=1)"
	@echo "make images     build the container images (docker, podman or buildah; REGISTRY=, TAG=,"
	@echo "                BASE_IMAGE=debootstrap for a base made from the Debian archive)"
	@echo "make images REGISTRY=registry.example.com/modelcache push   build and push both images"
	@echo "make test-images build both images from scratch and smoke-run them (root; buildah, podman)"

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --require-hashes -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

venv: $(STAMP)

system-deps:
	@sh scripts/system-deps.sh

lock:
	uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
	    --no-header -o requirements.lock

run: $(STAMP) system-deps
	$(BIN)/python -m tests.localpod.demo

test: $(STAMP) system-deps lint
	$(PYTEST) -q tests --ignore=tests/bench

test-fast: $(STAMP)
	$(PYTEST) -q -x tests/unit tests/golden tests/http

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

golden: $(STAMP)
	MODELCACHE_UPDATE_GOLDEN=1 $(PYTEST) -q tests/golden

bench: bench-admission bench-warmup bench-fuse bench-coldstart

bench-admission: $(STAMP)
	$(BIN)/python -m tests.bench.admission

bench-warmup: $(STAMP) system-deps
	$(BIN)/python -m tests.bench.warmup

bench-fuse: $(STAMP) system-deps
	$(BIN)/python -m tests.bench.fuse

bench-coldstart: $(STAMP) system-deps
	$(BIN)/python -m tests.bench.coldstart

lock-runtime:
	sh scripts/build-images.sh lock-runtime

# Image variables reach scripts/build-images.sh only when set (its defaults: ghcr.io/modelcache,
# the version in pyproject.toml, the first engine that answers, the Dockerfiles' base).
IMAGE_VARS := $(strip $(foreach v,REGISTRY TAG ENGINE BASE_IMAGE WHEELS NO_CACHE STORAGE_DRIVER \
                CONTAINERS_ROOT CONTAINERS_RUNROOT,$(if $($(v)),$(v)="$($(v))")))

# `make images REGISTRY=... push` builds, then pushes (push alone does both as well)
images:
	$(if $(filter push,$(MAKECMDGOALS)),,$(IMAGE_VARS) sh scripts/build-images.sh)

push:
	$(IMAGE_VARS) sh scripts/build-images.sh push

test-images: $(STAMP)
	sh scripts/image-deps.sh
	$(BIN)/python -m tests.images.smoke

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
