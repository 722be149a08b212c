"""What an adversarial run found: a broken or planted compile cache, storage paths that would destroy
a database, a journal cut by a full disk, and the tuner's claim lock (two workers never time one config)."""
import json
import os
import threading
import time
import warnings

import pytest

from autonorm.backends import base
from autonorm.render import Source

# --- the compile cache ------------------------------------------------------------------------------------


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """A cache folder of this test, and no fallback folder left from an earlier test."""
    monkeypatch.setenv("AUTONORM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(base, "_fallback_cache", None)
    return tmp_path / "cache"


def _source(value):
    return Source.of(f"VALUE = {value!r}\n", "unit")


def _forget(source, folder):
    import sys

    sys.modules.pop(f"autonorm_{folder}_{source.sha256[:24]}", None)


def test_planted_cache_file_is_discarded_and_regenerated(fresh_cache):
    source = _source(42)
    assert base.import_generated(source, "unit").VALUE == 42
    path = fresh_cache / "unit" / f"{source.sha256}.py"
    path.write_text("VALUE = 666  # planted: not the source its name is the hash of\n")
    _forget(source, "unit")
    assert base.import_generated(source, "unit").VALUE == 42
    assert path.read_text() == source.text


def test_planted_fifo_or_device_in_the_cache_never_blocks(fresh_cache):
    source = _source("fifo")
    folder = fresh_cache / "unit"
    folder.mkdir(parents=True)
    os.mkfifo(folder / f"{source.sha256}.py")
    other = _source("zero")
    (folder / f"{other.sha256}.py").symlink_to("/dev/zero")
    result = []
    worker = threading.Thread(target=lambda: result.extend(
        [base.import_generated(source, "unit").VALUE, base.import_generated(other, "unit").VALUE]), daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():
        with open(folder / f"{source.sha256}.py", "w"):  # unblock the reader before failing
            pass
        pytest.fail("importing from the cache blocked on a FIFO")
    assert result == ["fifo", "zero"]


def test_unusable_cache_dir_falls_back_with_one_warning(fresh_cache):
    fresh_cache.parent.mkdir(exist_ok=True)
    fresh_cache.write_text("a file where the cache folder should be")
    with pytest.warns(RuntimeWarning, match="AUTONORM_CACHE_DIR") as caught:
        assert base.import_generated(_source(1), "unit").VALUE == 1
    assert len([w for w in caught if "autonorm" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not once per kernel
        assert base.import_generated(_source(2), "unit").VALUE == 2


# --- tuning storage ------------------------------------------------------------------------------------------
def _journal_with_trials(path, n=3):
    import optuna

    from autonorm.tune import make_storage

    study = optuna.create_study(storage=make_storage(str(path), path), study_name="s")
    for i in range(n):
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=float(i)))


def test_storage_refuses_a_database_or_any_non_journal_file(tmp_path):
    pytest.importorskip("optuna")
    from autonorm.errors import AutonormError
    from autonorm.tune import make_storage

    db = tmp_path / "cpu.json"
    db.write_text(json.dumps({"schema_version": 1, "records": []}))
    before = db.read_bytes()
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for path, why in ((db, "tuning database"), (notes, "not an Optuna journal"),
                      (tmp_path / "new.json", "tuning database"), (tmp_path, "not a regular file")):
        with pytest.raises(AutonormError, match=why) as info:
            make_storage(str(path), tmp_path / "unused.journal")
        assert str(path) in str(info.value)
    assert db.read_bytes() == before and notes.read_text() == "my notes\n"
    journal = tmp_path / "study.journal"
    _journal_with_trials(journal)  # a fresh path, then an existing journal, are accepted
    make_storage(str(journal), journal)


def test_journal_cut_by_a_full_disk_is_repaired(tmp_path):
    optuna = pytest.importorskip("optuna")
    from autonorm.tune import make_storage

    journal = tmp_path / "study.journal"
    _journal_with_trials(journal, 3)
    with open(journal, "ab") as f:
        f.write(b'{"op_code": 5, "worker_id": "x", "trial_id": 0, "us')  # the write the disk refused
    with pytest.warns(RuntimeWarning, match="study.journal"):
        storage = make_storage(str(journal), journal)
    study = optuna.load_study(study_name="s", storage=storage)
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=9.0))
    later = optuna.load_study(study_name="s", storage=make_storage(str(journal), journal))
    assert [t.value for t in later.trials] == [0.0, 1.0, 2.0, 9.0]


