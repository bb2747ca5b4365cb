# bigopt: the two everyday commands are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-cuda bench-quick lock horovod clean help

help:
	@echo "make setup        create/refresh .venv (torch, locked deps, horovod) - idempotent"
	@echo "make demo         set up if needed, then run the demo pipeline end to end"
	@echo "make test         set up if needed, then run the test suite"
	@echo "make test-cuda    on a GPU machine: the CUDA-path tests (docs/gpu.md)"
	@echo "make bench-quick  every benchmark in --quick mode"
	@echo "make lock         re-resolve requirements.lock with uv"
	@echo "make clean        DELETE the local lake, data, mlruns and mlflow.db in this folder (no prompt)"

setup:
	@scripts/setup_env.sh

horovod:
	@scripts/build_horovod.sh $(PY)

demo: setup
	$(VENV)/bin/bigopt run conf/demo.yaml

# two workers, each with its own SparkSession, a test file at a time (module fixtures stay whole):
# on 2 cores the suite keeps both busy (~70 % on one worker). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-cuda: setup
	$(PY) -m pytest -q -rs tests/cuda $(PYTEST_ARGS)

bench-quick: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

lock:
	$(VENV)/bin/uv pip compile requirements.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --find-links /opt/wheels -c <(echo 'torch==2.13.0+cpu') --no-emit-package torch -o requirements.lock

clean:
	rm -rf lake data mlruns mlflow.db artifacts spark-warehouse .pytest_cache
