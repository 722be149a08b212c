"""Tuning databases: round trip, every bad-file case refused clearly, merge, concurrent writers."""
import copy
import json
import multiprocessing

import pytest

from autonorm.cli import main as cli_main
from autonorm.config import NoConfig
from autonorm.db import SCHEMA_VERSION, Entry, Record, RecordKey, TuningDB
from autonorm.errors import DatabaseError
from autonorm.spec import NormSpec

DEVICE = {"name": "Test CPU", "slug": "test-cpu", "kind": "cpu", "compute_capability": None, "sm_count": 2,
          "l2_bytes": 0, "copy_gbps": 20.0}
VERSIONS = {"autonorm": "0.1.0", "torch": "2.0", "triton": None, "cupy": None, "numba": None, "cuda": None,
            "driver": None}


def numba_cpu_config(**changes):
    from autonorm.backends import get_backend

    cls = get_backend("numba-cpu").config_cls
    return cls.heuristic(SPEC).replace(**changes)


SPEC = NormSpec("rmsnorm", "fwd", "float32", "float32", 4096)


def entry(backend="torch", config=None, us=10.0):
    return Entry(backend, config if config is not None else NoConfig(), us, us * 0.9, us * 1.1, 100.0, 50.0)


def record(hidden=4096, rows_bucket=1024, winner=None, us=10.0):
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", hidden)
    return Record(RecordKey.of(spec, rows_bucket), winner or entry(us=us), [entry(us=us * 2)],
                  {"torch_eager": {"median_us": 20.0, "p20_us": 19.0, "p80_us": 21.0}, "torch_compile": None},
                  "torch-2.0", 12, 1, "2026-01-01T00:00:00+00:00")


def sample_db(n=2) -> TuningDB:
    db = TuningDB(DEVICE, VERSIONS, {"timer": "test"})
    for i in range(n):
        db.upsert(record(hidden=1024 * (i + 1)))
    return db


def test_round_trip_keeps_every_field(tmp_path):
    db = sample_db()
    db.upsert(record(hidden=768, winner=entry("numba-cpu", numba_cpu_config(threads=1))))
    path = tmp_path / "db.json"
    db.save(path)
    loaded = TuningDB.load(path)
    assert loaded.to_json() == db.to_json()
    rec = loaded.records[RecordKey.of(NormSpec("rmsnorm", "fwd", "float32", "float32", 768), 1024)]
    assert rec.winner.config == numba_cpu_config(threads=1)
    assert type(rec.winner.config).__name__ == "NumbaCpuConfig"
    assert rec.key.spec() == NormSpec("rmsnorm", "fwd", "float32", "float32", 768)


def _good_json():
    db = sample_db(1)
    db.upsert(record(hidden=768, winner=entry("numba-cpu", numba_cpu_config())))
    return db.to_json()


def _numba(obj):
    """The config of the record whose winner is numba-cpu."""
    return next(r for r in obj["records"] if r["winner"]["backend"] == "numba-cpu")["winner"]["config"]


def _mutate(fn):
    obj = copy.deepcopy(_good_json())
    fn(obj)
    return obj


