#!/usr/bin/env bash
# The full GPU test tier, for a GPU machine with time to spare (15-25 minutes; the budgeted session,
# scripts/gpu_session.py, comes first). Every test marked `gpu`: Triton's first (the default backend),
# then CuPy's, Numba CUDA's and the rest. One line per test as it ends (-v, unbuffered), so a cut run
# shows how far it got; each test is limited to PER_TEST_TIMEOUT seconds (pytest-timeout, in the dev
# extra). Writes $OUT/gpu_tests.log and $OUT/junit-gpu.xml (OUT defaults to ./out). Exit status:
# pytest's, or 75 when no CUDA GPU is visible.
#   scripts/gpu_tests.sh                 # -m gpu
#   scripts/gpu_tests.sh --all           # the whole suite on the GPU (conftest then uses cuda)
#   scripts/gpu_tests.sh -k triton       # extra arguments go to pytest
# PY picks the interpreter (default python3); autonorm must be installed for it (docs/GPU_RUNBOOK.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
PY=${PY:-python3}
PER_TEST_TIMEOUT=${PER_TEST_TIMEOUT:-300}
mkdir -p "$OUT"
marker=(-m gpu)
if [ "${1:-}" = --all ]; then marker=(-m "not slow"); shift; fi
"$PY" -P -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'" \
  || { echo "gpu_tests: no CUDA GPU here: the gpu tier would skip every test" | tee "$OUT/gpu_tests.log"; exit 75; }
# Files named in this order run in this order (a folder argument would sort them by name).
first=(tests/test_triton.py tests/test_cupy_gpu.py tests/test_numba_cuda.py)
mapfile -t rest < <(ls tests/test_*.py | grep -v -x -F "${first[@]/#/-e}")
limit=()
if "$PY" -P -c "import pytest_timeout" 2>/dev/null; then
  limit=(--timeout "$PER_TEST_TIMEOUT")
else
  echo "gpu_tests: pytest-timeout is not installed (pip install pytest-timeout): no per-test limit" | tee "$OUT/gpu_tests.log"
fi
# -P keeps ./autonorm (the source layout) off sys.path: tests import the installed package.
# Compiled-kernel caches stay out of the tree and the home folder.
export AUTONORM_CACHE_DIR=${AUTONORM_CACHE_DIR:-/tmp/autonorm-cache}
export PYTHONUNBUFFERED=1
# -o addopts= drops pyproject's `-n auto`: the GPU machines may lack pytest-xdist, and kernel timings must not
# share the GPU with another worker anyway (the marker is given here instead).
"$PY" -P -m pytest -o addopts= -v -p no:cacheprovider -rfEs "${marker[@]}" "${limit[@]}" --junitxml "$OUT/junit-gpu.xml" \
  "${first[@]}" "${rest[@]}" "$@" 2>&1 | tee -a "$OUT/gpu_tests.log"
exit "${PIPESTATUS[0]}"
