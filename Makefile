# Two commands set everything up: `make demo` and `make test` (see README).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
FAISS ?= cpu
CATALOG ?= builtin
DEMO_ARGS ?=
BIN := $(VENV)/bin

# Telemetry off and no hub lookups, for every command this Makefile runs.
export DAGSTER_DISABLE_TELEMETRY := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export AWS_EC2_METADATA_DISABLED := true
export PYTHONUNBUFFERED := 1
export DAGSTER_HOME := $(CURDIR)/.afmrl/dagster_home
export AFMRL_CATALOG := $(CATALOG)

.PHONY: install browser demo lint test dev mlflow-ui clean

$(BIN)/.installed: pyproject.toml
	@echo "==> creating virtualenv $(VENV) and installing pinned dependencies (faiss: $(FAISS))"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar off -q -U pip setuptools wheel
	$(BIN)/pip install --progress-bar off -e '.[$(FAISS),dev]'
	touch $@

install: $(BIN)/.installed

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/afmrl demo $(DEMO_ARGS)

# Headless Chromium and its driver for the UI test, from Debian's packages (as root, once).
# Without them that one test skips and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "==> installing chromium and chromium-driver (Debian) for the browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
			|| echo "==> could not install chromium: the browser test will skip"; \
	else echo "==> no chromium and not root: the browser test will skip (apt-get install chromium chromium-driver)"; fi

# The import contracts and ruff (pyproject.toml). import-linter finds modules on disk, and the
# editable install maps afmrl_dagster.assets and .resources to the top-level folders, so it runs
# on a tree of links laid out as the installed package.
LINT_TREE := .afmrl/lint
lint: install
	rm -rf $(LINT_TREE) && mkdir -p $(LINT_TREE)/afmrl_dagster
	ln -s $(CURDIR)/afmrl_dagster/* $(CURDIR)/assets $(CURDIR)/resources $(LINT_TREE)/afmrl_dagster/
	cd $(LINT_TREE) && $(abspath $(BIN))/lint-imports --config $(CURDIR)/pyproject.toml --no-cache
	$(BIN)/ruff check .

test: install browser lint
	$(BIN)/python -m pytest

dev: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///.afmrl/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf .afmrl
