# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install the pinned dependencies into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= ../shared/data

.PHONY: demo test clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ovqvae demo --workdir=workdir/digits

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf workdir .pytest_cache bazel-*
