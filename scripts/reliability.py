"""An adversarial run against autonorm's file handling; prints how many cases held (docs/reliability.md).

    python scripts/reliability.py [--baseline REV] [--mutants] [--json OUT]

Every case is built here, programmatically, in a temporary folder:

  databases   crafted tuning databases (corrupt bytes, deep nesting, huge numbers, schema
              violations, code in configs, a FIFO, a link to /dev/zero, ...), each through five
              paths: `db validate`, `db show`, `db merge`, a kernel call with the file on
              AUTONORM_DB_PATH, and `autonorm.load_db`
  knobs       hostile AUTONORM_* values and command-line flags (`tune --storage`, `db merge -o`,
              `bench --report` slugs)
  kill -9     processes killed at random moments while saving a database, appending to an
              Optuna journal, or writing compile-cache entries; then the files must still load
  cut         journals cut at random bytes (what a full disk leaves), then tuned again
  edges       what a new user hits: dubious databases the schema alone passes (must be refused),
              `bench --json` into a missing folder, `bench --input` of non-bench files, `tune --out`
              a file, empty or relative cache folders, the copy probe's memory on a huge L3, an
              int subclass as a hidden size, Ctrl-C inside Optuna's journal lock, a journal trial
              re-queued after the budget is spent, and (with AUTONORM_TEST_POSTGRES_URL) a
              PostgreSQL outage through a proxy that is stopped and started

A case *holds* when autonorm either does the right thing or refuses with its own clear error
(an AutonormError, or a CLI exit code with a message), within 20 s and 2 GiB of extra memory;
a traceback of any other exception, a hang, a wrong result or a lost file is a failure.

`--baseline REV` runs the same cases against an older commit too (its files exported to a
temporary folder) and reports, per category, how many cases failed there and hold now ("fixed").
`--mutants` applies single-line mutants (a non-atomic save, no device check, no claim lock, no
cache hash check) to a copy of HEAD and holds when the test named for each fails.
Runs in a few minutes on 2 cores (plus the baseline's run; a FIFO hangs old code for 20 s a path).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASE_SECONDS = 20  # times --time-scale, for a machine busy with other work
# A writer killed inside Optuna's journal lock leaves the lock behind; Optuna breaks it after 30 s.
KILL_SECONDS = 60


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang("no answer within the case's time limit")


TIME_SCALE = 1.0


def run_case(fn, seconds: int = CASE_SECONDS) -> tuple[bool, str]:
    """(held, note): runs fn() -> (held, note) under a time limit; an unexpected exception is a failure."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, round(seconds * TIME_SCALE)))
    started = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except BaseException as exc:  # noqa: BLE001  (the point is to see every kind of failure)
        if isinstance(exc, KeyboardInterrupt):
            raise
        return False, f"{type(exc).__name__}: {str(exc)[:120]}"
    finally:
        signal.alarm(0)
        if os.environ.get("RELIABILITY_SLOW") and time.monotonic() - started > 2:
            print(f"slow case: {time.monotonic() - started:.1f} s", getattr(fn, "__qualname__", fn), file=sys.stderr)


def cli(*argv) -> tuple[int, str]:
    """Run `autonorm ARGV` in-process: (exit code, stderr)."""
    from autonorm.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 2
    return rc, err.getvalue()


# --- crafted databases ---------------------------------------------------------------------------------------
def good_database() -> dict:
    """A valid database for this machine's CPU: torch winners (nothing to compile), three records."""
    from autonorm.backends import get_backend
    from autonorm.device import identity

    ident = identity("cpu")
    record = lambda n, bucket: {  # noqa: E731
        "key": {"op": "rmsnorm", "direction": "fwd", "x_dtype": "float32", "w_dtype": "float32",
                "features": "weight", "hidden": n, "rows_bucket": bucket},
        "winner": {"backend": "torch", "config": {}, "median_us": 5.0, "p20_us": 4.0, "p80_us": 6.0, "gbps": 1.0,
                   "pct_copy_bw": None},
        "runners_up": [], "baselines": {"torch_eager": {"median_us": 5.0, "p20_us": 4.0, "p80_us": 6.0},
                                        "torch_compile": None},
        "template_hash": get_backend("torch").template_hash(), "trials": 3, "failed": 0,
        "date": "2026-11-30T00:00:00+00:00"}
    return {"schema_version": 1,
            "device": {"name": ident["name"], "slug": ident["slug"], "kind": "cpu", "compute_capability": None,
                       "sm_count": 2, "l2_bytes": 0, "copy_gbps": 10.0},
            "versions": {"autonorm": "0.1.0", "torch": "2"}, "protocol": {},
            "records": [record(64, 4), record(64, 64), record(256, 4)]}


def _edit(fn):
    def make():
        obj = good_database()
        fn(obj)
        return json.dumps(obj).encode()
    return make


def _text_edit(old, new):
    def make():
        text = json.dumps(good_database())
        assert old in text, old
        return text.replace(old, new, 1).encode()
    return make


