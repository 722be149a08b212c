"""A budgeted study's batches: the next one is predicted from each candidate's seconds, not the last batch's wall."""
from dataclasses import dataclass
from typing import ClassVar

import pytest
from fakes import TorchBackedFake

from autonorm.config import Config, knob
from autonorm.measure import Timing
from autonorm.spec import NormSpec
from autonorm.tune import StudyOptions, StudyRunner, make_storage

pytest.importorskip("optuna")
SPEC = NormSpec("rmsnorm", "fwd", "float32", "float32", 64)


@dataclass(frozen=True)
class GridConfig(Config):
    backend: ClassVar[str] = "fake"
    a: int = knob((1, 2, 3, 4, 5, 6))
    b: int = knob((1, 2, 3, 4, 5, 6))


class GridBackend(TorchBackedFake):
    config_cls = GridConfig


class FirstIsSlowTimer:
    """The study's first timing costs 1 s of the scripted clock (as a first compile and the pool's start
    would), every later one 0.05 s."""

    def __init__(self):
        self.now, self.count = 0.0, 0

    def clock(self):
        return self.now

    def measure(self, spec, kernel, rows):
        self.now += 1.0 if self.count == 0 else 0.05
        self.count += 1
        config = getattr(kernel, "config", None)
        us = 100.0 if config is None else 10.0 + config.a + config.b
        return Timing(us, us * 0.97, us * 1.03, 10)

    def interleaved(self, spec, kernels, rows):
        return [self.measure(spec, k, rows) for k in kernels]

    def describe(self):
        return {"timer": "scripted"}


def test_one_slow_first_candidate_does_not_end_the_study_after_its_first_batch(tmp_path):
    timer = FirstIsSlowTimer()
    options = StudyOptions(trials=30, time_budget=1.5, compile_workers=4, compile_baseline=False, verify=False,
                           race=False)
    runner = StudyRunner(SPEC, 8, {"fake": GridBackend()}, timer, options,
                         storage=make_storage(None, tmp_path / "j.journal"), name="s", clock=timer.clock)
    result = runner.run()
    # batch 1 (4 candidates) ends at 1.15 s; the median candidate, 0.05 s, predicts 0.2 s for the next
    # batch, so two more batches fit (1.35 s, 1.55 s predicted past 1.5 s after the second)
    assert result.measured == 8


class LaunchKnobBackend(GridBackend):
    """A fake whose source depends on knob `a` only (`b` changes the launch, as numba-cpu's rows per task): configs
    sharing `a` share one compile. Compiling a new source costs `compile_s` of the timer's clock."""

    def __init__(self, timer, compile_s):
        super().__init__()
        self.timer, self.compile_s, self.sources = timer, compile_s, set()

    def render(self, spec, config):
        from autonorm.render import Source

        self.validate(spec, config)
        return Source.of(f"fake {spec!r} a={config.a}", "")

    def compile(self, spec, config, device):
        if config.a not in self.sources:
            self.sources.add(config.a)
            self.timer.now += self.compile_s
        return super().compile(spec, config, device)


class SteadyTimer(FirstIsSlowTimer):
    def measure(self, spec, kernel, rows):
        self.count = 1  # every timing 0.05 s
        return super().measure(spec, kernel, rows)


def test_a_batch_that_needs_a_new_sources_compile_is_not_begun_past_the_share(tmp_path):
    from autonorm.tune import Candidate

    timer = SteadyTimer()
    backend = LaunchKnobBackend(timer, compile_s=1.0)
    cfg = GridConfig
    # the seeds: source a=1 (compiled once, 1 s), its launch variants, then source a=2 (another 1 s)
    seeds = [Candidate("fake", cfg(a=1, b=b)) for b in (1, 2, 3, 4, 5, 6)] + [Candidate("fake", cfg(a=2, b=1))]
    options = StudyOptions(trials=30, time_budget=1.6, compile_workers=2, compile_baseline=False, verify=False,
                           race=False)
    runner = StudyRunner(SPEC, 8, {"fake": backend}, timer, options, seeds=seeds,
                         storage=make_storage(None, tmp_path / "j.journal"), name="s", clock=timer.clock)
    assert runner.run().failed == {}
    # 1 s of compile and 6 launch variants (0.3 s) fit; the a=2 batch would end at 2.4 s, past 1.6 s: not begun
    assert backend.sources == {1}
    assert timer.now <= 1.6 + 0.2  # the finish's re-timing on top


