# log-bridge: `make run` starts a local receiver, `make test` runs the whole suite, `make bench` the benchmarks,
# `make image` builds the image with docker (when its daemon answers), else podman or buildah; ENGINE=... to choose.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make run` needs only what serving needs (every sink's SDK, no test or deploy-check tools); its pid file is for
# `log-bridge reload --pid-file data/log-bridge.pid`.
RUN_STAMP := $(VENV)/.installed-run

.PHONY: run test bench lint clean image

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all,test,deploy-checks]'
	touch $(STAMP) $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all]'
	touch $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/log-bridge serve --config examples/local.yaml --pid-file data/log-bridge.pid

test: $(STAMP)
	$(BIN)/ruff check receiver sinks tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest

# The intake part loads the servers with wrk (package wrk), installed here when root can; without it a Python
# load generator is used, which saturates its core before the no-ops do (their ratios are then not comparable).
bench: $(STAMP)
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null; } || \
	  echo "make bench: wrk is not installed: the Python load generator is used" >&2
	$(BIN)/python -m bench.run

lint: $(STAMP)
	$(BIN)/ruff check receiver sinks tests bench
	$(BIN)/ruff format --check receiver sinks tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) data log-bridge-data .pytest_cache .mypy_cache .ruff_cache

# The image: ENGINE may carry global options (ENGINE="podman --runtime runc"), BASE replaces the base image of both
# stages (the Dockerfile's default: python:3.13-slim-trixie), BUILD_FLAGS are added to the build command.
ENGINE ?= $(shell if docker info >/dev/null 2>&1; then echo docker; else command -v podman || command -v buildah; fi)
IMAGE ?= log-bridge:latest
BASE ?=
BUILD_FLAGS ?=

image:
	@test -n "$(ENGINE)" || { echo "make image: none of docker, podman or buildah is installed" >&2; exit 1; }
	$(ENGINE) build $(if $(BASE),--build-arg BASE=$(BASE)) $(BUILD_FLAGS) -t $(IMAGE) .
