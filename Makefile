# Quick start: `make demo` runs the main job on the built-in benchmark, `make test` runs the tests.
# Both create .venv and install sisray with the exact versions in constraints.txt the first time.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data/synthetic
PYTEST_ARGS ?=

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	@echo "sisray demo: the adaptation job (jobs/adapt.py) is not built yet; this generates the"
	@echo "built-in synthetic benchmark in $(DATA) and prints its statistics, read through the real loaders."
	$(PY) jobs/make_synthetic.py --out $(DATA)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
