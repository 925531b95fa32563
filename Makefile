# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment when it is missing and install the project into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
REPORT ?= inferlink-report

.PHONY: demo test lint bench clean test-oldest test-xla

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $(STAMP)

# One thread: the example is small, and OpenMP threads spinning against any other busy
# process on a 2-core machine make it many times slower (measured: 118 s vs 8 s).
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest --inferlink-audit example_audits/digits.yaml --inferlink-report $(REPORT)
	@echo "Report: $(abspath $(REPORT))/report.html  (numbers: $(abspath $(REPORT))/results.json)"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# One torch thread per xdist worker: two workers each spinning two OpenMP threads on two
# cores slow the suite down many times over.
test: $(STAMP) lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -rs -n 2

# The suite on the oldest torch the package declares (pyproject.toml), in a second virtual
# environment: constraints.txt with its torch/torchvision pins replaced by constraints-oldest.txt.
# torch 2.13.0 comes from the registry (a CUDA build, ~4 GB with its libraries; minutes).
# `make test-oldest XDIST=` runs it in one process.
OLDEST_VENV  ?= .venv-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.installed-stamp
XDIST        ?= -n 2

$(OLDEST_STAMP): pyproject.toml constraints.txt constraints-oldest.txt
	@test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	{ grep -vE '^torch(vision)?==' constraints.txt; cat constraints-oldest.txt; } \
		> $(OLDEST_VENV)/constraints.txt
	$(OLDEST_VENV)/bin/python -m pip install --quiet -c $(OLDEST_VENV)/constraints.txt -e '.[test]'
	@touch $@

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
	OMP_NUM_THREADS=1 $(OLDEST_VENV)/bin/python -m pytest -q -rs $(XDIST)

# The XLA-marked tests on torch_xla's CPU backend (PJRT_DEVICE=CPU), compared with the CPU, in
# their own environment: torch_xla pins an older torch than the package declares (see
# constraints-xla.txt), so the package goes in with --no-deps and its other dependencies apart.
XLA_VENV  ?= .venv-xla
XLA_STAMP := $(XLA_VENV)/.installed-stamp

$(XLA_STAMP): pyproject.toml constraints.txt constraints-xla.txt
	@test -x $(XLA_VENV)/bin/python || $(PYTHON) -m venv $(XLA_VENV)
	$(XLA_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(XLA_VENV)/bin/python -m pip install --quiet -r constraints-xla.txt
	$(XLA_VENV)/bin/python -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(d for d in deps if not d.startswith("torch")))' \
		> $(XLA_VENV)/requirements.txt
	grep -vE '^torch(vision)?==' constraints.txt > $(XLA_VENV)/constraints.txt
	$(XLA_VENV)/bin/python -m pip install --quiet -c $(XLA_VENV)/constraints.txt \
		-r $(XLA_VENV)/requirements.txt pytest
	$(XLA_VENV)/bin/python -m pip install --quiet --no-deps -e .
	@touch $@

test-xla: $(XLA_STAMP)
	PJRT_DEVICE=CPU OMP_NUM_THREADS=1 $(XLA_VENV)/bin/python -m pytest -q -rs -m xla tests/test_xla.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_sweep.py

clean:
	rm -rf $(REPORT) .pytest_cache .mypy_cache .ruff_cache dist build
