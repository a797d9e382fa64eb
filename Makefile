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

RUN ?= runs/synthetic

demo: $(STAMP)
	@echo "sisray demo: the adaptation job (jobs/adapt.py) is not built yet. This generates the built-in"
	@echo "benchmark in $(DATA), trains the source-only model on Ray Train and evaluates it on target val."
	$(PY) jobs/make_synthetic.py --out $(DATA)
	$(PY) jobs/train_source.py --run-dir $(RUN)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
