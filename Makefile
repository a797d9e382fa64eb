# Quick start: `make demo` runs the main job on the built-in benchmark, `make test` runs the tests.
# Both create .venv and install sisray with the exact versions in constraints.txt the first time.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The whole method on the built-in benchmark (generated first if missing): the shipped source model
# (sisray/weights), the LSE rounds (two in the default), the IoU table. Re-running resumes; `make demo RUN=runs/other` starts afresh.
RUN ?= runs/synthetic

demo: $(STAMP)
	$(PY) jobs/adapt.py --run-dir $(RUN)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
