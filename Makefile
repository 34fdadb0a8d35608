# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install the pinned dependencies into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= ../shared/data

.PHONY: demo test clean bench-peers

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ovqvae demo --workdir=workdir/digits

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

# Optional: torch (CPU) and transformers for bench/compare_torch.py, in their own environment.
PEERS := .venv-peers
$(PEERS)/.installed:
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q torch==2.13.0 transformers==5.24.0
	touch $@

bench-peers: $(PEERS)/.installed

clean:
	rm -rf workdir .pytest_cache bazel-*
