#!/usr/bin/env bash
# Time the two test tiers as a fresh checkout runs them: a clean clone of this repository's HEAD (committed
# work only), a cold compile cache, README's command for the default tier and .ci/run's for the slow one
# (after it, on the cache the default tier left, as in CI). Prints each tier's wall time, its CPU time
# (user + sys, the test processes and every child) and the load average before and after: on a shared
# machine the load says how far a wall time is from an idle machine's.
#   scripts/time_tests.sh              # both tiers
#   scripts/time_tests.sh default      # one tier: default or slow
# PY: an interpreter with the test dependencies (`pip install -e ".[all,dev]"`; default python3).
# CLONE: where the clone goes (default /tmp/autonorm-time-tests, replaced); each tier's log is $CLONE/<tier>.log.
# The clone gets a venv of its own, $CLONE/.venv, holding links to PY's packages and the clone installed
# editable: PY's editable install of another checkout would lend the clone its backends/ and templates/, and
# CUDA's library finder (NVRTC, NVVM) looks in the venv's own site-packages only.
# The PostgreSQL fleet test runs only where AUTONORM_TEST_POSTGRES_URL names a server.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
CLONE=${CLONE:-/tmp/autonorm-time-tests}
tiers=("$@")
[ ${#tiers[@]} -gt 0 ] || tiers=(default slow)
for tier in "${tiers[@]}"; do
  case $tier in default | slow) ;; *) echo "time_tests: unknown tier '$tier' (default or slow)" >&2; exit 2 ;; esac
done

rm -rf "$CLONE"
git clone -q "$REPO" "$CLONE"
cd "$CLONE"
"$PY" -m venv --without-pip .venv
purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'
deps=$("$PY" -c "$purelib")
site_dir=$(.venv/bin/python -c "$purelib")
for entry in "$deps"/*; do
  case ${entry##*/} in *autonorm*) continue ;; esac  # its editable install: the clone's comes next
  ln -s "$entry" "$site_dir/"
done
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . >install.log 2>&1 \
  || { cat install.log >&2; exit 1; }
# PY's command-line tools (ruff for the lint test), after the install so the clone's own `autonorm` stays.
tools=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["scripts"])')
for tool in "$tools"/*; do [ -e ".venv/bin/${tool##*/}" ] || ln -s "$tool" .venv/bin/; done
# As in .ci/run: the compile cache starts empty, inside the clone's venv.
export PATH=$CLONE/.venv/bin:$PATH AUTONORM_CACHE_DIR=$CLONE/.venv/autonorm-cache
PY=$CLONE/.venv/bin/python
echo "$(git log -1 --format='%h %cd' --date=iso-strict) on $(nproc) CPUs, $(date -u '+%Y-%m-%d %H:%M UTC')"

status=0
for tier in "${tiers[@]}"; do
  marker=()
  [ "$tier" = slow ] && marker=(-m slow)
  before=$(cut -d' ' -f1-3 /proc/loadavg)
  TIMEFORMAT="wall %0R s, CPU %0U s user + %0S s sys"
  rc=0
  { time "$PY" -m pytest -q -p no:cacheprovider tests "${marker[@]}" >"$tier.log" 2>&1 || rc=$?; } 2>"$tier.time"
  echo "$tier tier: $(cat "$tier.time"); load average before $before, after $(cut -d' ' -f1-3 /proc/loadavg)"
  summary=$(grep -E ' in [0-9.]+s( \([0-9:]+\))?( =+)?$' "$tier.log" | tail -n 1 | tr -d '=' | xargs)
  echo "  pytest: ${summary:-no summary line} (exit $rc; log $CLONE/$tier.log)"
  [ "$rc" = 0 ] || status=$rc
done
exit "$status"
