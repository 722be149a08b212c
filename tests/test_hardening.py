"""Edges a new user and an adversarial run hit: work lost to a wrong path, figures that mislead, memory,
tracebacks where one line says it, and the database's and the fleet's edges."""
import json
import os
from pathlib import Path

import pytest

from autonorm import settings

# --- folders from the environment ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "  ", "relative/cache"])
def test_an_empty_or_relative_xdg_cache_home_counts_as_unset(monkeypatch, value):
    monkeypatch.delenv("AUTONORM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", value)
    assert settings.cache_dir() == Path.home() / ".cache" / "autonorm"


def test_a_relative_autonorm_cache_dir_is_ignored_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("AUTONORM_CACHE_DIR", "autonorm")  # from the project root: the package folder
    with pytest.warns(RuntimeWarning, match="AUTONORM_CACHE_DIR='autonorm' is a relative path"):
        assert settings.cache_dir() == tmp_path / "autonorm"
    monkeypatch.setenv("AUTONORM_CACHE_DIR", str(tmp_path / "mine"))
    assert settings.cache_dir() == tmp_path / "mine"


def test_the_user_database_folder_follows_the_same_rule(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", "relative")
    monkeypatch.setenv("AUTONORM_USER_DB_DIR", "")
    assert settings.user_db_dir() == Path.home() / ".local" / "share" / "autonorm"
    monkeypatch.setenv("AUTONORM_USER_DB_DIR", "db")
    with pytest.warns(RuntimeWarning, match="AUTONORM_USER_DB_DIR"):
        assert settings.user_db_dir() == Path.home() / ".local" / "share" / "autonorm"


# --- memory: the copy-bandwidth probe ---------------------------------------------------------------------


def test_the_copy_probe_is_capped_by_size_and_by_the_memory_left():
    from autonorm import measure

    big_l3 = 480 << 20  # a VM reporting a 480 MiB L3 made each buffer 1.9 GB (4.2 GB peak with randn)
    assert measure.probe_bytes(big_l3, None) == measure.PROBE_MAX_BYTES
    assert measure.probe_bytes(big_l3, 2 << 30) == (2 << 30) // measure.PROBE_MEMORY_SHARE  # a 2 GiB container
    assert measure.probe_bytes(8 << 20, 64 << 30) == 64 << 20  # a small cache: 64 MiB, as before
    available = measure.available_memory()
    assert available is None or available > 0


def test_the_copy_probe_stops_sampling_at_its_time_limit(monkeypatch):
    from autonorm import measure

    clock = iter(range(0, 10_000, 10))  # every reading 10 s after the last
    monkeypatch.setattr(measure.time, "perf_counter", lambda: float(next(clock)))
    sampled = []
    real_median = measure.statistics.median
    monkeypatch.setattr(measure.statistics, "median", lambda xs: sampled.append(len(xs)) or real_median(xs))
    assert measure.copy_bandwidth("cpu", nbytes=1 << 20, reps=1000, max_s=1.0) > 0
    assert sampled == [5]  # the minimum after 3 fault-in copies, not 1,000


# --- bench: outputs, inputs, figures ----------------------------------------------------------------------


def _tiny_bench(*extra):
    return ["bench", "--shapes", "17x64", "--dtypes", "fp32", "--ops", "rmsnorm", "--directions", "fwd",
            "--providers", "torch", "--reps", "2", "--warmup", "1", "--copy-bw", "10", *extra]


def test_bench_makes_the_json_folder_before_measuring(tmp_path):
    from autonorm import cli

    out = tmp_path / "rep" / "sub" / "bench.json"  # a folder that does not exist yet
    assert cli.main(_tiny_bench("--json", str(out))) == 0
    assert [r["case"] for r in json.loads(out.read_text())["rows"]] == ["rmsnorm.fwd float32 17x64"]


def test_bench_refuses_an_unwritable_json_path_before_measuring(tmp_path, monkeypatch, capsys):
    from autonorm import cli
    from autonorm.bench import run

    monkeypatch.setattr(run, "run_cases", lambda *a, **k: pytest.fail("measured before checking --json"))
    (tmp_path / "file").write_text("")
    assert cli.main(_tiny_bench("--json", str(tmp_path / "file" / "bench.json"))) == 2
    assert "--json" in capsys.readouterr().err
    assert cli.main(_tiny_bench("--json", str(tmp_path))) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"not json at all", b"{}", b"", b"\x89PNG\r\n\x1a\n\x00\xff",
                                     b'{"rows": [1]}', b'{"rows": [{"case": "x"}]}'])