def _nested(depth, open_="[", close="]"):
    return open_ * depth + close * depth


def crafted_databases() -> dict:
    """name -> bytes of the file, or a str naming a special file (fifo, devzero, dangling, folder)."""
    good = lambda: json.dumps(good_database()).encode()  # noqa: E731
    rec = lambda o: o["records"][0]  # noqa: E731
    cases = {
        "valid": good,
        "empty": lambda: b"",
        "whitespace": lambda: b"   \n",
        "null": lambda: b"null",
        "a list": lambda: b"[]",
        "a string": lambda: b'"database"',
        "truncated at a quarter": lambda: good()[: len(good()) // 4],
        "truncated at half": lambda: good()[: len(good()) // 2],
        "truncated one byte short": lambda: good()[:-1],
        "trailing garbage": lambda: good() + b"}}",
        "NUL bytes": lambda: good()[:40] + b"\x00" * 8 + good()[40:],
        "invalid UTF-8": lambda: good().replace(b'"protocol": {}', b'"protocol": {"x": "\xff\xfe"}'),
        "UTF-16": lambda: good().decode().encode("utf-16"),
        "UTF-8 BOM": lambda: b"\xef\xbb\xbf" + good(),
        "Latin-1 name": lambda: good().replace(b'"protocol": {}', b'"protocol": {"x": "caf\xe9"}'),
        "nested 100000 deep": lambda: _nested(100_000).encode(),
        "objects nested 5000 deep": lambda: _nested(5000, '{"a":', "}").replace("{}", "1").encode(),
        "nested 900 deep in protocol": _text_edit('"protocol": {}', '"protocol": {"x": %s}' % _nested(900)),
        "nested 900 deep in baselines": _text_edit('"torch_compile": null', '"torch_compile": null, "x": %s'
                                                   % _nested(900)),
        "nested 900 deep in a version": _text_edit('"torch": "2"', '"torch": %s' % _nested(900)),
        "integer of 5000 digits": _text_edit('"sm_count": 2', '"sm_count": ' + "9" * 5000),
        "integer of 400 digits": _text_edit('"sm_count": 2', '"sm_count": ' + "9" * 400),
        "NaN time": _text_edit('"median_us": 5.0', '"median_us": NaN'),
        "Infinity time": _text_edit('"median_us": 5.0', '"median_us": Infinity'),
        "1e400 time": _text_edit('"median_us": 5.0', '"median_us": 1e400'),
        "negative time": _edit(lambda o: rec(o)["winner"].update(median_us=-1.0)),
        "zero time": _edit(lambda o: rec(o)["winner"].update(median_us=0.0)),
        "zero baseline": _edit(lambda o: rec(o)["baselines"].update(
            torch_eager={"median_us": 0.0, "p20_us": 0.0, "p80_us": 0.0})),
        "lone surrogate in the name": _text_edit('"protocol": {}', '"protocol": {"x": "\\ud800"}'),
        "control characters in the name": _edit(lambda o: o["device"].update(name="\x1b[2J\x1b[31mred")),
        "a 5 MB string": _edit(lambda o: o["protocol"].update(x="a" * 5_000_000)),
        "over the size cap (10 MB)": _edit(lambda o: o["protocol"].update(x="a" * 10_000_000)),
        "unknown schema version": _edit(lambda o: o.update(schema_version=99)),
        "schema version as a list": _edit(lambda o: o.update(schema_version=[1])),
        "no records field": _edit(lambda o: o.pop("records")),
        "no device": _edit(lambda o: o.pop("device")),
        "records as a dict": _edit(lambda o: o.update(records={})),
        "record as a string": _edit(lambda o: o["records"].append("record")),
        "slug with a path": _edit(lambda o: o["device"].update(slug="../../etc")),
        "kind gpu": _edit(lambda o: o["device"].update(kind="gpu")),
        "hidden 0": _edit(lambda o: rec(o)["key"].update(hidden=0)),
        "hidden 10**30": _edit(lambda o: rec(o)["key"].update(hidden=10 ** 30)),
        "hidden as a float": _edit(lambda o: rec(o)["key"].update(hidden=64.0)),
        "hidden as a string": _edit(lambda o: rec(o)["key"].update(hidden="64")),
        "rows bucket 0": _edit(lambda o: rec(o)["key"].update(rows_bucket=0)),
        "rows bucket not a power of two": _edit(lambda o: rec(o)["key"].update(rows_bucket=3)),
        "unknown op": _edit(lambda o: rec(o)["key"].update(op="groupnorm")),
        "unknown dtype": _edit(lambda o: rec(o)["key"].update(x_dtype="float64")),
        "features with code": _edit(lambda o: rec(o)["key"].update(features="weight; import os")),
        "extra key field": _edit(lambda o: rec(o)["key"].update(extra=1)),
        "unknown backend": _edit(lambda o: rec(o)["winner"].update(backend="evil")),
        "backend named like a module": _edit(lambda o: rec(o)["winner"].update(backend="os:system")),
        "code in a config": _edit(lambda o: rec(o)["winner"].update(config={"x": "__import__('os').system('id')"})),
        "numba config with code": _edit(lambda o: rec(o)["winner"].update(
            backend="numba-cpu", config={"rows_per_task": "4; import os"})),
        "numba config outside its domain": _edit(lambda o: rec(o)["winner"].update(
            backend="numba-cpu", config={"rows_per_task": 3})),
        "config as a list": _edit(lambda o: rec(o)["winner"].update(config=[1, 2])),
        "config with a nested value": _edit(lambda o: rec(o)["winner"].update(config={"a": {"b": 1}})),
        "stale template hash": _edit(lambda o: rec(o).update(template_hash="0000")),
        "empty template hash": _edit(lambda o: rec(o).update(template_hash="")),
        "duplicate key": _edit(lambda o: o["records"].append(json.loads(json.dumps(rec(o))))),
        "not a date": _edit(lambda o: rec(o).update(date="yesterday")),
        "negative trials": _edit(lambda o: rec(o).update(trials=-1)),
        "runner-up with code": _edit(lambda o: rec(o)["runners_up"].append(
            {**rec(o)["winner"], "config": {"x": "${{7*7}}"}})),
        "another device's slug": _edit(lambda o: o["device"].update(slug="cpu-someone-else-2c")),
        "a GPU database": _edit(lambda o: o["device"].update(slug="nvidia-h100", kind="cuda",
                                                             compute_capability="9.0")),
        "1000 records": _edit(lambda o: o.update(records=[
            {**rec(o), "key": {**rec(o)["key"], "hidden": n + 1}} for n in range(1000)])),
        "a FIFO": "fifo",
        "a link to /dev/zero": "devzero",
        "a dangling link": "dangling",
        "a folder": "folder",
    }
    return cases


def place(folder: Path, name: str, make) -> Path:
    path = folder / (name.replace(" ", "_").replace("/", "_") + ".json")
    if make == "fifo":
        os.mkfifo(path)
    elif make == "devzero":
        path.symlink_to("/dev/zero")
    elif make == "dangling":
        path.symlink_to(folder / "no-such-file")
    elif make == "folder":
        path.mkdir()
        (path / "inner.json").write_text("{")
    else:
        path.write_bytes(make())
    return path


def _call_correct() -> bool:
    import torch
    import torch.nn.functional as F

    import autonorm

    x, w = torch.randn(3, 64), torch.randn(64)
    return torch.allclose(autonorm.rms_norm(x, (64,), w, 1e-6), F.rms_norm(x, (64,), w, 1e-6), atol=1e-5)


def database_cases(tmp: Path) -> list:
    import autonorm
    from autonorm import db_sources
    from autonorm.db import TuningDB
    from autonorm.errors import DatabaseError

    good = tmp / "good"
    good.mkdir()
    good_file = good / "good.json"
    good_file.write_text(json.dumps(good_database()))
    results = []
    for name, make in crafted_databases().items():
        folder = tmp / f"db-{len(results)}"
        folder.mkdir()
        path = place(folder, name, make)

        def validate():
            rc, err = cli("db", "validate", path)
            return rc in (0, 1) and (rc == 0 or "INVALID" in err), f"exit {rc}"

        def show():
            rc, _ = cli("db", "show", path)
            return rc in (0, 1), f"exit {rc}"

        def merge():
            out = folder / "merged.out"
            rc, _ = cli("db", "merge", good_file, path, "-o", out)
            if rc == 0:
                TuningDB.load(out)
            return rc in (0, 1), f"exit {rc}"

        def runtime():
            os.environ["AUTONORM_DB_PATH"] = str(path)
            try:
                autonorm.reset()
                return _call_correct(), "kernel call"
            finally:
                del os.environ["AUTONORM_DB_PATH"]
                autonorm.reset()

        def load_db():
            try:
                autonorm.load_db(path)
                return True, "loaded"
            except DatabaseError:
                return True, "refused"
            finally:
                db_sources.forget(user_paths=True)
                autonorm.reset()

        for label, fn in (("validate", validate), ("show", show), ("merge", merge), ("kernel call", runtime),
                          ("load_db", load_db)):
            results.append(("databases", f"{name} / {label}", *run_case(fn)))
    return results


# --- knobs and flags --------------------------------------------------------------------------------------------
def knob_cases(tmp: Path) -> list:
    import autonorm
    from autonorm.backends import base
    from autonorm.errors import AutonormError
    from autonorm.render import Source

    marker = tmp / "MARKER"
    fifo = tmp / "knob-fifo.json"
    os.mkfifo(fifo)
    a_file = tmp / "a-file"
    a_file.write_text("x")
    good = tmp / "knob-good.json"
    good.write_text(json.dumps(good_database()))
    other = json.loads(json.dumps(good_database()))
    other["device"]["slug"] = "cpu-other-machine-2c"
    other_file = tmp / "other-device.json"
    other_file.write_text(json.dumps(other))
    results = []

    def with_env(env: dict, fn):
        def case():
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            autonorm.reset()
            try:
                return fn()
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                autonorm.reset()
        return case

    def call_or_own_error():
        try:
            ok = _call_correct()
        except AutonormError as exc:
            ok = bool(str(exc))
        return ok and not marker.exists(), "call"

    env_cases = {
        "AUTONORM_BACKEND": ["torch", "TORCH", "no-such", f"torch; touch {marker}", "$(touch MARKER)", "../../x",
                             "x" * 10_000, " ", "triton"],
        "AUTONORM_DB_PATH": [str(tmp / "missing.json"), "/dev/zero", str(fifo), os.pathsep * 5,
                             "/" + "x" * 5000, str(tmp), f"{good}{os.pathsep}{fifo}", "/proc/self/mem"],
        "AUTONORM_DISABLE": ["1", "maybe", "ON"],
        "AUTONORM_LOG": ["1", "verbose"],
        "AUTONORM_VERIFY_DB": ["1"],
    }
    for var, values in env_cases.items():
        for value in values:
            results.append(("knobs", f"{var}={value[:30]!r}", *run_case(with_env({var: value}, call_or_own_error))))

    counter = iter(range(10 ** 6))

    def cache_import():
        value = next(counter)
        module = base.import_generated(Source.of(f"VALUE = {value}\n", "reliability"), "reliability")
        return module.VALUE == value, "cache import"

    dangling = tmp / "dangling-cache"
    dangling.symlink_to(tmp / "nowhere" / "deeper")
    for value in (str(a_file), "/dev/null", str(dangling), "/proc/self/no-such", str(tmp / "new" / "cache")):
        results.append(("knobs", f"AUTONORM_CACHE_DIR={value[-30:]!r}",
                        *run_case(with_env({"AUTONORM_CACHE_DIR": value}, cache_import))))
    results.append(("knobs", "AUTONORM_TUNE_ON_MISS=1 with a file as cache", *run_case(
        with_env({"AUTONORM_TUNE_ON_MISS": "1", "AUTONORM_CACHE_DIR": str(a_file)}, call_or_own_error))))

    return results + _flag_cases(tmp, good, other_file)


def _flag_cases(tmp: Path, good: Path, other_file: Path) -> list:
    """Command-line flags pointed at the wrong things: a database as tune's storage, another device's file as
    merge's output, a bench JSON whose slug would write outside the report folder."""
    results = []

    def tune_storage(storage):
        def case():
            before = storage.read_bytes() if storage.is_file() else None
            rc, err = cli("tune", "--quick", "--backends", "torch", "--ops", "rmsnorm", "--directions", "fwd",
                          "--dtypes", "float32", "--rows", "4", "--hidden", "64", "--no-compile-baseline",
                          "--storage", storage, "--out", tmp / "tune-out", "--no-progress", "--trials", "1")
            after = storage.read_bytes() if storage.is_file() else None
            return rc != 0 and before == after and str(storage) in err, f"exit {rc}"
        return case

    notes = tmp / "notes.txt"
    notes.write_text("notes\n")
    for storage in (good, notes, tmp / "fresh.json", tmp):
        results.append(("flags", f"tune --storage {storage.name}", *run_case(tune_storage(storage))))

    def merge_into_other():
        before = other_file.read_bytes()
        rc, _ = cli("db", "merge", good, "-o", other_file)
        return rc == 1 and other_file.read_bytes() == before, f"exit {rc}"

    results.append(("flags", "db merge -o <another device's file>", *run_case(merge_into_other)))

    from autonorm.bench import report

    def report_slug(slug):
        def case():
            doc = {"device": {"slug": slug.replace("{tmp}", str(tmp))}, "rows": []}
            src = tmp / "bench.json"
            src.write_text(json.dumps(doc))
            out = tmp / "report" / "out"
            written = report.write_report([str(src)], str(out))
            return all(Path(p).resolve().parent == out.resolve() for p in written), ", ".join(
                Path(p).name for p in written)
        return case

    for slug in ("../../escaped", "{tmp}/absolute", "..", ".hidden", "a/b/../../../c"):
        results.append(("flags", f"bench --report slug {slug!r}", *run_case(report_slug(slug))))
    return results


# --- what a new user hits: dubious files, lost work, misleading figures, tracebacks ---------------------------
def _dubious_databases() -> dict:
    """Databases the JSON schema alone accepts but no tuner writes: each must be refused."""
    rec = lambda o: o["records"][0]  # noqa: E731
    return {
        "slug ending in a newline": _edit(lambda o: o["device"].update(slug=o["device"]["slug"] + "\n")),
        "hidden 64.0": _edit(lambda o: rec(o)["key"].update(hidden=64.0)),
        "rows_bucket 3": _edit(lambda o: rec(o)["key"].update(rows_bucket=3)),
        "features weight+weight": _edit(lambda o: rec(o)["key"].update(features="weight+weight")),
        "a JSON key twice": _text_edit('"hidden": 64', '"hidden": 64, "hidden": 128'),
    }


def _one_line(rc_wanted: int, *argv) -> tuple[bool, str]:
    """The command exits `rc_wanted` with one line on stderr and no traceback."""
    rc, err = cli(*argv)
    return rc == rc_wanted and err.count("\n") == 1 and "Traceback" not in err, f"exit {rc}: {err.strip()[:80]}"


def _bench_edges(tmp: Path) -> list:
    """bench with a missing output folder, and given files that are not bench JSON."""
    results = []
    bench = ("bench", "--shapes", "17x64", "--dtypes", "fp32", "--ops", "rmsnorm", "--directions", "fwd",
             "--providers", "torch", "--reps", "2", "--warmup", "1", "--copy-bw", "10")

    def bench_into_a_missing_folder():
        out = tmp / "no-such-folder" / "deeper" / "bench.json"
        rc, _ = cli(*bench, "--json", out)
        return rc == 0 and len(json.loads(out.read_text())["rows"]) == 1, f"exit {rc}"
    results.append(("edges", "bench --json into a missing folder", *run_case(bench_into_a_missing_folder)))
    for label, content in (("not JSON", b"<html>"), ("{}", b"{}"), ("rows of numbers", b'{"rows": [1]}')):
        path = tmp / f"bench-input-{len(results)}.json"
        path.write_bytes(content)
        results.append(("edges", f"bench --input {label}", *run_case(
            lambda path=path: _one_line(1, "bench", "--report", tmp / "report-bad", "--input", path))))
    results.append(("edges", "bench --input /dev/null", *run_case(
        lambda: _one_line(1, "bench", "--report", tmp / "report-bad", "--input", "/dev/null"))))
    return results


def edge_cases(tmp: Path) -> list:
    from autonorm import measure, settings
    from autonorm.db import TuningDB
    from autonorm.errors import DatabaseError
    from autonorm.spec import NormSpec

    results = []
    (tmp / "dubious").mkdir()
    for name, make in _dubious_databases().items():
        path = place(tmp / "dubious", name, make)

        def refused(path=path):
            rc, err = cli("db", "validate", path)
            try:
                TuningDB.load(path)
                loaded = True
            except DatabaseError:
                loaded = False
            return rc == 1 and "INVALID" in err and not loaded, f"validate exit {rc}, load_db refused: {not loaded}"
        results.append(("edges", f"db validate refuses: {name}", *run_case(refused)))

    results += _bench_edges(tmp)

    tune = ("tune", "--backends", "torch", "--ops", "rmsnorm", "--directions", "fwd", "--dtypes", "float32",
            "--rows", "4", "--hidden", "64", "--no-compile-baseline", "--no-progress", "--trials", "1")
    a_file = tmp / "an-existing-file"
    a_file.write_text("keep")

    def tune_out(out):
        def case():
            ok, note = _one_line(2, *tune, "--out", out)
            return ok and (not out.exists() or out.read_text() == "keep"), note
        return case
    results.append(("edges", "tune --out <an existing file>", *run_case(tune_out(a_file))))
    results.append(("edges", "tune --out mydb.json", *run_case(tune_out(tmp / "mydb.json"))))

    def cache_dir_with(env):
        def case():
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                folder = settings.cache_dir()
            finally:
                for k, v in old.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
            return folder.is_absolute(), str(folder)
        return case
    for env in ({"AUTONORM_CACHE_DIR": "", "XDG_CACHE_HOME": ""}, {"AUTONORM_CACHE_DIR": "", "XDG_CACHE_HOME": "rel"},
                {"AUTONORM_CACHE_DIR": "autonorm"}):
        results.append(("edges", f"cache folder with {env}", *run_case(cache_dir_with(env))))

    results.append(("edges", "copy probe on a 480 MiB L3 in a 2 GiB container", *run_case(
        lambda: ((n := measure.probe_bytes(480 << 20, 2 << 30)) <= 128 << 20, f"{n >> 20} MiB a buffer"))))

    def int_subclass():
        class Sneaky(int):
            def __str__(self):
                return "64; import os"
        try:
            NormSpec("rmsnorm", "fwd", "float32", "float32", Sneaky(64))
            return False, "accepted"
        except ValueError:
            return True, "refused"
    results.append(("edges", "NormSpec hidden of an int subclass", *run_case(int_subclass)))
    results.append(("edges", "Ctrl-C inside the journal lock", *run_case(lambda: _ctrl_c_in_the_lock(tmp, tune))))
    results.append(("edges", "journal trial re-queued after the budget", *run_case(
        _requeued_after_budget, KILL_SECONDS)))
    if os.environ.get("AUTONORM_TEST_POSTGRES_URL"):
        results.append(("edges", "PostgreSQL outage past the bound", *run_case(_postgres_outage, KILL_SECONDS)))
    return results


def _ctrl_c_in_the_lock(tmp: Path, tune_args) -> tuple[bool, str]:
    """A Ctrl-C that lands in Optuna's journal lock, whose release then fails: the summary, exit 130."""
    from autonorm import measure
    from autonorm.tune import study

    real_run, real_probe = study.StudyRunner.run, measure.copy_bandwidth

    def interrupted(self):
        try:
            raise KeyboardInterrupt
        except BaseException:
            os.rename(tmp / "no.optuna.journal.lock", tmp / "renamed")  # FileNotFoundError, as Optuna's release
    study.StudyRunner.run, measure.copy_bandwidth = interrupted, lambda *a, **k: 10.0
    try:
        rc, err = cli(*tune_args, "--out", tmp / "ctrl-c")
    finally:
        study.StudyRunner.run, measure.copy_bandwidth = real_run, real_probe
    return rc == 130 and "interrupted" in err and "Traceback" not in err, f"exit {rc}"


def _requeued_after_budget() -> tuple[bool, str]:
    """A worker of this host killed on a candidate after the budget was spent, then the same study run
    again: no trial may stay WAITING. The scenario (a fake backend, a study, a planted dead trial) is the
    test's; it runs here against whichever autonorm is importable (the baseline's, with --baseline)."""
    test = "tests/test_hardening.py::test_a_trial_requeued_after_the_budget_is_spent_never_stays_waiting"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / test)],
                          cwd=tempfile.gettempdir(),  # not REPO: `-m` would import autonorm from the cwd
                          capture_output=True, text=True, timeout=KILL_SECONDS)
    return proc.returncode == 0, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "no output"


