# Quick start: `make demo` runs the main job on the built-in benchmark, `make test` runs the tests.
# Both create .venv and install sisray with the exact versions in constraints.txt the first time.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Two pytest workers: run one at a time, the tests leave the 2 cores idle 38% of the time (Ray start-up,
# waits on jobs and servers). TEST_WORKERS=0 runs them in this process. Tests are handed out one at a
# time, so that the end-to-end jobs, collected first (tests/conftest.py), go to both workers.
TEST_WORKERS ?= 2

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
	$(PY) -m pytest -n $(TEST_WORKERS) --maxschedchunk 1 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