def test_bench_input_that_is_not_bench_rows_is_one_line(tmp_path, capsys, content):
    from autonorm import cli

    bad = tmp_path / "in.json"
    bad.write_bytes(content)
    assert cli.main(["bench", "--report", str(tmp_path / "out"), "--input", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"autonorm bench: error: {bad}: ") and err.count("\n") == 1


def test_bench_input_dev_null_and_a_missing_file(tmp_path, capsys):
    from autonorm import cli

    for path in ("/dev/null", str(tmp_path / "missing.json")):
        assert cli.main(["bench", "--report", str(tmp_path / "out"), "--input", path]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"autonorm bench: error: {path}: ") and err.count("\n") == 1


def test_a_cache_resident_cell_is_labelled_never_a_share_of_dram_copy(monkeypatch):
    import torch

    from autonorm.bench import run
    from autonorm.spec import NormSpec

    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 64)
    timer = run.timer_for(torch.device("cpu"), 2, 1)
    rows, _ = run.case_rows(spec, 17, torch.device("cpu"), timer, ["torch"], 10.0, {"slug": "cpu-test"})
    assert rows[0]["cache_resident"] is True and rows[0]["pct_copy_bw"] is None
    assert "cache" in run.format_row(rows[0])
    # Beating the copy probe means a cache served the bytes, whatever the footprint: on a GPU too.
    assert run.cache_resident(torch.device("cuda"), 1 << 40, gbps=7.43, copy_gbps=1.0)
    assert not run.cache_resident(torch.device("cuda"), 1 << 40, gbps=0.9, copy_gbps=1.0)
    monkeypatch.setattr(run.measure, "llc_bytes", lambda: 1 << 20)
    assert not run.cache_resident(torch.device("cpu"), 4 << 20, gbps=0.9, copy_gbps=1.0)


def _report_row(n, pct, resident=None):
    from autonorm.spec import NormSpec

    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", n)
    row = {"case": f"rmsnorm.fwd float32 4096x{n}", "impl": "autonorm[numba-cpu]", "provider": "autonorm",
           "spec": spec.to_dict(), "rows": 4096, "median_us": 10.0, "p20_us": 10.0, "p80_us": 10.0,
           "gbps": pct / 10, "pct_copy_bw": pct, "device": "cpu-x"}
    if resident is not None:
        row.update(cache_resident=resident, pct_copy_bw=None if resident else pct)
    return row


def test_the_report_labels_cache_cells_and_leaves_them_out_of_the_goals(tmp_path):
    from autonorm.bench import report

    rows = [_report_row(1024, 151.0), _report_row(2048, 743.0, resident=True), _report_row(4096, 95.0)]
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"device": {"slug": "cpu-x"}, "copy_bandwidth_gbps": 10.0, "rows": rows}))
    written = report.write_report([str(path)], str(tmp_path / "out"))
    md = Path(written[0]).read_text()
    assert "| 1024 | 4096 | 15 (cache) |" in md and "| 2048 | 4096 | 74 (cache) |" in md  # an old file's 151%
    assert "| 4096 | 4096 | 10 (95%) |" in md
    assert "| fwd ≥ 90% of copy bandwidth, N ≥ 1024 | 1/1 cells; 2 cache-resident cells not counted | yes |" in md
    assert "743%" not in md and "151%" not in md


