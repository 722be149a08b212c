"""Racing: clear losers stop after a first look, close contenders are extended until their intervals
separate, the cap and the study's time bound every candidate; scripted samples, so every count is exact."""
import pytest

from autonorm import measure
from autonorm.errors import AutonormError
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
    with pytest.raises(AutonormError, match=field):
        RacePolicy(**bad)


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
