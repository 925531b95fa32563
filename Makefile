# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment when it is missing and install the project into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
REPORT ?= inferlink-report

.PHONY: demo test lint bench clean

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

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_sweep.py

clean:
	rm -rf $(REPORT) .pytest_cache .mypy_cache .ruff_cache dist build