def test_a_compile_inside_the_timed_region_drops_that_figure(monkeypatch):
    import itertools

    import torch

    from autonorm.bench import providers, run
    from autonorm.spec import NormSpec

    def recompiling(spec, sets, device):
        # A new Python int per call: a guard fails and Dynamo compiles again on every call.
        f = torch.compile(lambda x, w, k: torch.nn.functional.rms_norm(x, (x.shape[-1],), w, providers.EPS) + 0 * k,
                          backend="eager", dynamic=False)
        calls = itertools.count()
        return "torch.compile", (lambda i: f(sets[i]["x"], sets[i]["w"], next(calls))), None

    monkeypatch.setitem(providers.PROVIDERS, "torch.compile", providers.Provider(recompiling, "a fake"))
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 64)
    timer = run.measure.CpuTimer(warmup_s=0.0, warmup_calls=1, min_reps=2, max_reps=2, max_sets=2)
    # Dynamo's own patch, not monkeypatch: undoing a setattr deletes the key, which hides it from every later
    # compile in the process ("torch._dynamo.config.recompile_limit does not exist").
    try:
        with torch._dynamo.config.patch(recompile_limit=10_000):
            rows, notes = run.case_rows(spec, 17, torch.device("cpu"), timer, ["torch", "torch.compile"], 10.0,
                                        {"slug": "cpu-test"})
    finally:
        torch._dynamo.reset()
    assert [r["impl"] for r in rows] == ["torch"] and rows[0]["speedup_vs_compile"] is None
    assert "inside the timed region" in notes["torch.compile"]


# --- tune: --out, Ctrl-C ----------------------------------------------------------------------------------


def _tiny_tune(out, *extra):
    return ["tune", "--ops", "rmsnorm", "--directions", "fwd", "--dtypes", "fp32", "--hidden", "64,96", "--rows", "8",
            "--trials", "2", "--backends", "torch", "--no-compile-baseline", "--no-progress", "--out", str(out),
            *extra]


@pytest.mark.parametrize("name", ["existing-file", "mydb.json"])
def test_tune_out_must_be_a_folder(tmp_path, monkeypatch, capsys, name):
    from autonorm import cli, measure

    monkeypatch.setattr(measure, "copy_bandwidth", lambda *a, **k: pytest.fail("probed before checking --out"))
    out = tmp_path / name
    if name == "existing-file":
        out.write_text("keep me")
    assert cli.main(_tiny_tune(out)) == 2
    assert "--out names a folder" in capsys.readouterr().err
    assert not out.exists() or out.read_text() == "keep me"  # no folder called mydb.json, the file intact


def test_ctrl_c_inside_the_journal_lock_is_a_clean_interruption(tmp_path, monkeypatch, capsys):
    from autonorm import cli, measure, tune

    monkeypatch.setattr(measure, "copy_bandwidth", lambda *a, **k: 10.0)
    real_run, calls = tune.StudyRunner.run, []

    def interrupted_in_the_lock(self):
        calls.append(self.spec.hidden)
        if len(calls) == 2:
            try:  # what Optuna's lock does: Ctrl-C in acquire, then its release finds no lock file
                raise KeyboardInterrupt
            except BaseException:
                os.rename(tmp_path / "x.optuna.journal.lock", tmp_path / "renamed")
        return real_run(self)
    monkeypatch.setattr(tune.StudyRunner, "run", interrupted_in_the_lock)
    assert cli.main(_tiny_tune(tmp_path / "db")) == 130
    err = capsys.readouterr().err
    assert "interrupted after 1 of 2 studies" in err and "Run the same command again to resume" in err
    assert "Traceback" not in err


# --- tuning databases -------------------------------------------------------------------------------------


