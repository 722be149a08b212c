#!/usr/bin/env bash
# The GPU test tier: every test marked `gpu` (skipped on machines without CUDA), on a GPU machine.
# Writes $OUT/junit-gpu.xml and $OUT/gpu_tests.log (OUT defaults to ./out). Exit status: pytest's,
# or 75 when no CUDA GPU is visible.
#   scripts/gpu_tests.sh                 # -m gpu
#   scripts/gpu_tests.sh --all           # the whole suite on the GPU (conftest then uses cuda)
#   scripts/gpu_tests.sh -k triton       # extra arguments go to pytest
# PY picks the interpreter (default python3); autonorm must be installed for it
# (scripts/gpu_run.sh install does that on the device machine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
PY=${PY:-python3}
mkdir -p "$OUT"
marker=(-m gpu)
if [ "${1:-}" = --all ]; then marker=(); shift; fi
"$PY" -P -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'" \
  || { echo "gpu_tests: no CUDA GPU here: the gpu tier would skip every test" | tee "$OUT/gpu_tests.log"; exit 75; }
# -P keeps ./autonorm (the source layout) off sys.path: tests import the installed package.
# Compiled-kernel caches stay out of the tree and the home folder.
export AUTONORM_CACHE_DIR=${AUTONORM_CACHE_DIR:-/tmp/autonorm-cache}
export PYTHONUNBUFFERED=1
"$PY" -P -m pytest -q -p no:cacheprovider -rfEs "${marker[@]}" --junitxml "$OUT/junit-gpu.xml" tests "$@" 2>&1 \
  | tee "$OUT/gpu_tests.log"
exit "${PIPESTATUS[0]}"
