PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test perf clean

install: $(STAMP)

# Re-installs whenever the project's own metadata changes.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,perf]'
	touch $(STAMP)

run: install
	$(BIN)/python -m switchd.devrun

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

perf: install
	$(BIN)/python -m perf $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) *.egg-info perf/results var
