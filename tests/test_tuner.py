"""The tuner with a fake backend and a fake timer of known optimum, resume, workers, and `autonorm tune` end to end.

Run as a script (`python tests/test_tuner.py worker JOURNAL NAME SLEEP`) this file is
one tuning worker on the fake space: the resume and two-worker tests start it.
"""
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from fakes import FakeBackendBase

from autonorm.backends.torch_eager import TorchBackend
from autonorm.config import Config, knob
from autonorm.measure import Timing
from autonorm.spec import NormSpec
from autonorm.tune import STARTUP_TRIALS, Candidate, SearchSpace, StudyOptions, StudyRunner, make_storage
from autonorm.verify import check_candidate

SPEC = NormSpec("rmsnorm", "fwd", "float32", "float32", 64)
ROWS = 16
OPTIMUM = (8, 3)
TORCH_US = 20.0


@dataclass(frozen=True)
class FakeConfig(Config):
    backend: ClassVar[str] = "fake"
    a: int = knob((1, 2, 4, 8, 16, 32))
    b: int = knob((1, 2, 3, 4, 5, 6))

    @classmethod
    def is_valid(cls, spec, config):
        return "a*b > 64" if config.a * config.b > 64 else None


def cost(config: FakeConfig, shift=0.0) -> float:
    """Known landscape: minimum 10 us at OPTIMUM, smooth around it."""
    return 10.0 + shift + (math.log2(config.a) - math.log2(OPTIMUM[0])) ** 2 + (config.b - OPTIMUM[1]) ** 2


class FakeBackend(FakeBackendBase):
    """Correct kernels (torch underneath) except: b == 6 computes a wrong result, a == 32 fails to compile."""

    config_cls = FakeConfig

    def build(self, source, spec, config, device):
        if config.a == 32:
            raise RuntimeError("ptxas: too many resources requested")
        inner = TorchBackend().build(None, spec, None, device)

        def kernel(*args):
            y, h, mean, rstd = inner(*args)
            return (y * 2 if config.b == 6 else y), h, mean, rstd
        kernel.config = config
        return kernel


class FakeTimer:
    """Times a kernel by its config's known cost (torch: TORCH_US); counts what it timed."""

    def __init__(self, shift=0.0, sleep=0.0):
        self.shift, self.sleep, self.timed = shift, sleep, []

    def _cost(self, kernel):
        config = getattr(kernel, "config", None)
        return cost(config, self.shift) if config is not None else TORCH_US

    def measure(self, spec, kernel, rows):
        time.sleep(self.sleep)
        self.timed.append(getattr(kernel, "config", "torch"))
        us = self._cost(kernel)
        return Timing(us, us * 0.95, us * 1.05, 10)

    def interleaved(self, spec, kernels, rows):
        return [Timing(self._cost(k), self._cost(k) * 0.95, self._cost(k) * 1.05, 10) for k in kernels]

    def describe(self):
        return {"timer": "fake"}


def backends(with_torch=True):
    out = {"fake": FakeBackend()}
    if with_torch:
        out["torch"] = TorchBackend()
    return out


def runner(tmp_path, timer, n_trials, with_torch=True, **options):
    storage = make_storage(None, tmp_path / "study.journal")
    return StudyRunner(SPEC, ROWS, backends(with_torch), timer,
                       StudyOptions(trials=n_trials, time_budget=600, compile_baseline=False, **options),
                       storage=storage, name="fake-study", copy_gbps=10.0, seeds=[Candidate("fake", FakeConfig(1, 1))])


def valid_fake_configs():
    return [c for c in FakeConfig.space(SPEC)]


def test_space_is_pruned_by_validity_before_sampling():
    space = SearchSpace(SPEC, backends())
    fakes = [c.config for c in space.candidates() if c.backend == "fake"]
    assert len(fakes) == 30 and all(c.a * c.b <= 64 for c in fakes)
    assert len(space) == 31  # plus torch's single config
    # b only takes 1..2 when a is 32: still 6 values overall; the snapped config is always valid
    assert space.knobs["fake"] == {"a": [1, 2, 4, 8, 16, 32], "b": [1, 2, 3, 4, 5, 6]}
    snapped = space.candidate({"backend": "fake", "fake.a": 5, "fake.b": 5})  # a=32, b=6: invalid
    assert snapped.config in fakes and snapped.config.a * snapped.config.b <= 64
    assert space.params(snapped) != {"backend": "fake", "fake.a": 5, "fake.b": 5}
    assert all(space.candidate(space.params(c)) == c for c in space.candidates())  # one map, both ways
    assert all(space.named(c.key) == c for c in space.candidates()) and space.named("[]") is None


