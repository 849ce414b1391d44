# metric-etl: the obvious ways in. `make` alone lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
ENV_FILE := .stack/env
LINT_PATHS := $(wildcard etl tests bench)
PYTEST_ARGS ?=

.PHONY: help venv stack-up stack-down stack-status stack-clean test lint fmt demo readme-demo bench bench-throughput bench-readers chaos mutants airflow-check cron-check cluster-up cluster-down chaos-cluster

help: ## list the targets
	@echo "metric-etl: make <target>"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

venv: $(VENV_STAMP) ## create .venv and install the package with its [dev] extra

# pip runs again only when the package metadata or the C extension (etl/native.c) changed.
$(VENV_STAMP): pyproject.toml setup.cfg setup.py etl/native.c
	@test -x $(PY) || python3 -m venv $(VENV) || { \
	  echo "error: python3 -m venv failed; on Debian: apt-get install -y python3-venv" >&2; exit 1; }
	@$(PY) -m pip install -q -e '.[dev]' >$(VENV)/pip.log 2>&1 || { \
	  echo "error: pip install -e .[dev] failed; last lines of $(VENV)/pip.log:" >&2; tail -n 30 $(VENV)/pip.log >&2; exit 1; }
	@touch $@

stack-up: ## start Kafka and PostgreSQL on 127.0.0.1 (idempotent); writes .stack/env
	@scripts/stack.sh up

stack-down: ## stop Kafka and PostgreSQL (data stays in .stack/)
	@scripts/stack.sh down

stack-status: ## show what is running
	@scripts/stack.sh status

stack-clean: ## stop the stack and delete .stack/ (certificates, data, passwords)
	@scripts/stack.sh clean

test: venv stack-up ## the whole test suite against the local stack
	@. $(ENV_FILE) && $(VENV)/bin/pytest -q $(PYTEST_ARGS)

mutants: stack-up ## mutation testing of the promises (opt-in, not in CI; time-boxed to 45 min)
	@scripts/mutants.sh

lint: venv ## ruff check, ruff format --check and mypy
	@$(VENV)/bin/ruff check $(LINT_PATHS)
	@$(VENV)/bin/ruff format --check $(LINT_PATHS)
	@$(VENV)/bin/mypy etl

fmt: venv ## ruff format and ruff check --fix
	@$(VENV)/bin/ruff format $(LINT_PATHS)
	@$(VENV)/bin/ruff check --fix $(LINT_PATHS)

demo: venv stack-up ## a sample backlog with bad messages, one run, the report and the rejects
	@if [ -f scripts/demo.sh ]; then . $(ENV_FILE) && bash scripts/demo.sh; \
	else echo "demo: the stack is up; scripts/demo.sh (the sample and the run) does not exist yet"; fi

# The README's "A run and its report" block is this demo's output: a fresh demo on a throwaway topic and
# schema (deleted afterwards), written between the README's markers. tests/test_readme_commands.py checks it.
readme-demo: venv stack-up ## run the demo on a throwaway topic and write its output into README.md
	@. $(ENV_FILE) && $(PY) -m tests.demo_transcript --write

BENCH_ARGS ?=

bench: venv stack-up ## CPU per message against the baseline commit, side by side (BENCH_ARGS="-n 500000 -n 1000000"); --atomic against the default
	@. $(ENV_FILE) && $(PY) bench/cpu.py $(BENCH_ARGS)
	@. $(ENV_FILE) && $(PY) bench/atomic.py

bench-throughput: venv stack-up ## throughput against the raw limit and the naive baseline (and each Kafka codec's cost)
	@. $(ENV_FILE) && $(PY) bench/run.py
	@. $(ENV_FILE) && $(PY) bench/codecs.py

READERS_ARGS ?=

bench-readers: venv stack-up ## the readers' questions on 10M checks: raw SQL against the rollups (long)
	@. $(ENV_FILE) && $(PY) bench/readers.py $(READERS_ARGS)

CHAOS_ARGS ?= --atomic-share 0.3

chaos: venv stack-up ## SIGKILLs, a PostgreSQL and a broker restart under 3 runs (some --atomic), then check exactly-once
	@. $(ENV_FILE) && $(PY) bench/chaos.py $(CHAOS_ARGS)

# Opt-in, outside `make test`: Apache Airflow is a large install (about 130 packages).
AIRFLOW_REQUIREMENTS := cron/airflow/requirements-airflow.txt
AIRFLOW_VENV ?= $(HOME)/.cache/metric-etl/airflow-3.3.2

$(AIRFLOW_VENV)/.installed: $(AIRFLOW_REQUIREMENTS)
	@test -x $(AIRFLOW_VENV)/bin/python || python3 -m venv $(AIRFLOW_VENV)
	@echo "installing Apache Airflow into $(AIRFLOW_VENV) (a few minutes the first time)"
	@$(AIRFLOW_VENV)/bin/pip install -q -r $(AIRFLOW_REQUIREMENTS) >$(AIRFLOW_VENV)/pip.log 2>&1 || { \
	  echo "error: pip install -r $(AIRFLOW_REQUIREMENTS) failed; last lines of $(AIRFLOW_VENV)/pip.log:" >&2; \
	  tail -n 30 $(AIRFLOW_VENV)/pip.log >&2; exit 1; }
	@touch $@

airflow-check: venv stack-up $(AIRFLOW_VENV)/.installed ## opt-in: the DAG under a real Apache Airflow 3 (airflow dags test)
	@. $(ENV_FILE) && AIRFLOW_CHECK_VENV=$(AIRFLOW_VENV) $(VENV)/bin/pytest -q -p no:cacheprovider tests/check_airflow.py

cron-check: venv stack-up ## opt-in, as root: follow cron/README.md on this machine with a real cron daemon
	@. $(ENV_FILE) && $(VENV)/bin/pytest -q -p no:cacheprovider tests/check_cron_host.py

cluster-up: venv ## opt-in: three KRaft brokers on 19200-19205 (RF 3, min.insync.replicas 2; not in CI)
	@scripts/cluster.sh up

cluster-down: ## stop the three-broker cluster (data stays in .stack/cluster)
	@scripts/cluster.sh down

chaos-cluster: venv stack-up cluster-up ## on the cluster: a leader SIGKILLed mid-run, a rolling restart of all three
	@. $(ENV_FILE) && $(PY) bench/chaos.py --cluster $(CHAOS_CLUSTER_ARGS)