def _postgres_outage() -> tuple[bool, str]:
    """A storage call while PostgreSQL stopped answering (its engine rebound to a port where nothing listens),
    past a bounded wait: one error that names the storage and says the same command resumes."""
    import socket

    import optuna
    import sqlalchemy

    from autonorm.tune import make_storage, outage

    storage = make_storage(os.environ["AUTONORM_TEST_POSTGRES_URL"], Path("unused"))
    rdb = storage._backend
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # a free port: connections are refused, as while the server restarts
    rdb.scoped_session.remove()
    rdb.scoped_session.configure(bind=sqlalchemy.create_engine(rdb.engine.url.set(host="127.0.0.1", port=port)))
    real = outage.STORAGE_OUTAGE_S
    outage.STORAGE_OUTAGE_S = 2.0
    try:
        optuna.get_all_study_summaries(storage)
        return False, "no error"
    except outage.StorageUnavailableError as exc:
        return "run the same command again" in str(exc) and "\n" not in str(exc), str(exc)[:100]
    finally:
        outage.STORAGE_OUTAGE_S = real


# --- kill -9 and cut journals -------------------------------------------------------------------------------------
CHILD = {
    "save": """
import sys
from autonorm.db import TuningDB
path, base = sys.argv[1], sys.argv[2]
import json
obj = json.load(open(base))
for i in range(10 ** 6):
    db = TuningDB.from_json(obj)
    rec = next(iter(db.records.values()))
    for n in range(200):
        key = rec.key.__class__(**{**rec.key.__dict__, "hidden": 1000 * i + n + 1})
        db.upsert(rec.__class__(key, rec.winner, rec.runners_up, rec.baselines, rec.template_hash, 1, 0, rec.date))
    db.save(path)
    print(i, flush=True)
""",
    "journal": """
import sys, optuna
from pathlib import Path
from autonorm.tune import make_storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
path = Path(sys.argv[1])
study = optuna.create_study(storage=make_storage(str(path), path), study_name="s", load_if_exists=True)
for i in range(10 ** 6):
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    print(i, flush=True)
""",
    "cache": """
import sys
from autonorm.backends.base import import_generated
from autonorm.render import Source
for i in range(10 ** 6):
    assert import_generated(Source.of(f"VALUE = {i}\\n" + "# pad\\n" * 2000, "k"), "killed").VALUE == i
    print(i, flush=True)
""",
}