def test_the_runs_last_study_predicts_its_next_batch_by_its_slowest_candidate(tmp_path):
    # Nothing after the run's last study can absorb its overrun: the 1 s candidate stands for the next batch
    # (4 s), where the median one (0.05 s) would let two more batches begin, as in the test above.
    timer = FirstIsSlowTimer()
    options = StudyOptions(trials=30, time_budget=1.5, compile_workers=4, compile_baseline=False, verify=False,
                           race=False, ends_run=True)
    runner = StudyRunner(SPEC, 8, {"fake": GridBackend()}, timer, options,
                         storage=make_storage(None, tmp_path / "j.journal"), name="s", clock=timer.clock)
    assert runner.run().measured == 4


def test_a_study_charges_a_new_source_the_compile_waits_of_the_studies_before_it(tmp_path):
    # The first sources of a study are often an earlier study's (numba-cpu renders no hidden size), so the study
    # has waited for no compile of its own when its first new source comes: the run's waits price it.
    from autonorm.tune import Candidate
    from autonorm.tune.compile_pool import CompilePool

    timer = SteadyTimer()
    backend = LaunchKnobBackend(timer, compile_s=1.0)
    pool = CompilePool({"fake": backend}, "cpu", 2, processes=False)
    storage = make_storage(None, tmp_path / "j.journal")
    variants = [Candidate("fake", GridConfig(a=1, b=b)) for b in (1, 2, 3, 4, 5, 6)]
    for rows, seeds, budget in ((8, variants, 10.0), (16, variants + [Candidate("fake", GridConfig(a=2, b=1))], 1.0)):
        options = StudyOptions(trials=len(seeds), time_budget=budget, compile_workers=2, compile_baseline=False,
                               verify=False, race=False)
        result = StudyRunner(SPEC, rows, {"fake": backend}, timer, options, seeds=seeds, storage=storage,
                             name=f"s{rows}", clock=timer.clock, compile_pool=pool).run()
        assert result.failed == {}
    assert pool.compile_waits == [1.0]  # the first study's compile of a=1
    # the second study's launch variants of a=1 take 0.3 s; a=2 with a 1 s compile would end past its 1 s
    assert backend.sources == {1}
    pool.close()


@pytest.mark.parametrize("charge, ends_run, measured", [(0.2, False, 6), (0.2, True, 2), (None, False, 2)])
def test_the_seeds_compile_is_charged_the_plans_figure_and_the_run_pays_the_rest(tmp_path, charge, ends_run, measured):
    # Every later study that shares the source finds it compiled, so the first study's 1 s compile is charged at
    # the plan's 0.2 s, and all 6 launch variants (0.3 s) fit its 0.55 s share. The run's last study has no later
    # one to absorb the rest: it is charged its wait and stops after the first batch, as without a charge.
    from autonorm.tune import Candidate

    timer = SteadyTimer()
    backend = LaunchKnobBackend(timer, compile_s=1.0)
    seeds = [Candidate("fake", GridConfig(a=1, b=b)) for b in (1, 2, 3, 4, 5, 6)]
    options = StudyOptions(trials=len(seeds), time_budget=0.55, compile_workers=2, compile_baseline=False,
                           verify=False, race=False, ends_run=ends_run, seed_compile_s=charge)
    runner = StudyRunner(SPEC, 8, {"fake": backend}, timer, options, seeds=seeds, deadline=timer.now + 10.0,
                         storage=make_storage(None, tmp_path / "j.journal"), name="s", clock=timer.clock)
    result = runner.run()
    assert result.failed == {} and backend.sources == {1}
    assert result.measured == measured


def test_a_study_whose_seeds_need_no_compile_is_still_charged_the_plans_figure(tmp_path):
    # Its source was compiled by an earlier study: it pays its share of that compile (0.3 s), so of the 0.55 s
    # share 0.25 s remain for timing, 4 of the 6 variants, not all 6 (0.3 s) as if the compile were free.
    from autonorm.tune import Candidate

    timer = SteadyTimer()
    backend = LaunchKnobBackend(timer, compile_s=0.0)
    seeds = [Candidate("fake", GridConfig(a=1, b=b)) for b in (1, 2, 3, 4, 5, 6)]
    options = StudyOptions(trials=len(seeds), time_budget=0.55, compile_workers=2, compile_baseline=False,
                           verify=False, race=False, seed_compile_s=0.3)
    runner = StudyRunner(SPEC, 8, {"fake": backend}, timer, options, seeds=seeds, deadline=timer.now + 10.0,
                         storage=make_storage(None, tmp_path / "j.journal"), name="s", clock=timer.clock)
    assert runner.run().measured == 4


