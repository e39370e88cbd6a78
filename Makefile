# tramontane: set-up and entry points. `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch 2.13.0 first, so nothing else pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q tests

demo: $(STAMP)
	@echo "The flagship job (DP synthetic tables) is not built yet; see the README."
	@exit 1

bench: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) benchmarks/generate.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
