#!/usr/bin/env bash
# The whole GPU workflow of issue 7 in resumable steps of at most ~9 minutes each, one device-tool
# `run` call per invocation (docs/GPU_RUNBOOK.md has the exact calls). Run from the repo root.
#
#   scripts/gpu_run.sh STEP [STEP...]     device steps, run in order until the step deadline:
#     install    pip-install the carried wheels (.whl/) and autonorm itself into /tmp/site
#     test       the GPU test tier (scripts/gpu_tests.sh): junit + log into $OUT
#     bandwidth  the copy-bandwidth probe every report divides by
#     tune       `autonorm tune` over the grid, one batch at a time (autonorm/grids.py), resumable
#     bench      `autonorm bench --grid` against torch, torch.compile, Liger, quack, resumable
#     report     markdown + PNG plots of this device's bench rows, as $OUT/report.tar.gz
#     all        every step above, each skipped when done; call again until it says "all done"
#   scripts/gpu_run.sh pull FILES_AT      here, after a call: keep the returned state (and logs)
#   scripts/gpu_run.sh export             here: tuning_db/<slug>.json and docs/benchmarks/ from the state
#   scripts/gpu_run.sh status             here: what the state holds
#
# Files back from a call: gpu_run.log, state.tar.gz, and per step junit-gpu.xml + gpu_tests.log
# (test) or report.tar.gz (report): at most 5, under the tool's limit of 8.
# State that must outlive a call (done markers, Optuna journal, tuning DB, bench rows, bandwidth)
# travels as ONE file, state.tar.gz: written to $OUT at the end of every call and, with `pull`,
# into .gpu_state/ here, which the next call names in `carry`. (The device tool returns at most 8
# files from $OUT and empties it before each call; the machine itself starts bare each time.)
#
# Environment: OUT (device: set by the tool), GRID (standard|quick, default standard),
# STEP_SECONDS (deadline from the start of the call, default 540), SLUG (default: the device's),
# PY (default python3), AUTONORM_GPU_RUN_INSTALL=0 (use PY's environment as it is: CPU tests),
# DRY_RUN=1 (tune: print the batches' commands, run nothing), TUNE_TRIALS, TUNE_STUDY_SECONDS,
# GPU_TEST_ARGS (test: e.g. --all or -k triton), FORCE=1 (redo finished steps), EXPORT_DIR / EXPORT_DB_DIR (export: docs/benchmarks, tuning_db).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE_DIR=${STATE_DIR:-$ROOT/.gpu_state}
GRID=${GRID:-standard}
STEP_SECONDS=${STEP_SECONDS:-540}
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
WHEELS=${WHEELS:-.whl}
START=$(date +%s)
DEADLINE=$((START + STEP_SECONDS))

log() { echo "[gpu_run $(date -u +%H:%M:%S)] $*" >&2; }
left() { echo $((DEADLINE - $(date +%s))); }
# -P: never import ./autonorm from the source tree (its subpackages live in backends/, templates/,
# tuning_db/ and exist only in the installed layout).
an() { "$PY" -P -m autonorm.cli "$@"; }

exclude_state() {
  [ -d .git ] || return 0
  mkdir -p .git/info
  grep -qxF "/.gpu_state/" .git/info/exclude 2>/dev/null || echo "/.gpu_state/" >> .git/info/exclude
}

# --- state ------------------------------------------------------------------------------
unpack_state() {
  # A fresh folder each call: the tarball is the whole truth (a folder given as WORK is used as is).
  if [ -z "${WORK:-}" ]; then WORK=$(mktemp -d /tmp/autonorm-gpu-work.XXXXXX); WORK_OWNED=1; fi
  mkdir -p "$WORK"
  if [ -f "$STATE_DIR/state.tar.gz" ]; then
    tar xzf "$STATE_DIR/state.tar.gz" -C "$WORK" || { log "state.tar.gz is unreadable"; exit 2; }
  fi
  mkdir -p "$WORK/done" "$WORK/bench" "$WORK/tuning_db"
}

