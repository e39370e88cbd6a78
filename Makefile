# tramontane: set-up and entry points. `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup check test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch 2.13.0 first, so nothing else pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Type check of src/tramontane with the [tool.mypy] settings in pyproject.toml.
check: $(STAMP)
	$(PY) -m mypy

# The suite in TEST_WORKERS pytest-xdist processes of one thread each (a test file stays in one process, so
# its module fixtures are built once): on 2 cores about half the time of one process with 2 threads.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The flagship job with the benchmarked defaults on the bundled CPS 1988 wages table (18,770 rows): a DP
# language model and measured marginals at epsilon 1, then synthetic rows, utility against the held-out split
# (its one-line summary on the terminal), and an HTML + JSON report, all under out/ (about 9 minutes on 2
# cores). The same defaults on UCI Adult (`--data adult --test adult-test --target income`) take about 20.
demo: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m tramontane.cli synth --data cps1988 --test cps1988-test --target parttime \
		--epsilon 1 --delta 1e-5 --seed 0 --out out/synthetic.csv --report out/report --overwrite

bench: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) benchmarks/generate.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