def test_a_batch_must_fit_the_runs_deadline_as_well_as_the_share(tmp_path):
    # A second source's batch, predicted at the run's 1 s compile wait, would end past the deadline: not begun,
    # though the share (5 s) has room for it.
    from autonorm.tune import Candidate

    timer = SteadyTimer()
    backend = LaunchKnobBackend(timer, compile_s=1.0)
    seeds = [Candidate("fake", GridConfig(a=1, b=b)) for b in (1, 2)] + [Candidate("fake", GridConfig(a=2, b=1))]
    options = StudyOptions(trials=30, time_budget=5.0, compile_workers=2, compile_baseline=False, verify=False,
                           race=False)
    runner = StudyRunner(SPEC, 8, {"fake": backend}, timer, options, seeds=seeds, deadline=timer.now + 1.8,
                         storage=make_storage(None, tmp_path / "j.journal"), name="s", clock=timer.clock)
    runner.run()
    assert backend.sources == {1}


def test_a_torch_seed_is_no_source_to_compile_and_the_runs_last_study_begins(tmp_path):
    # torch compiles nothing, but renders a "source" per spec: counted as one new to the run, it priced every
    # study's seeds as a compile, and the run's last study, charged the slowest wait (5 s) against 2 s left, was
    # left out though its one real source was compiled.
    from autonorm.backends.torch_eager import TorchBackend
    from autonorm.config import NoConfig
    from autonorm.tune import Candidate, rank
    from autonorm.tune.compile_pool import CompilePool
    from autonorm.tune.space import SearchSpace

    timer = SteadyTimer()
    backends = {"fake": LaunchKnobBackend(timer, compile_s=0.0), "torch": TorchBackend()}
    seeds = [Candidate("fake", GridConfig(a=1, b=1)), Candidate("torch", NoConfig())]
    space = SearchSpace(SPEC, backends)
    assert rank.compile_key(space, seeds[1]) is None
    pool = CompilePool(backends, "cpu", 2, processes=False)
    pool.note_batch({rank.compile_key(space, seeds[0])}, 5.0)  # an earlier study compiled a=1, waiting 5 s
    options = StudyOptions(trials=4, time_budget=2.0, compile_workers=2, compile_baseline=False, verify=False,
                           race=False, ends_run=True)
    runner = StudyRunner(SPEC, 8, backends, timer, options, seeds=seeds, deadline=timer.now + 2.0,
                         storage=make_storage(None, tmp_path / "j.journal"), name="s", clock=timer.clock,
                         compile_pool=pool)
    assert runner.run().measured >= 2
    pool.close()


def test_the_studys_check_cases_are_drawn_with_its_seeds_compile_not_in_a_candidates_seconds(tmp_path, monkeypatch):
    # Drawing the cases (inputs and the fp64 reference) costs 1 s of the scripted clock. Paid by the first candidate
    # checked, it made the median of the first batch 0.55 s, a predicted 1.1 s batch past the 1.6 s share after one
    # batch; drawn with the seeds' compile, every candidate takes 0.05 s and all 6 variants fit.
    from autonorm import verify

    timer = SteadyTimer()
    reference = verify.expected_outputs

    def slow_reference(spec, inputs):
        timer.now += 1.0 / 3  # three cases
        return reference(spec, inputs)

    monkeypatch.setattr(verify, "expected_outputs", slow_reference)
    verify._case.cache_clear()
    result = _six_launch_variants(tmp_path, timer, verify=True)
    verify._case.cache_clear()
    assert result.failed == {} and result.measured == 6


