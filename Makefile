# Two targets a fresh machine needs: `make run` (set up, then open the workstation on the tiny
# default) and `make test` (set up, then run the test suite). Both are idempotent: the virtualenv
# is made once and reinstalled only when requirements.lock or pyproject.toml change.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.oatui-installed
WORKSPACE ?= workspace
PYTEST_ARGS ?=

.PHONY: setup run test demo clean-venv

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "pip==26.3"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

run: setup
	$(BIN)/oatui --workspace $(WORKSPACE)

demo: setup
	$(BIN)/oatui demo --workspace $(WORKSPACE)-demo

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
