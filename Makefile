# Two commands for a newcomer: `make demo` (the embedded demo) and `make test`.
# Both create the virtual environment when it is missing or out of date.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick test test-all venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,tensorboard]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tokencompose demo

demo-quick: $(STAMP)
	$(VENV)/bin/tokencompose demo --quick

# Two test processes (pytest-xdist), each with its own Prefect server, a test file at a time:
# the CLI tests wait on Prefect as much as they compute, so two share two cores well.
test: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf runs .pytest_cache