pack_state() {
  [ -n "${WORK:-}" ] || return 0
  mkdir -p "$STATE_DIR" "$OUT"
  rm -f "$WORK"/tuning_db/.autonorm-journal/*.lock "$WORK"/tuning_db/.*.tmp "$WORK"/bench/*.tmp 2>/dev/null
  tar czf "$STATE_DIR/state.tar.gz.new" -C "$WORK" . && mv "$STATE_DIR/state.tar.gz.new" "$STATE_DIR/state.tar.gz"
  cp "$STATE_DIR/state.tar.gz" "$OUT/state.tar.gz"
  log "state saved: $OUT/state.tar.gz ($(du -h "$OUT/state.tar.gz" | cut -f1))"
}

done_mark() { mkdir -p "$(dirname "$WORK/done/$SLUG/$1")"; date -u +%FT%TZ > "$WORK/done/$SLUG/$1"; }
is_done() { [ "${FORCE:-0}" != 1 ] && [ -f "$WORK/done/$SLUG/$1" ]; }

# --- steps ------------------------------------------------------------------------------
ensure_install() {
  [ "${AUTONORM_GPU_RUN_INSTALL:-1}" = 0 ] && return 0
  local stamp
  stamp=$(cat pyproject.toml $(find autonorm backends templates tuning_db -type f -not -name '*.pyc' | sort) \
          | sha256sum | cut -c1-16)
  if [ -f "$SITE/.autonorm-$stamp" ]; then export PYTHONPATH=$SITE; return 0; fi
  log "install: wheels from $WHEELS/ and autonorm ($stamp) into $SITE"
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
      || { log "install: the wheels did not install"; return 1; }
  else
    log "install: no wheels in $WHEELS/: optuna, jsonschema, liger, quack must already be there"
  fi
  # The machines have setuptools and wheel but no package index: build in this environment.
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$SITE" . || { log "install: autonorm did not install"; return 1; }
  touch "$SITE/.autonorm-$stamp"
  export PYTHONPATH=$SITE
}

step_install() { ensure_install && an --version && "$PY" -P -W ignore -c "
import importlib
for m in ('torch', 'triton', 'cupy', 'numba', 'optuna', 'jsonschema', 'liger_kernel', 'quack'):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, '__version__', '?'))
    except Exception as e:
        print(m, 'MISSING:', type(e).__name__, str(e).splitlines()[0] if str(e) else '')
import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')
"; }

step_test() {
  if is_done test; then log "test: done before (FORCE=1 to redo)"; return 0; fi
  local t=$(( $(left) - 30 ))
  [ "$t" -gt 60 ] || { log "test: too little time left in this call"; return 3; }
  OUT=$OUT PY=$PY timeout "$t" scripts/gpu_tests.sh ${GPU_TEST_ARGS:-}
  local rc=$?
  if [ $rc = 75 ]; then log "test: no CUDA GPU visible"; return 1; fi
  # The tier is not resumable: a run cut at the deadline is recorded as such (gpu_tests.log has how far
  # it got) rather than started again forever; FORCE=1 with a narrower selection redoes it.
  [ $rc = 124 ] && log "test: cut at the step deadline after ${t}s (see \$OUT/gpu_tests.log)"
  done_mark test
  cp "$OUT/junit-gpu.xml" "$WORK/done/$SLUG/junit-gpu.xml" 2>/dev/null
  log "test: pytest exit status $rc (junit in \$OUT/junit-gpu.xml)"
  return 0  # failures are results: the workflow goes on, the junit file says what failed
}

bandwidth_file() { echo "$WORK/bandwidth-$SLUG.json"; }

step_bandwidth() {
  if is_done bandwidth && [ -f "$(bandwidth_file)" ]; then log "bandwidth: $(copy_bw) GB/s, measured before"; return 0; fi
  "$PY" -P -c "
import json, sys, torch
from autonorm import measure
from autonorm.device import identity
dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
# Three probes; the median is what every report divides by.
bws = sorted(measure.copy_bandwidth(dev) for _ in range(3))
json.dump({'device': identity(dev), 'copy_gbps': bws[1], 'probes': bws}, open(sys.argv[1], 'w'), indent=1)
print('copy bandwidth', round(bws[1], 1), 'GB/s', [round(b, 1) for b in bws])
" "$(bandwidth_file)" || return 1
  done_mark bandwidth
}

copy_bw() { [ -f "$(bandwidth_file)" ] && "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['copy_gbps'])" "$(bandwidth_file)"; }

step_tune() {
  if is_done "tune-$GRID"; then log "tune: grid $GRID done before"; return 0; fi
  local batches total=0 finished=0 rc=0 skip=()
  # Studies the database already holds are left out of their batch: a cut batch resumes where it
  # stopped instead of giving its finished studies more time.
  [ -f "$WORK/tuning_db/$SLUG.json" ] && skip=(--skip-recorded "$WORK/tuning_db/$SLUG.json")
  batches=$("$PY" -P -m autonorm.grids tune-batches --grid "$GRID" "${skip[@]}") || return 1
  while IFS= read -r b; do
    [ -n "$b" ] || continue
    total=$((total + 1))
    local id ops dirs dts hid rows studies
    IFS='|' read -r id ops dirs dts hid rows studies < <("$PY" -c "
import json, sys; b = json.loads(sys.argv[1])
print('|'.join(str(b[k]) for k in ('id', 'ops', 'directions', 'dtypes', 'hidden', 'rows', 'studies')))" "$b")
    if is_done "tune/$GRID/$id"; then finished=$((finished + 1)); continue; fi
    if [ "$studies" = 0 ]; then
      [ "${DRY_RUN:-0}" = 1 ] || done_mark "tune/$GRID/$id"; finished=$((finished + 1)); continue; fi
    local t=$(( $(left) - 45 ))
    if [ "${DRY_RUN:-0}" != 1 ] && [ "$t" -lt 60 ]; then rc=3; continue; fi
    # Per-study search budget: two thirds of the batch's share of what is left (compiling, verifying and
    # re-timing the finalists come on top), within [5, TUNE_STUDY_SECONDS] s. A batch cut by `timeout`
    # resumes next call: recorded studies drop out, the journal keeps every finished trial of the rest.
    local per=$(( 2 * t / (3 * studies) )); [ "$per" -gt "${TUNE_STUDY_SECONDS:-30}" ] && per=${TUNE_STUDY_SECONDS:-30}
    [ "$per" -lt 5 ] && per=5
    local cmd=(tune --ops "$ops" --directions "$dirs" --dtypes "$dts" --hidden "$hid" --rows "$rows"
               --trials "${TUNE_TRIALS:-40}" --time-budget "$per" --out "$WORK/tuning_db" --no-progress
               --no-compile-baseline ${TUNE_ARGS:-})
    if [ "${DRY_RUN:-0}" = 1 ]; then echo "autonorm ${cmd[*]}"; continue; fi
    log "tune: batch $id ($studies studies, ${per}s per study, ${t}s left)"
    timeout "$t" "$PY" -P -m autonorm.cli "${cmd[@]}"
    local brc=$?
    if [ $brc = 124 ]; then log "tune: batch $id cut at the step deadline (resumes next call)"; rc=3; continue; fi
    # 1 = some study found no valid candidate: recorded in the log, not retried forever.
    if [ $brc -le 1 ]; then done_mark "tune/$GRID/$id"; finished=$((finished + 1)); else
      log "tune: batch $id failed (exit $brc)"; rc=1; fi
  done <<< "$batches"
  [ "${DRY_RUN:-0}" = 1 ] && return 0
  log "tune: $finished/$total batches of grid $GRID done"
  if [ "$finished" = "$total" ]; then done_mark "tune-$GRID"; return 0; fi
  return $rc
}

step_bench() {
  if is_done "bench-$GRID"; then log "bench: grid $GRID done before"; return 0; fi
  local t=$(( $(left) - 45 )) bw
  [ "$t" -gt 90 ] || { log "bench: too little time left in this call"; return 3; }
  bw=$(copy_bw) || { step_bandwidth && bw=$(copy_bw); } || return 1
  # The dispatcher reads this run's tuning database; --time-limit stops starting cases in time for
  # the slowest case (torch.compile of forward and backward) to finish before `timeout`.
  AUTONORM_DB_PATH="$WORK/tuning_db" timeout "$t" "$PY" -P -m autonorm.cli bench --device "${BENCH_DEVICE:-cuda}" \
    --grid "$GRID" --json "$WORK/bench/$SLUG.json" --resume --time-limit $((t - 90)) --copy-bw "$bw" ${BENCH_ARGS:-}
  local rc=$?
  case $rc in
    0) done_mark "bench-$GRID"; log "bench: grid $GRID done" ;;
    3|124) log "bench: cases left (resumes next call)"; return 3 ;;
    *) log "bench: failed (exit $rc)"; return 1 ;;
  esac
}

step_report() {
  # One file back (report.tar.gz): the markdown and up to 4 PNGs would crowd the tool's 8-file limit.
  # `scripts/gpu_run.sh export` makes the same report here from the state, at no device time.
  local db=() tmp; tmp=$(mktemp -d); local dir="$tmp/$SLUG"
  [ -f "$WORK/bench/$SLUG.json" ] || { log "report: no bench rows for $SLUG in the state yet"; return 1; }
  [ -f "$WORK/tuning_db/$SLUG.json" ] && db=(--db "$WORK/tuning_db/$SLUG.json")
  an bench --report "$dir" --input "$WORK/bench/$SLUG.json" "${db[@]}" || return 1
  tar czf "$OUT/report.tar.gz" -C "$tmp" "$SLUG" && rm -rf "$tmp"
  done_mark report
}

# --- local steps (this machine) -----------------------------------------------------------
step_pull() {
  local from=${1:?usage: scripts/gpu_run.sh pull FILES_AT (the files_at folder of the device tool)}
  exclude_state
  mkdir -p "$STATE_DIR/logs"
  [ -f "$from/state.tar.gz" ] || { log "pull: no state.tar.gz in $from"; return 1; }
  cp "$from/state.tar.gz" "$STATE_DIR/state.tar.gz"
  find "$from" -maxdepth 2 -type f \( -name '*.log' -o -name '*.xml' \) -exec cp {} "$STATE_DIR/logs/" \;
  if [ -f "$from/report.tar.gz" ]; then mkdir -p "$STATE_DIR/report" && tar xzf "$from/report.tar.gz" -C "$STATE_DIR/report"; fi
  log "pull: state from $from kept in $STATE_DIR/state.tar.gz"
}

step_export() {
  local n=0
  for db in "$WORK"/tuning_db/*.json; do
    [ -f "$db" ] || continue
    an db validate "$db" || return 1
    mkdir -p "${EXPORT_DB_DIR:-tuning_db}"
    cp "$db" "${EXPORT_DB_DIR:-tuning_db}/" && n=$((n + 1)) && log "export: ${EXPORT_DB_DIR:-tuning_db}/$(basename "$db")"
  done
  local inputs=("$WORK"/bench/*.json)
  if [ -f "${inputs[0]}" ]; then
    local args=()
    for b in "${inputs[@]}"; do
      local s; s=$(basename "$b" .json)
      [ -f "$WORK/tuning_db/$s.json" ] && args=(--db "$WORK/tuning_db/$s.json")
      an bench --report "${EXPORT_DIR:-docs/benchmarks}" --input "$b" "${args[@]}" || return 1
      args=()
    done
  fi
  log "export: $n database(s); commit tuning_db/*.json and docs/benchmarks/<slug>.md + PNGs"
}

step_status() {
  echo "state: $STATE_DIR/state.tar.gz"
  echo "done (device/step):"; find "$WORK/done" -type f | sed "s|$WORK/done/|  |" | sort
  echo "files:"; (cd "$WORK" && find . -type f -not -path './done/*' -exec du -h {} + | sort -k2)
}

# --- main -------------------------------------------------------------------------------
[ $# -ge 1 ] || { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }
case $1 in
  pull) step_pull "${2:-}"; exit $? ;;
  export|status)
    [ "${AUTONORM_GPU_RUN_INSTALL:-1}" = 0 ] || AUTONORM_GPU_RUN_INSTALL=0  # here: the venv as it is
    unpack_state; "step_$1"; rc=$?; [ "${WORK_OWNED:-0}" = 1 ] && rm -rf "$WORK"; exit $rc ;;
esac
OUT=${OUT:?set OUT (the device tool sets it; locally: OUT=/tmp/gpu-out)}
mkdir -p "$OUT"
steps=("$@")
[ "$1" = all ] && steps=(install test bandwidth tune bench report)
for s in "${steps[@]}"; do
  case $s in install|test|bandwidth|tune|bench|report) ;; *)
    echo "gpu_run: unknown step '$s'; steps: install test bandwidth tune bench report all pull export status" >&2
    exit 2 ;;
  esac
done
exec > >(tee -a "$OUT/gpu_run.log") 2>&1
unpack_state
trap 'pack_state; [ "${WORK_OWNED:-0}" = 1 ] && rm -rf "$WORK"' EXIT
ensure_install || exit 1
SLUG=${SLUG:-$("$PY" -P -c "
import torch
from autonorm.device import identity
print(identity('cuda' if torch.cuda.is_available() else 'cpu')['slug'])")}
log "device $SLUG, grid $GRID, steps: ${steps[*]}, $(left)s to the step deadline"
status=0
for s in "${steps[@]}"; do
  "step_$s"; rc=$?
  if [ $rc = 3 ]; then log "$s: not finished in this call: run the same call again"; status=3; break; fi
  if [ $rc != 0 ]; then log "$s: FAILED (exit $rc)"; status=1; break; fi
  log "$s: ok"
done
[ $status = 0 ] && [ "$1" = all ] && log "all done for $SLUG (grid $GRID)"
exit $status
