#!/usr/bin/env bash
# Build .whl/: the wheels a GPU machine without package access needs for the GPU session
# (scripts/gpu_session.py; docs/GPU_RUNBOOK.md shows how they travel and install). Run on a
# machine with PyPI access, from the repo root. Wheels for CPython 3.12 on x86-64 Linux.
# The GPU machines this was written for have torch, triton, cupy-cuda13x, numba, numba-cuda,
# jinja2, matplotlib, tqdm and pytest; what the session needs besides travels here:
#   scripts/build_wheelhouse.sh                 # optuna (tune phase), jsonschema (databases), liger-kernel (bench)
#   WITH_QUACK=1 scripts/build_wheelhouse.sh    # + quack-kernels, only if it stays small enough to carry
set -euo pipefail
DEST=${DEST:-.whl}
mkdir -p "$DEST"
# A wheelhouse inside the repo must stay out of git (it travels as an untracked folder, not as tracked files).
case $DEST in /*) ;; *) mkdir -p .git/info
  grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude ;; esac
fetch() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$DEST" "$@"
}
# optuna and what it imports (numpy and packaging are on the GPU machines already).
fetch optuna alembic sqlalchemy greenlet mako colorlog tqdm pyyaml typing-extensions
# the database schema validator
fetch jsonschema jsonschema-specifications referencing rpds-py attrs
# Liger, the anchor the bench compares against (pure Python + Triton)
fetch liger-kernel
if [ "${WITH_QUACK:-0}" = 1 ]; then
  rm -f "$DEST"/quack_kernels-*.whl "$DEST"/nvidia_cutlass_dsl*.whl
  # quack needs nvidia-cutlass-dsl, which is large: keep it only if the total stays small.
  tmp=$(mktemp -d); DEST=$tmp fetch quack-kernels nvidia-cutlass-dsl nvidia-cutlass-dsl-libs-base nvidia-cutlass-dsl-libs-cu12 \
    apache-tvm-ffi torch-c-dlpack-ext einops || true
  if [ "$(du -sm "$tmp" | cut -f1)" -le 40 ]; then mv "$tmp"/*.whl "$DEST"/; else
    echo "quack-kernels + nvidia-cutlass-dsl are $(du -sm "$tmp" | cut -f1) MiB: too large to carry, skipped" >&2; fi
  rm -rf "$tmp"
fi
du -sh "$DEST"; ls "$DEST"
