# One-command set-up: `make test` and `make demo` create .venv and install everything:
# the core package, every optional extra ([all]) and the test tools ([dev]).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo gallery install browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP)

# Chromium and its driver from Debian, for the gallery page's browser test
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	      || echo "warning: could not install chromium; the browser test will fail"; \
	  else echo "note: install chromium and chromium-driver (sudo apt-get install chromium chromium-driver) for the browser test"; fi; \
	fi

# ruff (style, imports, bugbear, pyupgrade) and mypy (strict on types.py, analyze/, render/);
# both configured in pyproject.toml
lint: $(STAMP)
	$(PY) -m ruff check vitviz tests benchmarks
	$(PY) -m mypy

test: $(STAMP) browser lint
	$(PY) -m pytest tests

demo: $(STAMP)
	$(VENV)/bin/vitviz demo --out demo-output

# the committed showcase in gallery/ (README images), regenerated offline by the demo
gallery: $(STAMP)
	rm -rf gallery
	$(VENV)/bin/vitviz demo --out gallery

clean:
	rm -rf $(VENV) demo-output