def test_a_study_times_its_seeds_though_an_earlier_compile_wait_predicts_them_past_its_share(tmp_path):
    # An earlier study's compile took 5 s; this study's share is 1 s and its seeds' batch, whatever it waits, is
    # charged the run's 0.5 s. Asked the 5 s wait, the share refused the batch: the study was left out unspent. The
    # seeds are the plan's floor (`floor_trials`), which the share does not stop.
    from autonorm.tune import Candidate
    from autonorm.tune.compile_pool import CompilePool

    timer = SteadyTimer()
    backend = LaunchKnobBackend(timer, compile_s=2.0)
    pool = CompilePool({"fake": backend}, "cpu", 2, processes=False)
    pool.note_batch({"fake:another source"}, 5.0)
    seeds = [Candidate("fake", GridConfig(a=1, b=b)) for b in (1, 2, 3, 4)]
    options = StudyOptions(trials=len(seeds), time_budget=1.0, compile_workers=2, compile_baseline=False,
                           verify=False, race=False, seed_compile_s=0.5, floor_trials=len(seeds))
    runner = StudyRunner(SPEC, 8, {"fake": backend}, timer, options, seeds=seeds, deadline=timer.now + 10.0,
                         storage=make_storage(None, tmp_path / "j.journal"), name="s", clock=timer.clock,
                         compile_pool=pool)
    assert runner.run().measured == 4  # 0.5 s charged, 4 variants at 0.05 s
    pool.close()


@pytest.mark.parametrize("floor, deadline_s, measured", [(0, 10.0, 2), (5, 10.0, 6), (5, 1.2, 2)])
def test_a_studys_floor_is_timed_whatever_its_share_until_the_deadline(tmp_path, floor, deadline_s, measured):
    # Each timing costs 0.5 s of the scripted clock; the share, 0.6 s, pays for one batch of two. The plan's floor
    # (`floor_trials`, its seeds) is timed whatever the share: 5 seeds are three batches of two. The run's deadline
    # still stops it: at 1 s spent, a batch predicted at 1 s more would end past 1.2 s.
    from autonorm.tune import Candidate

    class HalfSecondTimer(SteadyTimer):
        def measure(self, spec, kernel, rows):
            self.now += 0.45  # and 0.05 s in SteadyTimer
            return super().measure(spec, kernel, rows)

    timer = HalfSecondTimer()
    seeds = [Candidate("fake", GridConfig(a=1, b=b)) for b in range(1, 7)]
    options = StudyOptions(trials=30, time_budget=0.6, compile_workers=2, compile_baseline=False, verify=False,
                           race=False, floor_trials=floor)
    runner = StudyRunner(SPEC, 8, {"fake": GridBackend()}, timer, options, seeds=seeds,
                         deadline=timer.now + deadline_s, storage=make_storage(None, tmp_path / "j.journal"),
                         name="s", clock=timer.clock)
    assert runner.run().measured == measured


class FirstLaunchIsSlowTimer(SteadyTimer):
    """A source's first timing in the tuning process costs 1 s (its load from the compile cache), any other 0.05 s."""

    def __init__(self):
        super().__init__()
        self.launched = set()

    def measure(self, spec, kernel, rows):
        source = getattr(getattr(kernel, "config", None), "a", None)  # None: the finish's torch baseline
        if source is not None and source not in self.launched:
            self.launched.add(source)
            self.now += 0.95
        return super().measure(spec, kernel, rows)


def test_a_sources_first_launch_does_not_predict_the_candidates_that_share_it(tmp_path):
    # Batch 1: the source's first launch (1 s) and a variant (0.05 s). Their median predicted a 1.05 s batch, past the
    # 1.6 s share after one batch; the variants' own 0.05 s predict 0.1 s, and all 6 fit.

    assert _six_launch_variants(tmp_path, FirstLaunchIsSlowTimer()).measured == 6


def _six_launch_variants(tmp_path, timer, verify: bool = False):
    """A study of 6 launch variants of one source, 2 a batch, in a 1.6 s share; its result."""
    from autonorm.tune import Candidate

    seeds = [Candidate("fake", GridConfig(a=1, b=b)) for b in (1, 2, 3, 4, 5, 6)]
    options = StudyOptions(trials=len(seeds), time_budget=1.6, compile_workers=2, compile_baseline=False,
                           verify=verify, race=False)
    return StudyRunner(SPEC, 8, {"fake": LaunchKnobBackend(timer, compile_s=0.0)}, timer, options, seeds=seeds,
                       storage=make_storage(None, tmp_path / "j.journal"), name="s", clock=timer.clock).run()
