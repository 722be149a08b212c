"""The measurement quality gate: noisy timings are re-measured, then flagged low-confidence or refused."""
import logging

import pytest
from fakes import ScriptedTimer

from autonorm import cli, measure, tune
from autonorm.backends.torch_eager import TorchBackend
from autonorm.cli import tune as tune_cli
from autonorm.db import TuningDB
from autonorm.measure import Timing
from autonorm.spec import NormSpec
from autonorm.tune import quality

SPEC = NormSpec("rmsnorm", "fwd", "float32", "float32", 64)
STEADY = (10.0, 9.5, 10.5)
WIDE = (10.0, 4.0, 40.0)  # p80/p20 = 10: one baseline in a loaded run spanned 906-44,973 us
DRIFTED = (400.0, 390.0, 410.0)  # steady, but 40x the search timing of 10 us


def test_judge_flags_spread_and_disagreement():
    search = [{"median_us": 10.0, "p20_us": 9.5, "p80_us": 10.5}, None]
    assert quality.judge(["a", "b"], [Timing(*STEADY, 10), Timing(*STEADY, 10)], search).ok
    wide = quality.judge(["a", "b"], [Timing(*STEADY, 10), Timing(*WIDE, 10)], search)
    assert not wide.ok and wide.problems == ["b spread p80/p20 10.00 > 1.5"] and wide.worst_spread == 10.0
    drifted = quality.judge(["a", "b"], [Timing(*DRIFTED, 10), Timing(*DRIFTED, 10)], search)
    assert drifted.problems == ["a re-timed at 400.0 us vs 10.0 us in the search (x40.00)"]  # b: no search timing


def _study(tmp_path, timer, **kw):
    storage = tune.make_storage(None, tmp_path / "study.journal")
    options = tune.StudyOptions(trials=2, time_budget=60, compile_baseline=False, **kw)
    return tune.StudyRunner(SPEC, 16, {"torch": TorchBackend()}, timer, options, storage=storage, name="q",
                             copy_gbps=10.0).run()


def test_steady_study_is_recorded_with_its_spread(tmp_path):
    timer = ScriptedTimer(retimes=[STEADY])
    result = _study(tmp_path, timer)
    assert timer.interleaved_calls == 1
    assert result.record.quality == {"confidence": "high", "spread": 1.105, "attempts": 1}
    assert "1.11" in tune_cli.format_table([result]) and "(low)" not in tune_cli.format_table([result])


def test_noise_that_passes_is_remeasured_then_recorded(tmp_path):
    timer = ScriptedTimer(retimes=[WIDE, STEADY])
    result = _study(tmp_path, timer)
    assert timer.interleaved_calls == 2
    assert result.record.quality["confidence"] == "high" and result.record.quality["attempts"] == 2
    assert result.record.winner.median_us == 10.0


@pytest.mark.parametrize("retime,problem", [(WIDE, "spread p80/p20 10.00"), (DRIFTED, "x40.00")])
def test_persistent_noise_is_flagged_low_confidence_with_the_load(tmp_path, caplog, retime, problem):
    timer = ScriptedTimer(retimes=[retime])
    with caplog.at_level(logging.WARNING, logger="autonorm.tune"):
        result = _study(tmp_path, timer)
    assert timer.interleaved_calls == 1 + quality.RETRIES
    q = result.record.quality
    assert q["confidence"] == "low" and any(problem in p for p in q["problems"]) and "load average" in q["load"]
    assert "low-confidence" in caplog.text and "load average" in caplog.text
    assert "(low)" in tune_cli.format_table([result])
    db = TuningDB({"name": "x", "slug": "x", "kind": "cpu", "compute_capability": None, "sm_count": 2,
                   "l2_bytes": 0, "copy_gbps": 1.0}, {"autonorm": "0", "torch": "0"}, {},
                  {result.record.key: result.record})
    db.save(tmp_path / "x.json")  # the flag survives the schema and a round trip
    assert TuningDB.load(tmp_path / "x.json").records[result.record.key].quality == q


def test_strict_refuses_to_record_persistent_noise(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="autonorm.tune"):
        result = _study(tmp_path, ScriptedTimer(retimes=[WIDE]), strict=True)
    assert result.record is None and "spread p80/p20 10.00" in result.refused
    assert "not recorded (--strict)" in caplog.text
    assert "(refused: noisy measurements)" in tune_cli.format_table([result])


def test_tune_strict_exits_1_and_writes_nothing_noisy(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(measure, "timer_for", lambda device, *windows: ScriptedTimer(retimes=[WIDE]))
    monkeypatch.setattr(measure, "copy_bandwidth", lambda device: 10.0)
    argv = ["tune", "--ops", "rmsnorm", "--directions", "fwd", "--dtypes", "fp32", "--hidden", "64", "--rows", "8",
            "--trials", "2", "--backends", "torch", "--no-compile-baseline", "--out", str(tmp_path)]
    assert cli.main([*argv, "--strict"]) == 1
    captured = capsys.readouterr()
    assert "1 noisy studies not recorded (--strict)" in captured.err and not list(tmp_path.glob("*.json"))
    assert cli.main(argv) == 0  # without --strict: recorded, flagged
    (path,) = tmp_path.glob("*.json")
    assert [r.quality["confidence"] for r in TuningDB.load(path).records.values()] == ["low"]


def test_the_warning_lists_the_first_problems_and_counts_the_rest():
    verdict = quality.Verdict([f"p{i}" for i in range(5)])
    assert verdict.summary() == "p0; p1; p2; and 2 more"
    assert quality.Verdict(["p0"]).summary() == "p0"


def test_the_summary_tells_a_study_the_budget_left_out_from_one_whose_candidates_failed():
    from autonorm.tune.finalize import StudyResult

    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 64)
    left_out = StudyResult(spec, 8, None, trials=0, measured=0, completeness="budget")
    failed = StudyResult(spec, 8, None, trials=2, measured=0, failed={"a": "compile failed"}, completeness="budget")
    assert "budget ran out before its first candidate" in tune_cli.format_table([left_out])
    assert "every candidate failed" not in tune_cli.format_table([left_out])
    assert "every candidate failed" in tune_cli.format_table([failed])
