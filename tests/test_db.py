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
    "config for torch": (lambda o: o["records"][0]["runners_up"][0]["config"].update(x=1), "refused by backend 'torch'"),
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


def test_merge_and_upsert_later_wins():
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