@pytest.mark.parametrize("option, value", [("trials", 0), ("trials", 2.5), ("time_budget", -1.0),
                                           ("time_budget", float("nan")), ("patience", 0), ("compile_workers", 0),
                                           ("finalists", 0), ("strict", "yes"), ("seed", None), ("sampler", 3)])
def test_a_bad_option_is_refused_by_name(option, value):
    from autonorm.errors import TuneOptionError

    with pytest.raises(TuneOptionError, match=f"tuner option {option}="):
        StudyOptions(**{option: value})
    assert StudyOptions.quick(compile_baseline=False).trials == 12  # --quick's preset, the rest as given
    with pytest.raises(AttributeError):
        StudyOptions().trials = 5  # frozen: one run's options are the same in every study


def test_tune_names_the_flag_of_a_bad_option(tmp_path, capsys):
    from autonorm.cli import main

    assert main(["tune", "--time-budget", "-5", "--backends", "torch", "--out", str(tmp_path)]) == 2
    assert "--time-budget -5.0: must be seconds >= 0" in capsys.readouterr().err


def test_tpe_finds_the_known_optimum_within_budget(tmp_path):
    timer = FakeTimer()
    result = runner(tmp_path, timer, n_trials=24, patience=24).run()
    assert result.trials <= 24
    rec = result.record
    assert (rec.winner.backend, rec.winner.config) == ("fake", FakeConfig(*OPTIMUM))
    assert rec.winner.median_us == 10.0
    # every config was timed at most once, and only valid ones
    timed = [c for c in timer.timed if c != "torch"]
    assert len(timed) == len(set(timed)) and all(c.a * c.b <= 64 for c in timed)


def test_trials_carry_their_knobs_by_value(tmp_path):
    """optuna-dashboard readability: each knob's value beside its ordinal parameter, same name: the config
    that was timed (a sampled combination outside the valid space is snapped to the nearest valid one)."""
    runner(tmp_path, FakeTimer(), n_trials=10, patience=10).run()
    measured = [t for t in _measured(_trials(tmp_path / "study.journal")) if t.user_attrs["backend"] == "fake"]
    assert len(measured) >= 5
    for t in measured:
        assert {"fake.a", "fake.b"} <= set(t.params)
        config = FakeConfig(t.user_attrs["fake.a"], t.user_attrs["fake.b"])
        assert t.user_attrs["candidate"] == Candidate("fake", config).key


def test_patience_starts_counting_after_the_seeds_and_startup_trials(tmp_path):
    # The startup trials are random: counting them would end a study before TPE has a model
    # (on a recorded numba-cpu table that left winners 11% off the best; search-efficiency.md).
    result = runner(tmp_path, FakeTimer(), n_trials=30, patience=1).run()
    assert result.trials >= 1 + STARTUP_TRIALS + 1  # the seed, the startup trials, one patience trial
    assert result.trials < 30


def test_failing_and_wrong_candidates_are_never_timed_or_recorded(tmp_path):
    timer = FakeTimer(shift=-5.0)  # wrong/failing configs would otherwise be among the fastest
    result = runner(tmp_path, timer, n_trials=40).run()  # >= space: exhaustive
    rec = result.record
    assert result.measured + len(result.failed) == 31
    reasons = list(result.failed.values())
    assert sum("wrong result" in r for r in reasons) == 4  # b == 6 with a <= 8 (a >= 16 with b == 6 is invalid)
    assert sum("compile failed" in r and "ptxas" in r for r in reasons) == 2  # a == 32, b in 1..2
    assert rec.failed == 6
    assert not [c for c in timer.timed if c != "torch" and (c.b == 6 or c.a == 32)]
    for e in [rec.winner, *rec.runners_up]:
        assert not (e.backend == "fake" and (e.config.b == 6 or e.config.a == 32))
    assert rec.winner.config == FakeConfig(*OPTIMUM)
    assert rec.template_hash == "fake-1"
    assert rec.baselines["torch_eager"]["median_us"] == TORCH_US
    assert rec.winner.gbps == pytest.approx(SPEC.bytes_moved(ROWS) / 5e-6 / 1e9)


