"""Racing: clear losers stop after a first look, close contenders are extended until their intervals
separate, the cap and the study's time bound every candidate; scripted samples, so every count is exact."""
import pytest

from autonorm import measure
from autonorm.errors import TuneOptionError
from autonorm.measure import Timing
from autonorm.spec import NormSpec
from autonorm.tune.race import FIRST_REPS, RacePolicy, Racer, race

INCUMBENT = Timing(10.0, 9.8, 10.2, 40)  # the best so far: p20-p80 9.8-10.2 us


class ScriptedRun:
    """A TimingRun whose samples come from a script: sample i is `script(i)` µs."""

    def __init__(self, script, cap=40):
        self.script, self.cap, self.samples = script, cap, []

    def extend(self, reps):
        self.samples += [self.script(len(self.samples) + i) for i in range(reps)]
        return Timing.of(self.samples)


def steady(us):
    return lambda i: us + 0.01 * (i % 3)  # a narrow spread around `us`


def test_the_first_candidate_is_the_reference_and_timed_in_full():
    result = race(ScriptedRun(steady(12.0)), None)
    assert (result.verdict, result.timing.reps) == ("reference", 40)


def test_a_clear_loser_is_dropped_after_the_first_look():
    run = ScriptedRun(steady(20.0))
    result = race(run, INCUMBENT)
    assert (result.verdict, result.timing.reps, len(run.samples)) == ("dropped", FIRST_REPS, FIRST_REPS)
    assert result.to_json() == {"reps": FIRST_REPS, "verdict": "dropped"}


def test_a_first_look_inside_the_margin_is_extended_until_it_separates():
    # p20 10.3 is above the incumbent's p80 10.2, but within 5%: one extension (5 -> 10 reps) confirms it slower
    result = race(ScriptedRun(steady(10.3)), INCUMBENT)
    assert (result.verdict, result.timing.reps) == ("slower", 2 * FIRST_REPS)


def test_a_close_pair_is_extended_to_the_cap_and_called_tied():
    result = race(ScriptedRun(steady(10.0)), INCUMBENT)
    assert (result.verdict, result.timing.reps) == ("tied", 40)


def test_a_contender_whose_interval_separates_late_stops_there():
    # three samples at the incumbent's 10 us, every later one 12 us: the p20 is 10 us at 5 and 10 samples,
    # 12 us (above the incumbent's p80) at 20
    result = race(ScriptedRun(lambda i: 10.0 if i < 3 else 12.0), INCUMBENT)
    assert (result.verdict, result.timing.reps) == ("slower", 4 * FIRST_REPS)


def test_a_faster_candidate_is_timed_to_the_cap_it_is_the_next_reference():
    result = race(ScriptedRun(steady(8.0)), INCUMBENT)
    assert (result.verdict, result.timing.reps) == ("faster", 40)


def test_the_cap_is_the_lower_of_the_timers_count_and_the_policys():
    assert race(ScriptedRun(steady(10.0), cap=40), INCUMBENT, RacePolicy(max_reps=12)).timing.reps == 12
    assert race(ScriptedRun(steady(10.0), cap=7), INCUMBENT, RacePolicy(max_reps=12)).timing.reps == 7
    assert race(ScriptedRun(steady(12.0), cap=3), None).timing.reps == 3
    # a first look is never longer than the cap
    assert race(ScriptedRun(steady(20.0), cap=2), INCUMBENT).timing.reps == 2


def test_the_budget_stops_a_contender_but_never_a_first_look():
    checks = []

    def out_of_time():
        checks.append(1)
        return len(checks) > 1  # time runs out after the first extension

    result = race(ScriptedRun(steady(10.0)), INCUMBENT, out_of_time=out_of_time)
    assert (result.verdict, result.timing.reps) == ("budget", 2 * FIRST_REPS)
    assert race(ScriptedRun(steady(10.0)), INCUMBENT, out_of_time=lambda: True).timing.reps == FIRST_REPS


def test_a_timer_without_start_is_timed_by_its_measure():
    class FixedTimer:
        def measure(self, spec, kernel, rows):
            return Timing(5.0, 4.9, 5.1, 10)

    result = Racer(FixedTimer()).time(None, None, 8, INCUMBENT)
    assert (result.verdict, result.timing.reps) == ("fixed", 10)


def test_racer_starts_the_timers_run_and_races_it():
    class StartTimer:
        def start(self, spec, kernel, rows):
            return ScriptedRun(steady(kernel))

    racer = Racer(StartTimer())
    assert racer.time(None, 30.0, 8, INCUMBENT).verdict == "dropped"
    assert racer.time(None, 30.0, 8, None).verdict == "reference"


