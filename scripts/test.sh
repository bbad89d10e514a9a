#!/usr/bin/env bash
# Install fairdeploy with its test dependencies into .venv and run the test suite.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
# One torch/OpenMP thread in every process the tests start (the pytest process itself: tests/conftest.py). The
# models are tiny: on a small machine more threads only contend with each other and with the other processes.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# Two pytest workers (pytest-xdist), each taking whole test files (their module fixtures are made once): on a
# 2-core machine the suite ran in 3 m 40 s against 7 m 58 s serial under load (benchmarks/RESULTS.md §10); four
# workers were slower.
python -m pytest -q -n auto --maxprocesses 2 --dist loadfile "$@"