def test_journal_broken_in_the_middle_is_named(tmp_path):
    pytest.importorskip("optuna")
    from autonorm.errors import AutonormError
    from autonorm.tune import make_storage

    journal = tmp_path / "study.journal"
    _journal_with_trials(journal, 2)
    lines = journal.read_bytes().splitlines(keepends=True)
    lines.insert(1, b'{"op_code": 5, "wor\n')
    journal.write_bytes(b"".join(lines))
    with pytest.raises(AutonormError, match=r"study.journal.*line 2"):
        make_storage(str(journal), journal)


# --- the tuner's claim lock -------------------------------------------------------------------------------
def test_two_workers_claiming_at_once_never_time_one_config(tmp_path, monkeypatch):
    """Two workers sample with the same seed (the same proposals) and read the study at the same moment;
    only the claim lock keeps the second from timing the candidate the first just took."""
    pytest.importorskip("optuna")
    import test_tuner as tt

    from autonorm import backends as registry
    from autonorm.tune import StudyOptions, StudyRunner, make_storage

    # The worker that does not finalize reads the other's record back from the study, through the registry.
    monkeypatch.setitem(registry.BACKENDS, "fake", "test_tuner:FakeBackend")
    monkeypatch.setitem(registry._instances, "fake", tt.FakeBackend())

    class SlowClaim(StudyRunner):
        def _ask(self, *args, **kw):
            time.sleep(0.15)  # widen the window between reading the study and claiming a candidate
            return super()._ask(*args, **kw)

    timed, results, errors = [], [], []
    storage = make_storage(None, tmp_path / "study.journal")

    def work():
        timer = tt.FakeTimer()
        timer.timed = timed  # one list for both workers (appends are atomic)
        try:
            options = StudyOptions(trials=8, time_budget=120, compile_baseline=False, compile_workers=1)
            results.append(SlowClaim(tt.SPEC, tt.ROWS, tt.backends(with_torch=False), timer, options, storage=storage,
                                     name="race", lock_path=tmp_path / "claims.lock").run())
        except Exception as exc:  # a thread's exception is otherwise only a warning
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(180)
    assert not errors, errors
    assert len(results) == 2 and all(r.record is not None or r.finalized_by for r in results)
    configs = [c for c in timed if c != "torch"]
    assert len(configs) >= 4
    assert len(configs) == len(set(configs)), f"a config was timed twice: {configs}"



# --- the reliability script's crafted databases -------------------------------------------------------------
def test_every_crafted_database_of_the_reliability_script_loads_or_is_refused_clearly(tmp_path):
    import importlib.util
    from pathlib import Path

    from autonorm.db import TuningDB
    from autonorm.errors import DatabaseError

    script = Path(__file__).resolve().parents[1] / "scripts" / "reliability.py"
    spec = importlib.util.spec_from_file_location("reliability_script", script)
    reliability = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reliability)
    outcomes = {}
    for name, make in reliability.crafted_databases().items():
        if make == "fifo":
            continue  # tests/test_db.py reads a FIFO in a thread that can be released if it blocks
        path = reliability.place(tmp_path, name, make)
        try:
            TuningDB.load(path)
            outcomes[name] = "loaded"
        except DatabaseError as exc:
            assert path.name in str(exc), (name, str(exc)[:200])
            outcomes[name] = "refused"
    assert outcomes["valid"] == "loaded" and outcomes["a link to /dev/zero"] == "refused"
    assert len(outcomes) >= 60 and list(outcomes.values()).count("refused") >= 40
