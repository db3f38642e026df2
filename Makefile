# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench install clean browser-deps real-data

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev,real,fast]'
	touch $(STAMP)

install: $(STAMP)

# Debian's chromium for the browser test (Playwright drives it; no browser download).
browser-deps:
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# Debian's Fashion-MNIST (70,000 labelled 28x28 images, MIT) for the real-image tests, bench and demo section.
real-data:
	test -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null)

demo: $(STAMP) real-data
	$(VENV)/bin/t2c demo

test: $(STAMP) browser-deps real-data
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP) browser-deps real-data
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo_out .pytest_cache
