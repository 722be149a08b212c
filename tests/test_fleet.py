"""Fleet tuning (storage, claim lock, heartbeats, export), database staleness and the CPU device slug.

The PostgreSQL test runs several `StudyRunner` workers that share one study per spec. It needs
AUTONORM_TEST_POSTGRES_URL (a server where the user may create databases; .ci/run starts a
throwaway one on localhost). Each test creates its own database and drops it at the end.

The grid is tiny on purpose: two numba-cpu specs, each searched exhaustively over a 12-config
corner of the numba-cpu space plus torch eager. The workers are subprocesses running this file
(`python tests/test_fleet.py URL HOST [SLOW_S]`), so a worker can be killed like a real one.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

URL = os.environ.get("AUTONORM_TEST_POSTGRES_URL")
HEARTBEAT_S = 1  # the stale-trial grace period is 3 beats
SPECS = [("rmsnorm", 256), ("layernorm", 256)]
ROWS = 64
# Serial forwards (threads=1) are valid only at one rows_per_task (256), so the tiny space includes it.
TINY_SPACE = {"rows_per_task": (1, 16, 256), "vector_width": (1, 4), "threads": (0, 1), "fastmath": (True,)}


def _tiny(configs):
    """The tiny space: the backend's valid configs whose every parameter is one of TINY_SPACE's values."""
    return [c for c in configs if all(getattr(c, k) in values for k, values in TINY_SPACE.items())]


# --- the worker (run as a subprocess) --------------------------------------------------------------
def _worker(url: str, host: str, slow_s: float) -> None:
    import socket

    socket.gethostname = lambda: host  # another machine, as far as the tuner can tell
    from autonorm import measure, tune
    from autonorm.backends.numba_cpu import NumbaCpuBackend
    from autonorm.backends.torch_eager import TorchBackend
    from autonorm.device import identity, software_versions
    from autonorm.spec import NormSpec

    class TinyNumbaCpu(NumbaCpuBackend):
        def space(self, spec):
            return _tiny(super().space(spec))

    class Timer(measure.CpuTimer):
        def start(self, spec, kernel, rows):  # where the tuner's race begins timing a candidate
            time.sleep(slow_s)  # a worker that is still timing when it is killed
            return super().start(spec, kernel, rows)

    timer = Timer(warmup_s=0.005, rep_s=0.02, min_reps=5, max_reps=50, max_sets=2)
    backends = {"numba-cpu": TinyNumbaCpu(), "torch": TorchBackend()}
    storage = tune.make_storage(url, Path("unused"), heartbeat_s=HEARTBEAT_S)
    ident = identity("cpu")
    attrs = {"device": {k: ident[k] for k in ("name", "slug", "kind", "compute_capability", "sm_count", "l2_bytes")}
             | {"copy_gbps": 1.0}, "versions": software_versions(), "protocol": timer.describe()}
    for op, hidden in SPECS:
        spec = NormSpec(op, "fwd", "float32", "float32", hidden)
        runner = tune.StudyRunner(spec, ROWS, backends, timer,
                                   tune.StudyOptions(trials=100, compile_workers=1, compile_baseline=False),
                                   storage=storage, name=f"fleet/{op}", study_attrs=attrs)
        result = runner.run()
        print(json.dumps({"study": runner.name, "record": result.record is not None,
                          "finalized_by": result.finalized_by}), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
    sys.exit(0)


# --- the tests ---------------------------------------------------------------------------------
needs_postgres = pytest.mark.skipif(not URL, reason="AUTONORM_TEST_POSTGRES_URL is not set (.ci/run sets it)")


def test_postgresql_url_uses_psycopg3():
    pytest.importorskip("psycopg")
    from autonorm.tune.fleet import _driver_url

    assert _driver_url("postgresql://u@localhost:5432/db") == "postgresql+psycopg://u@localhost:5432/db"
    assert _driver_url("sqlite:///x.db") == "sqlite:///x.db"


def test_sqlite_storage_claim_lock_and_heartbeat(tmp_path):
    from filelock import FileLock, Timeout

    from autonorm.tune.fleet import Heartbeats, claim_lock, heartbeat_enabled, open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 'fleet.db'}", tmp_path / "unused", heartbeat_s=1)
    assert heartbeat_enabled(storage) and storage.get_heartbeat_interval() == 1
    with claim_lock(storage, "study-a"):  # a lock file beside the SQLite file: others wait
        with pytest.raises(Timeout):
            FileLock(str(tmp_path / "fleet.db.autonorm-lock"), timeout=0.1).acquire()
    import optuna

    study = optuna.create_study(storage=storage, study_name="s")
    beaten, silent = storage.create_new_trial(study._study_id), storage.create_new_trial(study._study_id)
    with Heartbeats(storage) as beats:
        beats.add(beaten)  # beats at once: a trial without any beat is never found stale
        time.sleep(1.5)
        assert storage._get_stale_trial_ids(study._study_id) == []
    time.sleep(3.5)  # the worker "died": no beat for longer than the grace period (3 beats)
    assert storage._get_stale_trial_ids(study._study_id) == [beaten]
    assert silent != beaten


def test_db_file_lock_is_exclusive(tmp_path):
    from filelock import FileLock, Timeout

    from autonorm.db_folder import file_lock

    with file_lock(tmp_path / "x.lock"):
        with pytest.raises(Timeout):
            FileLock(str(tmp_path / "x.lock"), timeout=0.1).acquire()


def test_cpu_slug_names_the_isa_level_and_old_databases_still_load(tmp_path):
    from autonorm import db_sources
    from autonorm.device import identity, isa_level, slug_aliases

    v2 = {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}
    v3 = v2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
    v4 = v3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    assert [isa_level(f, "x86_64") for f in (set(), v2, v3, v4 - {"avx512vl"}, v4)] == \
        ["x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v3", "x86-64-v4"]
    assert isa_level(v4, "aarch64") == "aarch64"
    ident = identity("cpu")
    assert ident["slug"].startswith(ident["legacy_slug"] + "-") and ident["slug"] != ident["legacy_slug"]
    assert slug_aliases(ident["slug"]) == (ident["slug"], ident["legacy_slug"])
    # A database written before the ISA level was in the slug is still this CPU's.
    path = _write_db(tmp_path / "old.json", ident["legacy_slug"], {})
    autonorm_load(path)
    table = db_sources.table(ident["slug"])
    assert table is not None and len(table.records) == 1


def _write_db(path, slug, versions):
    from autonorm.backends import get_backend
    from autonorm.db import Entry, Record, RecordKey, TuningDB
    from autonorm.spec import NormSpec

    backend = get_backend("numba-cpu")
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 256)
    timing = {"median_us": 2.0, "p20_us": 1.9, "p80_us": 2.1}
    rec = Record(RecordKey.of(spec, 64), Entry("numba-cpu", backend.heuristic(spec), 1.0, 0.9, 1.1, 10.0, None),
                 [], {"torch_eager": timing, "torch_compile": None}, backend.template_hash(), 12, 0,
                 "2026-01-01T00:00:00+00:00")
    db = TuningDB({"name": "cpu", "slug": slug, "kind": "cpu", "compute_capability": None, "sm_count": 2,
                   "l2_bytes": 0, "copy_gbps": 1.0}, {"autonorm": "0.1.0", "torch": "2.13.0", **versions}, {})
    db.upsert(rec)
    db.save(path)
    return path


def autonorm_load(path):
    import autonorm

    autonorm.load_db(path)


@pytest.fixture
def _clean_databases():
    import autonorm
    from autonorm import db_sources

    yield
    db_sources.forget(user_paths=True)
    autonorm.reset()


def test_record_tuned_under_another_compiler_is_used_warned_once_and_marked(tmp_path, _clean_databases):
    pytest.importorskip("numba")
    import io

    from autonorm import db_sources
    from autonorm.cli import db as db_cli
    from autonorm.db import TuningDB
    from autonorm.device import identity

    slug = identity("cpu")["slug"]
    path = _write_db(tmp_path / "old-numba.json", slug, {"numba": "0.1.0"})
    autonorm_load(path)
    with pytest.warns(RuntimeWarning, match=r"another compiler \(1 x numba 0.1 -> "):
        table = db_sources.table(slug)
    assert len(table.records) == 1  # still used
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        db_sources.table(slug)  # once per database
    out = io.StringIO()
    db_cli.show(TuningDB.load(path), out)
    assert "[STALE: tuned under another compiler, numba 0.1 -> " in out.getvalue()
    current = _write_db(tmp_path / "now.json", "other-slug", {"numba": __import__("numba").__version__})
    out = io.StringIO()
    db_cli.show(TuningDB.load(current), out)
    assert "STALE" not in out.getvalue()


@pytest.fixture
def database():
    """A fresh PostgreSQL database (URL), dropped afterwards."""
    import psycopg

    name = f"autonorm_fleet_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield URL.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def _start(url: str, host: str, slow_s: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, url, host, str(slow_s)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])


def _wait(procs, timeout=240):
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
    return outs


def _trials(url: str) -> dict[str, list]:
    import optuna

    from autonorm.tune.fleet import open_storage

    storage = open_storage(url, Path("unused"))
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False)
            for s in optuna.get_all_study_summaries(storage)}


def _export(url: str, out: Path):
    from autonorm.db import TuningDB

    proc = subprocess.run([sys.executable, "-m", "autonorm", "db", "export", "--storage", url, "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("*.json")
    return TuningDB.load(path)  # validated against the schema and every config's domain


def _victim_running(url: str) -> bool:
    from optuna.trial import TrialState

    try:
        return any(t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").startswith("victim:")
                   and "candidate" in t.user_attrs for trials in _trials(url).values() for t in trials)
    except Exception:  # the schema is not there yet
        return False


@needs_postgres
def test_workers_starting_together_all_open_a_fresh_database(database, tmp_path):
    """Optuna's schema creation races (a bare RDBStorage lost 2 of 3 in one try here); every opener survives."""
    code = ("import sys, time; from pathlib import Path; import optuna, psycopg, sqlalchemy\n"
            "from autonorm.tune.fleet import open_storage\n"
            "Path(sys.argv[2] + '.ready' + sys.argv[3]).touch()\n"
            "while not Path(sys.argv[2] + '.go').exists(): time.sleep(0.001)\n"  # all at once, imports done
            "open_storage(sys.argv[1], Path('unused'))")
    barrier = str(tmp_path / "barrier")
    procs = [subprocess.Popen([sys.executable, "-c", code, database, barrier, str(i)], stderr=subprocess.PIPE,
                              text=True) for i in range(4)]
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("barrier.ready*"))) < len(procs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker failed to start"
        time.sleep(0.05)
    Path(barrier + ".go").touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]