def _db_doc():
    from autonorm.config import NoConfig
    from autonorm.db import Entry, Record, RecordKey, TuningDB
    from autonorm.spec import NormSpec

    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 64)
    entry = Entry("torch", NoConfig(), 10.0, 9.0, 11.0, 100.0, 50.0)
    rec = Record(RecordKey.of(spec, 1024), entry, [], {"torch_eager": {"median_us": 20.0, "p20_us": 19.0,
                                                                         "p80_us": 21.0}, "torch_compile": None},
                 "torch-2.0", 12, 1, "2026-01-01T00:00:00+00:00",
                 quality={"confidence": "low", "spread": 1.37, "attempts": 3, "problems": ["noisy"],
                          "load": "load average 7.9 on 2 cores"})
    db = TuningDB({"name": "Test CPU", "slug": "test-cpu", "kind": "cpu", "compute_capability": None,
                   "sm_count": 2, "l2_bytes": 0, "copy_gbps": 20.0}, {"autonorm": "0.1.0", "torch": "2.0"},
                  {"timer": "test"}, {rec.key: rec})
    return db.to_json()


def _dubious(tmp_path, name):
    doc = _db_doc()
    key = doc["records"][0]["key"]
    text = None
    if name == "slug-newline":
        doc["device"]["slug"] = "test-cpu\n"
    elif name == "hidden-float":
        key["hidden"] = 64.0
    elif name == "rows-bucket-3":
        key["rows_bucket"] = 3
    elif name == "feature-twice":
        key["features"] = "weight+weight"
    elif name == "duplicated-key":  # two `hidden` keys: which one counts depends on the parser
        text = json.dumps(doc).replace('"hidden": 64', '"hidden": 64, "hidden": 128')
    path = tmp_path / f"{name}.json"
    path.write_text(text or json.dumps(doc))
    return path


@pytest.mark.parametrize("name", ["slug-newline", "hidden-float", "rows-bucket-3", "feature-twice",
                                  "duplicated-key"])
def test_db_validate_refuses_the_dubious_files(tmp_path, capsys, name):
    from autonorm import cli

    assert cli.main(["db", "validate", str(_dubious(tmp_path, "clean"))]) == 0
    capsys.readouterr()
    assert cli.main(["db", "validate", str(_dubious(tmp_path, name))]) == 1
    assert "INVALID" in capsys.readouterr().err


def test_normspec_hidden_is_exactly_an_int():
    from autonorm.spec import NormSpec

    class Sneaky(int):
        def __str__(self):
            return "64; import os"

    with pytest.raises(ValueError, match="hidden size"):
        NormSpec("rmsnorm", "fwd", "float32", "float32", Sneaky(64))
    with pytest.raises(ValueError, match="hidden size"):
        NormSpec("rmsnorm", "fwd", "float32", "float32", True)
    assert NormSpec("rmsnorm", "fwd", "float32", "float32", 64).hidden == 64