BAD = {
    "unknown schema version": (lambda o: o.update(schema_version=SCHEMA_VERSION + 1), "unknown schema_version"),
    "missing field": (lambda o: o["records"][0].pop("winner"), "schema violation"),
    "wrong type": (lambda o: o["records"][0]["key"].update(hidden="4096"), "schema violation at records/0/key/hidden"),
    "unknown backend": (lambda o: o["records"][0]["winner"].update(backend="evil"), "unknown backend 'evil'"),
    "code in a config": (lambda o: _numba(o).update(rows_per_task="4; import os"),
                         "refused by backend 'numba-cpu'"),
    "value outside the domain": (lambda o: _numba(o).update(rows_per_task=3),
                                 "outside its domain"),
    "unknown config key": (lambda o: _numba(o).update(evil=1), "unknown keys"),
    "config for torch": (lambda o: o["records"][0]["runners_up"][0]["config"].update(x=1),
                         "refused by backend 'torch'"),
    "duplicate key": (lambda o: o["records"].append(copy.deepcopy(o["records"][0])), "repeats key"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_database_is_refused_clearly(tmp_path, case):
    mutate, message = BAD[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_mutate(mutate)))
    with pytest.raises(DatabaseError, match=message.replace("(", r"\(")) as info:
        TuningDB.load(path)
    assert str(path) in str(info.value)


def test_truncated_and_missing_files_are_refused(tmp_path):
    path = tmp_path / "db.json"
    text = json.dumps(_good_json())
    path.write_text(text[: len(text) // 2])
    with pytest.raises(DatabaseError, match="not valid JSON"):
        TuningDB.load(path)
    with pytest.raises(DatabaseError, match="cannot read"):
        TuningDB.load(tmp_path / "absent.json")


def test_merge_keeps_the_faster_record_and_refuses_other_devices():
    a, b = sample_db(2), sample_db(1)
    key = next(iter(b.records))
    b.upsert(record(hidden=key.hidden, us=1.0))
    b.upsert(record(hidden=999))
    a.merge(b)
    assert len(a.records) == 3
    assert a.records[key].winner.median_us == 1.0
    other = TuningDB({**DEVICE, "slug": "other"}, VERSIONS, {})
    with pytest.raises(DatabaseError, match="different devices"):
        a.merge(other)


def test_save_merges_with_what_another_writer_saved(tmp_path):
    path = tmp_path / "db.json"
    first, second = TuningDB(DEVICE, VERSIONS, {}), TuningDB(DEVICE, VERSIONS, {})
    first.upsert(record(hidden=1))
    second.upsert(record(hidden=2))
    first.save(path)
    second.save(path)  # second never saw first's record
    assert {k.hidden for k in TuningDB.load(path).records} == {1, 2}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _writer(path, worker, count):
    for i in range(count):
        db = TuningDB(DEVICE, VERSIONS, {})
        db.upsert(record(hidden=1000 * worker + i + 1))
        db.save(path)


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "db.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 8)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    hidden = {k.hidden for k in TuningDB.load(path).records}
    assert hidden == {1000 * w + i + 1 for w in range(4) for i in range(8)}


def test_db_cli_validate_show_diff_merge(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    sample_db(2).save(a)
    db_b = sample_db(1)
    db_b.upsert(record(hidden=4096, winner=entry("numba-cpu", numba_cpu_config(), us=3.0)))
    db_b.save(b)
    assert cli_main(["db", "validate", str(a), str(b)]) == 0
    assert cli_main(["db", "show", str(b)]) == 0
    assert "numba-cpu" in capsys.readouterr().out
    assert cli_main(["db", "diff", str(a), str(b)]) == 1  # they differ
    out = capsys.readouterr().out
    assert "+ rmsnorm.fwd x=float32 w=float32 N=4096" in out and "- rmsnorm.fwd x=float32 w=float32 N=2048" in out
    merged = tmp_path / "m.json"
    assert cli_main(["db", "merge", str(a), str(b), "-o", str(merged)]) == 0
    assert len(TuningDB.load(merged).records) == 3
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert cli_main(["db", "validate", str(a), str(bad)]) == 1
    assert "not valid JSON" in capsys.readouterr().err


# --- crafted files: every one refused with a DatabaseError that names the file and the problem ------------
def _text():
    return json.dumps(_good_json())


def _nested(depth):
    return "[" * depth + "]" * depth


CRAFTED = {
    "invalid UTF-8": (lambda: _text().replace('"Test CPU"', '"Test \\u00ff"').encode().replace(b"\\u00ff", b"\xff"),
                      "not UTF-8"),
    "UTF-16": (lambda: _text().encode("utf-16"), "not UTF-8"),
    "nested past the parser's recursion limit": (lambda: _nested(100_000).encode(), "nested too deeply"),
    "nested deeply inside the protocol": (
        lambda: _text().replace('"protocol": {', f'"protocol": {{"deep": {_nested(900)},').encode(),
        "nested too deeply"),
    "an integer of 5000 digits": (lambda: _text().replace('"sm_count": 2', '"sm_count": ' + "9" * 5000).encode(),
                                  "not valid JSON"),
    "NaN time": (lambda: _text().replace('"median_us": 10.0', '"median_us": NaN').encode(), "non-finite"),
    "Infinity time": (lambda: _text().replace('"median_us": 10.0', '"median_us": Infinity').encode(), "non-finite"),
    "lone surrogate": (lambda: _text().replace('"Test CPU"', '"\\ud800"').encode(), "surrogate"),
    "not a date": (lambda: _text().replace("2026-01-01T00:00:00+00:00", "yesterday").encode(), "date"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_file_is_refused_clearly_and_validate_reports_it(tmp_path, case, capsys):
    make, message = CRAFTED[case]
    path = tmp_path / "crafted.json"
    path.write_bytes(make())
    with pytest.raises(DatabaseError, match=message) as info:
        TuningDB.load(path)
    assert str(path) in str(info.value) and len(str(info.value)) < 600  # the offending value is not echoed whole
    assert cli_main(["db", "validate", str(path)]) == 1
    assert "INVALID" in capsys.readouterr().err


def test_show_handles_zero_times(tmp_path, capsys):
    # A record with a zero winner time (schema: minimum 0) once divided by zero in `db show`.
    db = sample_db(1)
    rec = next(iter(db.records.values()))
    rec.winner.median_us = 0.0
    rec.baselines["torch_eager"] = {"median_us": 0.0, "p20_us": 0.0, "p80_us": 0.0}
    rec.baselines["torch_compile"] = {"median_us": 5.0, "p20_us": 5.0, "p80_us": 5.0}
    db.save(tmp_path / "zero.json")
    assert cli_main(["db", "show", str(tmp_path / "zero.json")]) == 0
    assert "vs eager" in capsys.readouterr().out


def test_only_regular_files_under_the_size_cap_are_read(tmp_path, monkeypatch):
    import os
    import threading

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    outcome = []

    def load():
        try:
            TuningDB.load(fifo)
        except DatabaseError as exc:
            outcome.append(str(exc))

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # release the reader blocked in open() before failing
        with open(fifo, "w"):
            pass
        reader.join(10)
        pytest.fail("reading a FIFO blocked")
    assert outcome and "not a regular file" in outcome[0]
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    with pytest.raises(DatabaseError, match="not a regular file"):
        TuningDB.load(zero)
    import autonorm.db

    big = tmp_path / "big.json"
    big.write_text(_text())
    monkeypatch.setattr(autonorm.db, "MAX_DATABASE_BYTES", 100)
    with pytest.raises(DatabaseError, match="larger than"):
        TuningDB.load(big)


# --- saving and merging --------------------------------------------------------------------------------------
def test_save_interrupted_mid_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    import autonorm.db

    path = tmp_path / "db.json"
    sample_db(1).save(path)
    before = path.read_bytes()
    real_dump = json.dump

    def dump_then_fail(obj, f, **kw):  # a full disk halfway through the file
        text = json.dumps(obj, **kw)
        f.write(text[: len(text) // 2])
        f.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(autonorm.db.json, "dump", dump_then_fail)
    with pytest.raises(OSError, match="No space"):
        sample_db(3).save(path)
    monkeypatch.setattr(autonorm.db.json, "dump", real_dump)
    assert path.read_bytes() == before
    assert len(TuningDB.load(path).records) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".autonorm-journal", "db.json"]  # no temp file left


def test_save_and_merge_refuse_to_mix_devices(tmp_path, capsys):
    mine, other = tmp_path / "mine.json", tmp_path / "other.json"
    sample_db(1).save(mine)
    theirs = TuningDB({**DEVICE, "slug": "other-cpu"}, VERSIONS, {})
    theirs.upsert(record(hidden=77))
    theirs.save(other)
    before = mine.read_bytes()
    with pytest.raises(DatabaseError, match="other-cpu.*test-cpu|test-cpu.*other-cpu"):
        theirs.save(mine)
    assert cli_main(["db", "merge", str(other), "-o", str(mine)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("autonorm db: error: ") and "other-cpu" in err
    assert mine.read_bytes() == before


def _with(rec, **changes):
    rec = copy.deepcopy(rec)
    for name, value in changes.items():
        if name == "us":
            rec.winner.median_us = value
        else:
            setattr(rec, name, value)
    return rec


def test_merge_chooses_by_provenance_and_time_never_by_file_order(tmp_path):
    from autonorm.backends import get_backend

    current = get_backend("torch").template_hash()
    base = record(hidden=64)
    cases = [  # (a, b, expected winner): each merged both ways
        (_with(base, template_hash=current, us=9.0), _with(base, template_hash=current, us=5.0), "b"),  # faster
        (_with(base, template_hash=current, us=9.0), _with(base, template_hash="old", us=1.0), "a"),  # current hash
        (_with(base, template_hash="old1", us=1.0, date="2026-01-01T00:00:00+00:00"),
         _with(base, template_hash="old2", us=9.0, date="2026-03-01T00:00:00+00:00"), "b"),  # newer tuning
        (_with(base, template_hash=current, us=5.0, date="2026-01-01T00:00:00+00:00"),
         _with(base, template_hash=current, us=5.0, date="2026-03-01T00:00:00+00:00"), "b"),  # tie: newer
    ]
    for a, b, expected in cases:
        want = (a if expected == "a" else b).to_json()
        for first, second in ((a, b), (b, a)):
            x, y = TuningDB(DEVICE, VERSIONS, {}), TuningDB(DEVICE, VERSIONS, {})
            x.upsert(first)
            y.upsert(second)
            x.save(tmp_path / "x.json")
            y.save(tmp_path / "y.json")
            out = tmp_path / "out.json"
            assert cli_main(["db", "merge", str(tmp_path / "x.json"), str(tmp_path / "y.json"), "-o", str(out)]) == 0
            assert TuningDB.load(out).records[base.key].to_json() == want
            out.unlink()


def test_merge_help_states_the_rule(capsys):
    assert cli_main(["db", "merge", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "faster" in text and "template hash" in text and "newer" in text


def test_show_escapes_control_characters_of_the_name(tmp_path, capsys):
    db = TuningDB({**DEVICE, "name": "\x1b[2Jcleared"}, VERSIONS, {})
    db.save(tmp_path / "esc.json")
    assert cli_main(["db", "show", str(tmp_path / "esc.json")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2Jcleared" in out


PROFILE = {"arch": "sm_90", "registers": 40, "spill_bytes": 0, "smem": 0, "threads": 256, "blocks_per_sm": 8,
           "occupancy": 1.0, "load_share_128": 1.0}


def test_winner_profile_round_trips_and_is_validated(tmp_path, capsys):
    """A record may keep its winner's audit profile; one outside the schema's domain refuses the file."""
    db = sample_db(1)
    key = next(iter(db.records))
    db.records[key].profile = dict(PROFILE)
    path = tmp_path / "db.json"
    db.save(path)
    assert TuningDB.load(path).records[key].profile == PROFILE
    assert cli_main(["db", "show", str(path)]) == 0
    assert "sm_90: 40 regs, 0 B spilled, 100% occupancy" in capsys.readouterr().out
    doc = json.loads(path.read_text())
    doc["records"][0]["profile"]["registers"] = 300  # more than a thread can have
    path.write_text(json.dumps(doc))
    with pytest.raises(DatabaseError, match="registers"):
        TuningDB.load(path)


@pytest.mark.parametrize("backend, modules", [("cupy", ["cupy.py", "cupy_config.py"]),
                                              ("numba", ["numba_cuda.py", "numba_cuda_config.py"])])
def test_a_backends_template_hash_covers_its_config_module(monkeypatch, backend, modules):
    """A record is stale when the code that shapes its kernel changes: a backend's geometry lives in its config
    module, apart from the launcher, and both are hashed with the templates."""
    import autonorm.backends.base as base
    from autonorm.backends import get_backend

    hashed = []
    monkeypatch.setattr(base, "template_hash", lambda folder, *files: hashed.extend(files) or "h")
    get_backend(backend).template_hash()
    assert sorted(p.rsplit("/", 1)[-1] for p in hashed) == modules