def test_torch_is_a_candidate_and_wins_when_fastest(tmp_path):
    result = runner(tmp_path, FakeTimer(shift=+30.0), n_trials=40).run()
    assert result.record.winner.backend == "torch"
    assert result.record.winner.median_us <= result.record.baselines["torch_eager"]["median_us"]


# --- verification catches kernels that are wrong only somewhere ---------------------------
def _injected(kind):
    """A correct kernel (torch underneath) made wrong in one way that easy inputs do not show."""
    from autonorm.backends.base import new_empty

    inner = TorchBackend().build(None, SPEC, None, "cpu")

    def kernel(x, weight, bias, residual, eps, offset):
        y, h, mean, rstd = inner(x, weight, bias, residual, 1e-5 if kind == "ignores eps" else eps, offset)
        if kind == "wrong past row 64":
            y = torch.cat([y[:64], y[64:] + 1])
        elif kind == "wrong on strided rows" and x.shape[0] > 1 and x.stride(0) != x.shape[1]:
            y = y + 1
        elif kind == "unwritten element":
            out = new_empty(y.shape, y.dtype, y.device)  # NaN when verification poisons outputs
            out.view(-1)[:-1] = y.reshape(-1)[:-1]
            y = out
        return y, h, mean, rstd
    if kind == "wrong serial variant":
        kernel.variants = (inner, lambda *args: (torch.zeros_like(args[0]),) + inner(*args)[1:])
    if kind == "wrong y_only":
        kernel.y_only = lambda x, weight, bias, eps, offset: x
    return kernel


INJECTED = ("wrong past row 64", "wrong on strided rows", "ignores eps", "unwritten element",
            "wrong serial variant", "wrong y_only")


@pytest.mark.parametrize("kind", INJECTED)
def test_verification_rejects_kernels_wrong_only_somewhere(kind):

    assert check_candidate(SPEC, _injected(None), ROWS, "cpu") is None
    reason = check_candidate(SPEC, _injected(kind), ROWS, "cpu")
    assert reason is not None and "wrong result" in reason
    assert check_candidate(SPEC, _injected(kind), 0, "cpu") is not None  # rows 0 still verifies on rows


def test_verification_rows():
    from autonorm.verify import VERIFY_MAX_ELEMENTS, VERIFY_MIN_ROWS, verify_rows

    assert verify_rows(0, 64) == verify_rows(16, 64) == VERIFY_MIN_ROWS > 2 * 256  # several tasks per thread
    assert verify_rows(4096, 1024) == 4096  # the timed count itself
    assert verify_rows(1 << 20, 4096) * 4096 <= VERIFY_MAX_ELEMENTS
    assert verify_rows(5, 1 << 30) == 1


@dataclass(frozen=True)
class InjectedConfig(Config):
    backend: ClassVar[str] = "fake"
    a: int = knob((1, 2, 4, 8))
    b: int = knob(tuple(range(len(INJECTED) + 1)))  # b < len(INJECTED): that wrong kind; the last: correct


class InjectedBackend(FakeBackendBase):
    config_cls = InjectedConfig

    def build(self, source, spec, config, device):
        kernel = _injected(INJECTED[config.b] if config.b < len(INJECTED) else None)
        kernel.config = config
        return kernel


def test_tuner_records_no_injected_wrong_kernel(tmp_path):
    class Timer(FakeTimer):
        def _cost(self, kernel):  # the wrong kernels are the fastest
            config = getattr(kernel, "config", None)
            return TORCH_US if config is None else 5.0 + config.a + (10.0 if config.b == len(INJECTED) else 0.0)
    storage = make_storage(None, tmp_path / "s.journal")
    result = StudyRunner(SPEC, ROWS, {"fake": InjectedBackend(), "torch": TorchBackend()}, Timer(),
                         StudyOptions(trials=40, time_budget=600, compile_baseline=False),
                         storage=storage, name="injected", seeds=[Candidate("fake", InjectedConfig(1, 0))]).run()
    assert len(result.failed) == 4 * len(INJECTED)
    entries = [result.record.winner, *result.record.runners_up]
    assert entries and all(e.backend == "torch" or e.config.b == len(INJECTED) for e in entries)


