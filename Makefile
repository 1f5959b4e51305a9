PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint perf chaos clean

install: $(STAMP)

# Re-installs whenever the project's own metadata changes.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,perf]'
	touch $(STAMP)

run: install
	$(BIN)/python -m switchd.devrun

test: install lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Type check and lint the daemons and their shared package (configured in pyproject.toml).
lint: install
	$(BIN)/mypy switchd switchdb common
	$(BIN)/ruff check switchd switchdb common

perf: install
	$(BIN)/python -m perf $(if $(QUICK),--quick,)

# Kills and restarts the daemons at random under realtime sessions; fails if a token is lost or billed twice.
chaos: install
	$(BIN)/python -m perf.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) *.egg-info perf/results var
