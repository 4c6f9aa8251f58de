# logpipe developer entry points. `make test` is what CI runs (see .ci/run and README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
# Keep Ansible/Molecule state inside the ignored cache so runs are self-contained.
export ANSIBLE_LOCAL_TEMP := $(abspath .cache/ansible/tmp)
export ANSIBLE_HOME := $(abspath .cache/ansible/home)

.PHONY: help venv fetch images lint test test-unit test-integration test-molecule test-full \
        lab lab-status lab-shell lab-down bench chaos clean

help:
	@echo "make test        lint + unit + integration (real Kafka/ES) + Molecule role scenarios"
	@echo "make test-full   test + the end-to-end pipeline scenario"
	@echo "make lab         bring up the multi-host lab and deploy site.yml; lab-status, lab-shell HOST=, lab-down"
	@echo "make bench       benchmarks against ceilings measured in the same run"
	@echo "make chaos       chaos suite: kills, outages, rebalances, poison; checks lost=0 duplicated=0"

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

fetch:
	scripts/fetch-kafka.sh >/dev/null
	scripts/fetch-elasticsearch.sh >/dev/null

images:
	scripts/build-base-image.sh bookworm
	scripts/build-base-image.sh trixie

lint: venv
	$(BIN)/ruff check logpipe tests
	$(BIN)/mypy
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint --profile production

test-unit: venv
	$(BIN)/pytest -q tests/unit

test-integration: venv fetch
	$(BIN)/pytest -q tests/integration

test-molecule: venv fetch images
	$(BIN)/pytest -q tests/molecule -m "not full"

test: lint
	$(MAKE) venv fetch images
	$(BIN)/pytest -q tests -m "not full"

test-full: lint
	$(MAKE) venv fetch images
	$(BIN)/pytest -q tests

lab: venv fetch
	scripts/lab.sh up

lab-status: venv
	scripts/lab.sh status

lab-shell:
	scripts/lab.sh shell $(HOST)

lab-down:
	scripts/lab.sh down

bench: venv fetch
	$(PY) -m bench

chaos: venv fetch
	$(BIN)/pytest -q -s tests/chaos

clean:
	rm -rf .cache/molecule .cache/ansible .pytest_cache .mypy_cache .ruff_cache