@needs_postgres
@pytest.mark.slow
def test_fleet_on_postgresql(database, tmp_path):
    from optuna.trial import TrialState

    started = time.monotonic()
    # Three workers start together on an empty database (Optuna's schema race), and a fourth, slow one
    # is killed while it times a candidate, then restarted as another host.
    workers = [_start(database, f"host{i}") for i in range(3)]
    victim = _start(database, "victim", slow_s=60.0)  # killed while it times (sleeps in) its first candidate
    deadline = time.monotonic() + 120
    while not _victim_running(database):
        assert time.monotonic() < deadline and victim.poll() is None, "the victim never claimed a trial"
        time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    restarted = _start(database, "victim-restarted")
    outs = _wait(workers + [restarted])
    fleet_s = time.monotonic() - started

    from autonorm.backends.numba_cpu import NumbaCpuBackend
    from autonorm.spec import NormSpec

    # Counted by the backend's own validity rules on this machine's thread pool, as the workers count it.
    tiny = {f"fleet/{op}": _tiny(NumbaCpuBackend().space(NormSpec(op, "fwd", "float32", "float32", hidden)))
            for op, hidden in SPECS}
    assert all({c.threads for c in configs} == {0, 1} for configs in tiny.values())  # parallel and serial kernels
    trials = _trials(database)
    assert sorted(trials) == [f"fleet/{op}" for op, _ in sorted(SPECS)]
    figures, killed = {}, []
    for name, ts in trials.items():
        states = Counter(t.state for t in ts)
        timed = Counter(t.user_attrs["candidate"] for t in ts if t.state == TrialState.COMPLETE)
        assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, (name, states)  # none stuck
        assert timed and max(timed.values()) == 1, (name, timed.most_common(3))  # no duplicate timing
        assert len(timed) == len(tiny[name]) + 1, (name, len(timed))  # every config of the tiny space, and torch, once
        # The killed worker's trial failed by heartbeat and was re-queued: its config is among those timed.
        killed += [t for t in ts if t.state == TrialState.FAIL and t.user_attrs.get("worker", "").startswith("victim:")]
        assert all(t.user_attrs["candidate"] in timed for t in killed if t in ts)
        assert all("failed" not in t.user_attrs for t in ts)  # no candidate failed: FAIL only for the dead
        figures[name] = {"trials": len(ts), "complete": states[TrialState.COMPLETE],
                         "pruned": states[TrialState.PRUNED], "fail": states[TrialState.FAIL]}
    assert len(killed) == 1  # the one trial the victim held when it was killed
    # Readable in optuna-dashboard: what the study is, the metric's name, each trial's config by value.
    import optuna

    from autonorm.tune.fleet import open_storage

    for summary in optuna.get_all_study_summaries(open_storage(database, Path("unused"))):
        assert {"device", "spec", "rows", "versions", "protocol", "record"} <= set(summary.user_attrs)
        assert summary.user_attrs["rows"] == ROWS and summary.user_attrs["spec"]["hidden"] == 256
    study = optuna.load_study(study_name="fleet/rmsnorm", storage=open_storage(database, Path("unused")))
    assert study.metric_names == ["median_us"]
    assert all(t.user_attrs["backend"] in ("numba-cpu", "torch")
               for t in trials["fleet/rmsnorm"] if t.state == TrialState.COMPLETE)
    # One finalizer per study; every worker either took its record or named the finalizer.
    for name in trials:
        reports = [r for out in outs for r in out if r["study"] == name]
        assert len(reports) == 4 and all(r["record"] or r["finalized_by"] for r in reports)
    fleet_db = _export(database, tmp_path / "fleet")

    # The same grid with one worker, in a second database: the same records (keys).
    single = database + "_single"
    import psycopg

    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{single.rsplit("/", 1)[1]}"')
    try:
        t0 = time.monotonic()
        _wait([_start(single, "solo")])
        single_s = time.monotonic() - t0
        single_db = _export(single, tmp_path / "single")
    finally:
        with psycopg.connect(URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{single.rsplit("/", 1)[1]}" WITH (FORCE)')
    assert sorted(fleet_db.records) == sorted(single_db.records) and len(fleet_db.records) == len(SPECS)
    print(f"\nfleet figures: {json.dumps(figures)}; fleet {fleet_s:.1f} s, single worker {single_s:.1f} s")
