#!/usr/bin/env bash
# Set up, then run the whole test suite (two workers, one thread each).
# Extra arguments go to pytest, e.g. -k resume
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh test
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -n 2 -q tests "$@"
