PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BROWSER_STAMP := $(VENV)/.installed-browser
# The system's Chromium: `make test-browser` never downloads a browser (no `playwright install`).
CHROMIUM ?= $(shell command -v chromium || echo /usr/bin/chromium)

.PHONY: install run test test-browser lint perf chaos clean

install: $(STAMP)

# Re-installs whenever the project's own metadata changes.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,perf]'
	touch $(STAMP)

# Playwright (the `browser` extra) on top of the usual install; its wheel carries its driver.
$(BROWSER_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,perf,browser]'
	touch $(BROWSER_STAMP)

run: install
	$(BIN)/python -m switchd.devrun

# Two worker processes, a test file each at a time (module fixtures such as the perf smoke run once).
test: install lint
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

# The demo page in headless Chromium: a WebSocket turn and a WebRTC call on `make run`'s stack.
# Not part of `make test` (tests_browser/ is outside pytest's testpaths): it needs Chromium.
test-browser: $(BROWSER_STAMP)
	CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest tests_browser $(PYTEST_ARGS)

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