@pytest.mark.parametrize("bad, field", [({"first_reps": 0}, "first_reps"), ({"margin": -0.1}, "margin"),
                                        ({"max_reps": 0}, "max_reps")])
def test_a_bad_policy_is_refused_by_name(bad, field):
    with pytest.raises(TuneOptionError, match=field):
        RacePolicy(**bad)


@pytest.mark.parametrize("option", ["race", "compile_processes"])
def test_the_race_and_compile_process_options_are_true_or_false(option):
    from autonorm.tune import StudyOptions

    assert getattr(StudyOptions(), option) is True
    with pytest.raises(TuneOptionError, match=f"tuner option {option}='yes': must be True or False"):
        StudyOptions(**{option: "yes"})


def test_the_cpu_timers_run_rotates_input_sets_on_across_extensions(monkeypatch):
    monkeypatch.setattr(measure, "llc_bytes", lambda: 1 << 20)  # 1 MiB LLC -> several input sets
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 256)
    seen = []

    def kernel(x, *rest):
        seen.append(x.data_ptr())

    timer = measure.CpuTimer(warmup_s=0.0, rep_s=0.0, min_reps=6, max_reps=6)
    run = timer.start(spec, kernel, 64)
    sets = [args[0].data_ptr() for args in timer._sets[(spec, 64)]]
    assert run.cap == 6 and len(sets) >= 3
    seen.clear()  # the warm-up's calls
    assert run.extend(2).reps == 2
    assert run.extend(3).reps == 5 and len(run.samples) == 5
    assert seen == [sets[i % len(sets)] for i in range(5)]  # the second extension goes on from set 2


# --- in a study: every trial says how many repetitions it got, and the result where its time went ----------

def test_a_study_races_its_candidates_and_reports_reps_compile_and_timing_seconds(tmp_path):
    from dataclasses import dataclass
    from typing import ClassVar

    from fakes import FakeBackendBase

    from autonorm.backends.torch_eager import TorchBackend
    from autonorm.config import Config, knob
    from autonorm.tune import Candidate, StudyOptions, StudyRunner, make_storage

    @dataclass(frozen=True)
    class K(Config):
        backend: ClassVar[str] = "fake"
        k: int = knob((1, 2, 3))

    us = {1: 10.0, 2: 30.0, 3: 10.0}  # 2 is a clear loser, 3 ties with 1

    class Backend(FakeBackendBase):
        config_cls = K

        def build(self, source, spec, config, device):
            kernel = TorchBackend().build(None, spec, None, device)  # right, so the reference check passes

            def timed(*args):
                return kernel(*args)
            timed.us = us[config.k]
            return timed

    class Timer:
        """Each sample (and each kernel of an interleaved round) advances the clock by one second."""

        def __init__(self):
            self.now = 0.0

        def clock(self):
            return self.now

        def start(self, spec, kernel, rows):
            def sample(i):
                self.now += 1.0
                return steady(kernel.us)(i)
            return ScriptedRun(sample, cap=40)

        def interleaved(self, spec, kernels, rows):
            self.now += len(kernels)
            return [Timing(getattr(k, "us", 20.0), getattr(k, "us", 20.0), getattr(k, "us", 20.0), 10) for k in kernels]

        def describe(self):
            return {"timer": "scripted"}

    timer = Timer()
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 64)
    runner = StudyRunner(spec, 16, {"fake": Backend()}, timer,
                         StudyOptions(trials=10, time_budget=600, compile_baseline=False, finalists=2),
                         storage=make_storage(None, tmp_path / "s.journal"), name="race", clock=timer.clock,
                         seeds=[Candidate("fake", K(1))])
    result = runner.run()
    import optuna

    study = optuna.load_study(study_name="race", storage=runner.storage)
    races = {t.user_attrs["fake.k"]: t.user_attrs["race"] for t in study.get_trials() if "race" in t.user_attrs}
    assert races == {1: {"reps": 40, "verdict": "reference"}, 2: {"reps": FIRST_REPS, "verdict": "dropped"},
                     3: {"reps": 40, "verdict": "tied"}}
    assert result.record.winner.median_us == 10.0
    # 85 samples in the search, then the finish's rounds: the 2 finalists (tied) and torch eager, then the two
    # finalists twice more
    assert result.timing_s == 40 + FIRST_REPS + 40 + 3 + 2 + 2
    assert result.wall_s == timer.now and result.timing_share == result.timing_s / timer.now
    assert set(result.compile_s) == {"fake"}  # compiled in threads: the fake has no disk cache
