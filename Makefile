# phaul: `make demo` (set-up + a live migration in the lab), `make test`.
PY := .venv/bin/python
PYTEST_FLAGS ?= -q -rfE

.PHONY: setup demo test test-unit test-lab bench bench-quick clean lab-down

setup:
	@bash scripts/setup.sh

demo: setup
	@flock /run/lock/phaul-lab.lock $(PY) scripts/demo.py $(DEMO_ARGS)

test: setup
	@$(PY) -m pytest $(PYTEST_FLAGS) tests

test-unit: setup
	@$(PY) -m pytest $(PYTEST_FLAGS) -m "not lab" tests

test-lab: setup
	@$(PY) -m pytest $(PYTEST_FLAGS) -m lab tests

# Pre-copy vs stop-and-copy vs the local CRIU floor, in the lab (bench/run.py): every
# workload, 3 repetitions (about 10 minutes on 2 cores); bench-quick: one workload, once.
bench: setup
	@$(PY) bench/run.py $(BENCH_ARGS)

bench-quick: setup
	@$(PY) bench/run.py --quick $(BENCH_ARGS)

lab-down:
	@$(PY) -m phaul lab down

clean: lab-down
	rm -rf .venv workloads/bin phaul/rpc/phaul_pb2*.py phaul/rpc/phaul_pb2*.pyi