def _kill_after_progress(kind: str, args: list, env: dict, rng: random.Random) -> int:
    """Start a child of `kind`, let it finish a random number of steps, SIGKILL it; returns steps done."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD[kind], *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env={**os.environ, **env}, text=True)
    want, done = rng.randint(1, 4), -1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        done = int(line)
        if done >= want:
            time.sleep(rng.uniform(0, 0.3))  # land anywhere in the next step
            break
    proc.kill()
    proc.wait()
    return done


def kill_cases(tmp: Path, rng: random.Random) -> list:
    import optuna

    from autonorm.backends.base import import_generated
    from autonorm.db import TuningDB
    from autonorm.render import Source
    from autonorm.tune import make_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    base = tmp / "kill-base.json"
    base.write_text(json.dumps(good_database()))
    results = []
    for i in range(4):
        path = tmp / f"killed-save-{i}.json"

        def case():
            done = _kill_after_progress("save", [path, base], {}, rng)
            records = len(TuningDB.load(path).records)
            return done >= 0 and records >= 200 * (done + 1), f"{done + 1} saves, {records} records"
        results.append(("kill -9", f"database save #{i}", *run_case(case, KILL_SECONDS)))
    for i in range(2):
        path = tmp / f"killed-{i}.journal"

        def case():
            done = _kill_after_progress("journal", [path], {}, rng)
            study = optuna.load_study(study_name="s", storage=make_storage(str(path), path))
            complete = len([t for t in study.trials if t.state.name == "COMPLETE"])
            study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
            return complete >= done + 1, f"{done + 1} trials reported, {complete} in the journal"
        results.append(("kill -9", f"journal append #{i}", *run_case(case, KILL_SECONDS)))
    for i in range(2):
        cache = tmp / f"killed-cache-{i}"

        def case():
            done = _kill_after_progress("cache", [], {"AUTONORM_CACHE_DIR": str(cache)}, rng)
            os.environ["AUTONORM_CACHE_DIR"] = str(cache)
            try:  # every entry, including the one being written at the kill, must import to its own value
                ok = all(import_generated(Source.of(f"VALUE = {j}\n" + "# pad\n" * 2000, "k"),
                                          f"killed-{i}").VALUE == j for j in range(done + 2))
            finally:
                os.environ.pop("AUTONORM_CACHE_DIR")
            return ok, f"{done + 1} entries written"
        results.append(("kill -9", f"compile cache write #{i}", *run_case(case, KILL_SECONDS)))
    return results


def cut_journal_cases(tmp: Path, rng: random.Random) -> list:
    import optuna

    from autonorm.errors import AutonormError
    from autonorm.tune import make_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    source = tmp / "whole.journal"
    study = optuna.create_study(storage=make_storage(str(source), source), study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=6)
    data = source.read_bytes()
    results = []
    for i in range(8):
        cut = rng.randrange(1, len(data))
        path = tmp / f"cut-{i}.journal"
        path.write_bytes(data[:cut])

        def case():
            storage = make_storage(str(path), path)
            s = optuna.load_study(study_name="s", storage=storage)
            s.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
            again = optuna.load_study(study_name="s", storage=make_storage(str(path), path))
            return len(again.trials) >= 1, f"cut at byte {cut}: {len(again.trials)} trials after"
        results.append(("cut journal", f"cut at a random byte #{i}", *run_case(case)))
    for i in range(2):
        path = tmp / f"cut-middle-{i}.journal"
        lines = data.splitlines(keepends=True)
        where = rng.randrange(1, len(lines))
        path.write_bytes(b"".join(lines[:where]) + lines[where][: len(lines[where]) // 2] + b"".join(lines[where:]))

        def case():
            try:
                make_storage(str(path), path)
                optuna.load_study(study_name="s", storage=make_storage(str(path), path)).trials
                return False, "read a corrupt journal silently"
            except AutonormError as exc:
                return str(path) in str(exc), "named"
        results.append(("cut journal", f"cut, then appended to #{i}", *run_case(case)))
    return results


# --- driver ---------------------------------------------------------------------------------------------------
def run_all(seed: int, only: str | None = None) -> list:
    import logging

    import optuna  # noqa: F401

    import autonorm  # noqa: F401  (import before the memory cap)
    from autonorm import dispatch

    logging.getLogger("autonorm").addHandler(logging.NullHandler())  # AUTONORM_LOG cases: not on the console
    logging.getLogger("autonorm").propagate = False

    # Kernels are not under test here: torch answers every call that no database covers.
    dispatch.DEFAULT_ORDER["cpu"] = ("torch",)
    # 2 GiB above what is mapped now: a file read whole into memory fails here, not on the machine.
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + (2 << 30), resource.RLIM_INFINITY))
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="autonorm-reliability-") as tmp:
        tmp = Path(tmp)
        os.environ["AUTONORM_CACHE_DIR"] = str(tmp / "cache")
        steps = {"databases": database_cases, "knobs": knob_cases, "edges": edge_cases,
                 "kill -9": lambda t: kill_cases(t, rng), "cut journal": lambda t: cut_journal_cases(t, rng)}
        results = []
        for name, step in steps.items():
            if only is None or only == name:
                results += step(tmp)
    return results


def _export(rev: str, folder: Path) -> Path:
    """The files of commit `rev` in `folder`/tree, importable with PYTHONPATH=tree (returned)."""
    tree = folder / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    # The package maps autonorm.backends/templates/tuning_db to top-level folders: mirror that.
    for name in ("backends", "templates", "tuning_db"):
        (tree / "autonorm" / name).symlink_to(tree / name)
    return tree


def _baseline(rev: str, time_scale: float, only: str | None = None) -> dict:
    """{(category, case): held} of the same cases on commit `rev`."""
    with tempfile.TemporaryDirectory(prefix="autonorm-baseline-") as tmp:
        tree = _export(rev, Path(tmp))
        out = Path(tmp) / "baseline.json"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run([sys.executable, __file__, "--json", str(out), "--expect-root", str(tree),
                        "--time-scale", str(time_scale), *(["--only", only] if only else [])], env=env,
                       check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return {(c, n): held for c, n, held, _ in json.loads(out.read_text())}


# Single-line mutants that once survived the test suite, and the tests that must now fail on each.
MUTANTS = {
    "database save writes in place": (
        "autonorm/db_folder.py", 'fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)',
        "fd, tmp = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), str(path)",
        "tests/test_db.py::test_save_interrupted_mid_write_leaves_the_old_file_intact"),
    "no device check in fits": (
        "autonorm/dispatch_records.py", "return (backend.supports_device(device) and type(winner.config)",
        "return (type(winner.config)", "tests/test_dispatch.py::test_every_database_rung_checks_the_device"),
    "exact rung without fits": (
        "autonorm/dispatch_records.py", "if record is not None and fits(record, spec, device):",
        "if record is not None:", "tests/test_dispatch.py::test_meta_tensors_never_get_a_cpu_kernel"),
    "no claim lock in the tuner": (
        "autonorm/tune/study.py", "return fleet.claim_lock(self.storage, self.name, self.lock_path)",
        "return fleet.claim_lock(self.storage, self.name, None)",
        "tests/test_reliability.py::test_two_workers_claiming_at_once_never_time_one_config"),
    "cache entry not checked against its hash": (
        "backends/base.py", "return hashlib.sha256(data).hexdigest() == source.sha256", "return True",
        "tests/test_reliability.py::test_planted_cache_file_is_discarded_and_regenerated"),
}


def mutant_cases() -> list:
    """Each mutant applied to HEAD's files: held when its test fails (the mutant is killed)."""
    results = []
    with tempfile.TemporaryDirectory(prefix="autonorm-mutants-") as tmp:
        tree = _export("HEAD", Path(tmp))
        for name, (path, old, new, test) in [("none (control: the tests pass)", (None, "", "", None))] + list(
                MUTANTS.items()):
            tests = [test] if test else [t for *_, t in MUTANTS.values()]
            original = (tree / path).read_text() if path else None
            if path:
                if original.count(old) != 1:
                    results.append(("mutants", name, False, f"line not found once in {path}"))
                    continue
                (tree / path).write_text(original.replace(old, new))
            try:
                rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                    cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True,
                                    timeout=300).returncode
            finally:
                if path:
                    (tree / path).write_text(original)
            held = rc == 0 if path is None else rc == 1
            results.append(("mutants", name, held, f"pytest exit {rc}"))
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", metavar="REV", help="also run the cases on this older commit and count fixes")
    p.add_argument("--json", metavar="OUT", help="write every case's result as JSON")
    p.add_argument("--mutants", action="store_true", help="also check that each known mutant is killed by its test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=("databases", "knobs", "edges", "kill -9", "cut journal"),
                   help="run one category (knobs includes the flags)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply every case's time limit (a loaded machine: 3 for a load average of 6 on 2 cores)")
    p.add_argument("--verbose", action="store_true", help="print every case that did not hold")
    p.add_argument("--expect-root", help=argparse.SUPPRESS)  # the baseline run checks which autonorm it imports
    args = p.parse_args()
    global TIME_SCALE
    TIME_SCALE = args.time_scale
    started = time.monotonic()
    if args.expect_root:
        import autonorm
        assert Path(autonorm.__file__).resolve().is_relative_to(Path(args.expect_root).resolve()), autonorm.__file__
    results = run_all(args.seed, args.only) + (mutant_cases() if args.mutants else [])
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    before = _baseline(args.baseline, args.time_scale, args.only) if args.baseline else None
    categories = list(dict.fromkeys(c for c, *_ in results))
    print(f"{'category':<12} {'cases':>6} {'held':>6} {'failed':>7}" + (f" {'failed at ' + args.baseline:>20}"
                                                                         f" {'fixed':>6}" if before else ""))
    for cat in categories:
        rows = [r for r in results if r[0] == cat]
        held = sum(r[2] for r in rows)
        line = f"{cat:<12} {len(rows):>6} {held:>6} {len(rows) - held:>7}"
        if before is not None:
            then = [r for r in rows if (r[0], r[1]) in before]  # the baseline run has no mutants
            failed_then = [r for r in then if not before[(r[0], r[1])]]
            fixed = sum(r[2] for r in failed_then)
            line += f" {len(failed_then):>20} {fixed:>6}" if then else f" {'-':>20} {'-':>6}"
        print(line)
    failed = [r for r in results if not r[2]]
    for cat, name, _, note in failed if (args.verbose or len(failed) <= 20) else []:
        print(f"  FAILED {cat}: {name}: {note}")
    print(f"{len(results)} cases, {len(results) - len(failed)} held; {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
