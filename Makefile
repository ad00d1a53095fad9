# One-command set-up: `make test`, `make demo` and `make docs` create .venv and install everything:
# the core package, every optional extra ([all]), the test tools ([dev]) and the docs tools ([docs]).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint docs demo gallery install browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[all,dev,docs]'
	# lxt, the reference implementation of AttnLRP / CP-LRP that tests/test_lrp.py compares with (in a
	# subprocess): without its declared dependencies (bitsandbytes, open_clip pins), which that test does not use
	$(PY) -m pip install --no-deps 'lxt==2.1'
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
	$(PY) -m ruff check vitviz tests benchmarks tools docs/hooks.py docs/figures.py docs/griffe_extensions.py
	$(PY) -m mypy

# the documentation site into site/, strict: a broken link, a docstring griffe cannot read, a name of
# vitviz.__all__ without a reference entry or a docstring fails the build (mkdocs.yml, docs/hooks.py).
# Offline: no fonts or plugins fetch anything, and the figures come from the bundled models.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 HF_HUB_OFFLINE=1 $(VENV)/bin/mkdocs build --strict

test: $(STAMP) browser lint docs
	$(PY) -m pytest tests

demo: $(STAMP)
	$(VENV)/bin/vitviz demo --out demo-output

# the committed showcase in gallery/ (README images), regenerated offline by the demo
gallery: $(STAMP)
	rm -rf gallery
	$(VENV)/bin/vitviz demo --out gallery

clean:
	rm -rf $(VENV) demo-output site