def test_failed_candidate_only_space_gives_no_record(tmp_path):
    class AllWrong(FakeBackend):
        def build(self, source, spec, config, device):
            raise RuntimeError("nvrtc: error")
    storage = make_storage(None, tmp_path / "s.journal")
    result = StudyRunner(SPEC, ROWS, {"fake": AllWrong()}, FakeTimer(), StudyOptions(trials=40, compile_baseline=False),
                         storage=storage, name="x").run()
    assert result.record is None and len(result.failed) == 30


# --- resume and several workers (subprocesses on one journal) ------------------------
def _worker_cmd(journal, sleep):
    return [sys.executable, __file__, "worker", str(journal), str(sleep)]


def _trials(journal):
    import optuna
    study = optuna.load_study(study_name="fake-study", storage=make_storage(str(journal), journal))
    return study.get_trials(deepcopy=False)


def _measured(trials):
    return [t for t in trials if t.state.name == "COMPLETE" and "timing" in t.user_attrs]


def test_resume_after_kill_loses_and_repeats_nothing(tmp_path):
    journal = tmp_path / "study.journal"
    proc = subprocess.Popen(_worker_cmd(journal, 0.4))
    deadline = time.monotonic() + 120
    before = []
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
        try:
            before = _measured(_trials(journal))
        except KeyError:  # the worker has not written the study's record yet
            continue
        if len(before) >= 4:
            break
    assert proc.poll() is None, "the worker finished its study before the test could kill it"
    proc.kill()  # SIGKILL mid-trial: a RUNNING trial is left behind
    proc.wait()
    assert len(before) >= 4, "the worker finished no trial before the kill"
    assert subprocess.run(_worker_cmd(journal, 0.0), check=False, timeout=180).returncode == 0
    trials = _trials(journal)
    measured = _measured(trials)
    keys = [t.user_attrs["candidate"] for t in measured]
    assert len(keys) == len(set(keys)), "a config was timed twice"
    assert {t.number for t in before} <= {t.number for t in measured}, "a finished trial was lost"
    failed = {t.user_attrs["candidate"] for t in trials if "failed" in t.user_attrs}
    assert len(set(keys) | failed) == 31
    left = [(t.number, t.state.name, t.user_attrs) for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert not left


def test_two_workers_share_one_journal_study(tmp_path):
    journal = tmp_path / "study.journal"
    procs = [subprocess.Popen(_worker_cmd(journal, 0.3)) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=240) == 0
    trials = _trials(journal)
    measured = _measured(trials)
    keys = [t.user_attrs["candidate"] for t in measured]
    assert len(keys) == len(set(keys))
    failed = {t.user_attrs["candidate"] for t in trials if "failed" in t.user_attrs}
    assert len(set(keys) | failed) == 31
    assert len({t.user_attrs["worker"] for t in measured}) == 2


# --- the command end to end ------------------------------------------------------------
def test_tune_quick_end_to_end_writes_a_valid_database(tmp_path, capsys):
    from autonorm.cli import main
    from autonorm.device import identity

    out = tmp_path / "db"
    rc = main(["tune", "--quick", "--ops", "rmsnorm", "--directions", "fwd", "--hidden", "128", "--rows", "32",
               "--trials", "4", "--time-budget", "600", "--no-compile-baseline", "--no-progress", "--out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "rmsnorm.fwd x=float32 w=float32 N=128" in table and "x eager" in table
    path = out / f"{identity('cpu')['slug']}.json"
    assert main(["db", "validate", str(path)]) == 0
    data = json.loads(path.read_text())
    (rec,) = data["records"]
    assert rec["key"]["rows_bucket"] == 32 and rec["trials"] == 4
    assert data["device"]["copy_gbps"] > 0 and data["versions"]["torch"] == torch.__version__
    assert (out / ".autonorm-journal" / f"{identity('cpu')['slug']}.optuna.journal").exists()


def test_a_tune_on_miss_record_is_taken_by_the_protocol_of_autonorm_tune(tmp_path, monkeypatch, capsys):
    """The dispatcher's tune-on-miss runs `tune_grid` with `--quick`'s options: the same verification,
    finalists re-timed with the baselines, quality gate, completeness and device facts as `autonorm tune`."""
    import autonorm
    from autonorm import backends as registry
    from autonorm import db_sources, measure
    from autonorm.cli import main
    from autonorm.device import identity

    monkeypatch.setattr(measure, "copy_bandwidth", lambda device: 10.0)  # the probe's seconds are not at stake
    monkeypatch.setitem(registry.DEFAULT_ORDER, "cpu", ("torch",))  # a space of one: both searches are exhaustive
    assert main(["tune", "--ops", "rmsnorm", "--directions", "fwd", "--dtypes", "fp32", "--hidden", "64",
                 "--rows", "8", "--no-compile-baseline", "--no-progress", "--out", str(tmp_path / "tuned")]) == 0
    capsys.readouterr()
    monkeypatch.setenv("AUTONORM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AUTONORM_TUNE_ON_MISS", "1")
    autonorm.reset()
    x, w = torch.randn(8, 64), torch.randn(64)
    try:
        assert autonorm.explain("rms_norm", x, (64,), w, 1e-6).rung == "tuned"
    finally:
        autonorm.reset()
    slug = identity("cpu")["slug"]
    by_tune = json.loads((tmp_path / "tuned" / f"{slug}.json").read_text())
    on_miss = json.loads(db_sources.tuned_path(slug).read_text())
    # tune-on-miss leaves the torch.compile baseline out (it would reset the program's Dynamo); so did this tune
    assert on_miss["protocol"] == by_tune["protocol"] and on_miss["protocol"]["finalists"] == 3
    assert on_miss["device"] == by_tune["device"] and on_miss["device"]["copy_gbps"] == 10.0
    (miss,), (tuned,) = on_miss["records"], by_tune["records"]
    assert miss["key"] == tuned["key"] and set(miss) == set(tuned)
    for rec in (miss, tuned):
        assert rec["completeness"] == "exhaustive" and rec["quality"]["attempts"] >= 1
        assert rec["winner"]["pct_copy_bw"] is not None and rec["baselines"]["torch_eager"]["median_us"] > 0


# --- scripts/search_efficiency.py on a recorded table (a replay: no timing) ---------------------------
@pytest.mark.slow  # replays of a 217-candidate space: 95-150 s; the TPE tests above stay in the default tier
def test_search_efficiency_replays_the_recorded_tables(tmp_path, capsys):
    pytest.importorskip("numba")
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "scripts"))
    try:
        import search_efficiency
    finally:
        sys.path.remove(str(root / "scripts"))
    tables = root / "docs" / "benchmarks"
    md = tmp_path / "se.md"
    assert search_efficiency.main(["--hidden", "2048", "--rows", "1024", "--seeds", "1", "--budget", "15",
                                   "--table", str(tables / "search-efficiency-table-rmsnorm-2048.json"),
                                   "--transfer-table", str(tables / "search-efficiency-table-rmsnorm-4096.json"),
                                   "--md", str(md)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in md.read_text().splitlines() if "N=2048" in line]
    assert len(rows) == 2 and "seeded with the best of N=4096 rows=1024" in rows[1]
    # trials-to-2% is a count within the space (217 candidates), for the plain and the seeded search
    cells = [r.split("|")[6].strip() for r in rows]
    assert all(0 < int(c.split()[0]) <= 217 for c in cells)
    spent = [line for line in out.splitlines() if line.startswith("--trials 15")]
    assert len(spent) == 2 and all("off the best" in line for line in spent)
    assert all(int(line.split(": ")[1].split(" /")[0]) <= 15 for line in spent)
    # The sampler the tuner's was chosen over replays the same way.
    assert search_efficiency.main(["--hidden", "2048", "--rows", "1024", "--seeds", "1", "--budget", "15",
                                   "--table", str(tables / "search-efficiency-table-rmsnorm-2048.json"),
                                   "--sampler", "multivariate"]) == 0
    assert "--trials 15, heuristic seeds:" in capsys.readouterr().out


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _, _, journal, sleep = sys.argv
    journal = Path(journal)
    r = StudyRunner(SPEC, ROWS, backends(), FakeTimer(sleep=float(sleep)),
                    StudyOptions(trials=40, compile_baseline=False, compile_workers=1),
                    storage=make_storage(str(journal), journal), name="fake-study",
                    lock_path=Path(str(journal) + ".autonorm-lock"))
    sys.exit(0 if r.run().record is not None else 1)