def test_db_show_flags_low_confidence_records(tmp_path, capsys):
    from autonorm import cli

    path = _dubious(tmp_path, "clean")
    assert cli.main(["db", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[LOW CONFIDENCE: noisy measurements, spread 1.37, load average 7.9 on 2 cores]" in out


def test_db_show_and_validate_without_a_path_act_on_the_listed_databases(tmp_path, monkeypatch, capsys):
    from autonorm import cli

    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.setenv("AUTONORM_USER_DB_DIR", str(user))
    monkeypatch.delenv("AUTONORM_DB_PATH", raising=False)
    monkeypatch.setattr("autonorm.db_sources._shipped", lambda: [])
    assert cli.main(["db", "validate"]) == 1  # nothing listed: said so, not a usage error
    assert "no databases here" in capsys.readouterr().err
    (user / "test-cpu.json").write_text(json.dumps(_db_doc()))
    assert cli.main(["db", "show"]) == 0
    assert "device: Test CPU (test-cpu" in capsys.readouterr().out
    assert cli.main(["db", "validate"]) == 0
    assert f"{user / 'test-cpu.json'}: OK" in capsys.readouterr().out


def test_db_exit_status_usage_2_bad_data_1(tmp_path, capsys):
    from autonorm import cli

    assert cli.main(["db", "show", "--bogus"]) == 2
    (tmp_path / "bad.json").write_text("{")
    assert cli.main(["db", "show", str(tmp_path / "bad.json")]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith("autonorm db: error: ")


# --- the journal: a trial re-queued after the budget is spent ------------------------------------------


def test_a_trial_requeued_after_the_budget_is_spent_never_stays_waiting(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys
    from dataclasses import dataclass
    from typing import ClassVar

    import optuna
    from fakes import FakeBackendBase, ScriptedTimer
    from optuna.trial import TrialState

    from autonorm.backends.torch_eager import TorchBackend
    from autonorm.config import Config, knob
    from autonorm.spec import NormSpec
    from autonorm.tune import Candidate, StudyOptions, StudyRunner, make_storage

    @dataclass(frozen=True)
    class EightConfig(Config):
        backend: ClassVar[str] = "fake"
        a: int = knob(tuple(range(1, 9)))

    class Eight(FakeBackendBase):
        config_cls = EightConfig

        def build(self, source, spec, config, device):
            return TorchBackend().build(None, spec, None, device)

    from autonorm import backends as registry

    # A second run reads its record back from the study, through the registry.
    monkeypatch.setitem(registry.BACKENDS, "fake", "test_hardening:unused")
    monkeypatch.setitem(registry._instances, "fake", Eight())
    storage = make_storage(None, tmp_path / "s.journal")

    def runner():
        return StudyRunner(NormSpec("rmsnorm", "fwd", "float32", "float32", 64), 16, {"fake": Eight()},
                           ScriptedTimer(), StudyOptions(trials=3, time_budget=600, compile_baseline=False),
                           storage=storage, name="budget")

    runner().run()  # the budget of 3 candidates is spent
    study = optuna.load_study(study_name="budget", storage=storage)
    timed = {t.user_attrs["candidate"] for t in study.get_trials() if t.state == TrialState.COMPLETE}
    assert len(timed) == 3
    # A worker of this host killed (kill -9) while it timed a fourth candidate: its trial stays RUNNING.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    space = runner().space
    untimed = next(c for c in (Candidate("fake", EightConfig(a)) for a in range(1, 9)) if c.key not in timed)
    study.enqueue_trial(space.params(untimed))
    trial = study.ask()
    space.suggest(trial)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    trial.set_user_attr("candidate", untimed.key)
    runner().run()  # the same command again: the dead trial is failed, and nothing waits on a spent budget
    states = [t.state for t in optuna.load_study(study_name="budget", storage=storage).get_trials()]
    assert TrialState.WAITING not in states and TrialState.RUNNING not in states
    assert sum(s == TrialState.COMPLETE for s in states) == 3


# --- a PostgreSQL outage during a fleet run ---------------------------------------------------------------
POSTGRES_URL = os.environ.get("AUTONORM_TEST_POSTGRES_URL")


class _Proxy:
    """A TCP proxy on localhost in front of the PostgreSQL server: `down()` refuses new connections and cuts
    the open ones (an outage), `up()` serves again on the same port."""

    def __init__(self, target: tuple[str, int]):
        import socket

        self.target, self.conns, self.listener = target, [], None
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.up()

    def up(self):
        import socket
        import threading

        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener):
        import socket
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # down()
            server = socket.create_connection(self.target)
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def down(self):
        import socket

        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self.listener.close()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        self.conns = []


@pytest.fixture
def postgres_behind_a_proxy():
    """(storage URL through a proxy, the proxy) on a fresh database, dropped afterwards."""
    if not POSTGRES_URL:
        pytest.skip("AUTONORM_TEST_POSTGRES_URL is not set (.ci/run starts a server)")
    psycopg = pytest.importorskip("psycopg")
    import uuid
    from urllib.parse import urlsplit

    name = f"autonorm_outage_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(POSTGRES_URL)
    proxy = _Proxy((parts.hostname, parts.port or 5432))
    user = f"{parts.username}@" if parts.username else ""
    yield f"postgresql://{user}127.0.0.1:{proxy.port}/{name}", proxy
    proxy.down()
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask and tell here, not Study.optimize
def test_a_postgres_outage_is_waited_out_then_named_in_one_line(postgres_behind_a_proxy, monkeypatch, caplog):
    import threading

    import optuna

    from autonorm.tune import make_storage, outage
    from autonorm.tune.fleet import claim_lock

    url, proxy = postgres_behind_a_proxy
    storage = make_storage(url, Path("unused"), heartbeat_s=1)
    study = optuna.create_study(storage=storage, study_name="outage", direction="minimize")
    study.tell(study.ask(), 1.0)
    monkeypatch.setattr(outage, "RETRY_FIRST_S", 0.05)
    proxy.down()  # an outage shorter than the bound: the call waits it out
    threading.Timer(1.0, proxy.up).start()
    with claim_lock(storage, "outage"):
        study.tell(study.ask(), 2.0)
    assert [t.value for t in study.get_trials()] == [1.0, 2.0]
    assert "retrying" in caplog.text
    # An outage past the bound: one error naming the storage and the connection error; the CLI prints one line.
    monkeypatch.setattr(outage, "STORAGE_OUTAGE_S", 1.0)
    proxy.down()
    with pytest.raises(outage.StorageUnavailableError) as info:
        study.ask()
    message = str(info.value)
    assert f"127.0.0.1:{proxy.port}" in message and "refused" in message.lower()
    assert "run the same command again to resume" in message and "\n" not in message
    assert "exceeding max length" not in message


def test_the_outage_error_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    from autonorm import cli
    from autonorm.tune.outage import StorageUnavailableError

    def outage(*args, **kwargs):
        raise StorageUnavailableError("storage 'db:5432/x' unreachable for 120 s (connection refused); "
                                            "nothing is lost: run the same command again to resume")
    monkeypatch.setattr("autonorm.tune.tune_grid", outage)
    monkeypatch.setattr("autonorm.measure.copy_bandwidth", lambda *a, **k: 10.0)
    assert cli.main(_tiny_tune(tmp_path / "db")) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("autonorm tune: error: storage 'db:5432/x' unreachable")
    assert "Traceback" not in err


def test_a_trial_failed_by_heartbeat_while_its_worker_times_it_does_not_end_the_worker(tmp_path, monkeypatch):
    from fakes import ScriptedTimer
    from optuna.trial import TrialState

    from autonorm.backends.torch_eager import TorchBackend
    from autonorm.measure import Timing
    from autonorm.spec import NormSpec
    from autonorm.tune import StudyOptions, StudyRunner, make_storage

    storage = make_storage(None, tmp_path / "s.journal")
    holder = {}

    class StalledTimer(ScriptedTimer):
        def measure(self, spec, kernel, rows):
            # While this worker times, the others fail its trial (its beats stopped during an outage).
            study = holder["study"]
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            return Timing(10.0, 9.9, 10.1, 10)

    class Runner(StudyRunner):
        def _study(self):
            holder["study"] = super()._study()
            return holder["study"]

    result = Runner(NormSpec("rmsnorm", "fwd", "float32", "float32", 64), 16, {"torch": TorchBackend()},
                    StalledTimer(), StudyOptions(trials=2, time_budget=30, compile_baseline=False), storage=storage,
                    name="stalled").run()
    assert result.record is None  # its only candidate's result was dropped, the worker did not crash


def test_tuner_figures_above_the_copy_probe_say_cache(tmp_path, capsys):
    from autonorm import cli
    from autonorm.cli.tune import _pct_copy

    assert [_pct_copy(p) for p in (None, 64.4, 100.0, 743.0)] == ["-", "64", "100", "cache"]
    doc = _db_doc()
    doc["records"][0]["winner"]["pct_copy_bw"] = 743.0  # a shape that fits in the cache, over a DRAM probe
    (tmp_path / "db.json").write_text(json.dumps(doc))
    assert cli.main(["db", "show", str(tmp_path / "db.json")]) == 0
    out = capsys.readouterr().out
    assert "cache-resident (faster than the DRAM copy probe)" in out and "743%" not in out
