# phaul: `make demo` (set-up + a live migration in the lab), `make test`.
PY := .venv/bin/python
PYTEST_FLAGS ?= -q -rfE

.PHONY: setup proto lint demo test test-unit test-lab test-faults bench bench-quick clean lab-down

setup:
	@bash scripts/setup.sh

demo: setup
	@flock /run/lock/phaul-lab.lock $(PY) scripts/demo.py $(DEMO_ARGS)

# The fault matrix (tests/test_faults.py, and the post-copy cases of tests/test_postcopy.py) runs in
# `make test` too; its table follows the results.
FAULT_RESULTS := .pytest_cache/fault-matrix.jsonl

# The agent protocol's Python code (committed; tests/test_packaging.py fails when it differs
# from what proto/phaul.proto compiles to): run after editing proto/phaul.proto.
proto: setup
	@$(PY) scripts/gen_proto.py

# mypy and ruff (configured in pyproject.toml) over the package; `make test` runs them first.
lint: setup
	@.venv/bin/mypy phaul
	@.venv/bin/ruff check phaul

test: setup lint
	@rm -f $(FAULT_RESULTS)
	@$(PY) -m pytest $(PYTEST_FLAGS) tests; rc=$$?; $(PY) scripts/fault_table.py $(FAULT_RESULTS) || true; exit $$rc

test-unit: setup
	@$(PY) -m pytest $(PYTEST_FLAGS) -m "not lab" tests

test-lab: setup
	@$(PY) -m pytest $(PYTEST_FLAGS) -m lab tests

# Every step boundary x every fault, in the lab, and post-copy's faults after the resume
# (tests/test_postcopy.py: the table's postcopy row; about 11 minutes on 2 cores), then the table.
FAULT_TESTS := tests/test_faults.py tests/test_postcopy.py -k "test_faults or killed or link_cut"
test-faults: setup
	@rm -f $(FAULT_RESULTS)
	@$(PY) -m pytest $(PYTEST_FLAGS) $(FAULT_TESTS); rc=$$?; $(PY) scripts/fault_table.py $(FAULT_RESULTS); exit $$rc

# Pre-copy vs stop-and-copy vs the local CRIU floor, in the lab (bench/run.py): every
# workload, 3 repetitions (about 10 minutes on 2 cores); bench-quick: one workload, once.
bench: setup
	@$(PY) bench/run.py $(BENCH_ARGS)

bench-quick: setup
	@$(PY) bench/run.py --quick $(BENCH_ARGS)

lab-down:
	@$(PY) -m phaul lab down

clean: lab-down
	rm -rf .venv workloads/bin build dist
