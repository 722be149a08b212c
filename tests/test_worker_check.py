"""The reference check runs once per candidate: where a compile worker compiled and checked exactly this config at
the study's row count, the tuning process takes its verdict instead of checking again (on a GPU the worker checks
while the timer runs, so the check leaves the timer's path). An in-process stand-in for the worker pool runs the
real warm job (`compile_pool._warm`), so what a worker would do is exact."""
from concurrent.futures import Future
from dataclasses import dataclass

import pytest
from fakes import FakeBackendBase, ScriptedTimer

from autonorm import verify
from autonorm.backends.torch_eager import TorchBackend
from autonorm.config import Config, knob
from autonorm.render import Source
from autonorm.spec import NormSpec
from autonorm.tune import StudyOptions, StudyRunner, compile_pool, make_storage
from autonorm.tune import study as study_module
from autonorm.tune.compile_pool import CompilePool
from autonorm.tune.space import Candidate

pytest.importorskip("optuna")

SPEC = NormSpec("rmsnorm", "fwd", "float32", "float32", 64)


@dataclass(frozen=True)
class Launch(Config):
    backend = "fake"
    k: int = knob((1, 2))        # in the source
    grid: int = knob((1, 2))     # a launch knob: configs differing only here share a source


class LaunchBackend(FakeBackendBase):
    config_cls = Launch

    def heuristic(self, spec):
        return Launch(1, 1)

    def render(self, spec, config):
        return Source.of(f"fake {spec!r} k={config.k}", "")

    def build(self, source, spec, config, device):
        def kernel(*args):
            return None
        kernel.config = config
        return kernel


class InlineWorkers:
    """The worker pool, run in this process: each job done when submitted."""

    def submit(self, fn, *args):
        future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, **kwargs):
        pass


@pytest.fixture
def checks(monkeypatch):
    """The reference checks run, by where: ("worker" | "here", config); k=2 is wrong."""
    from autonorm import backends as registry

    monkeypatch.setitem(registry.BACKENDS, "fake", "tests:LaunchBackend")
    monkeypatch.setitem(registry._instances, "fake", LaunchBackend())
    monkeypatch.setitem(compile_pool.WARMED_ON, "fake", "cpu")
    ran = []

    def check(where):
        def run(spec, kernel, rows, device, **kw):
            config = getattr(kernel, "config", None)
            ran.append((where, config))
            return "wrong output" if config is not None and config.k == 2 else None
        return run
    monkeypatch.setattr(verify, "check_candidate", check("worker"))  # what _warm imports
    monkeypatch.setattr(study_module, "check_candidate", check("here"))
    return ran


def pool():
    p = CompilePool({"fake": LaunchBackend(), "torch": TorchBackend()}, "cpu", workers=1)
    p._processes = InlineWorkers()
    return p


def test_the_worker_verdict_counts_for_the_exact_config_at_the_rows_it_checked(checks):
    a, b, wrong = Candidate("fake", Launch(1, 1)), Candidate("fake", Launch(1, 2)), Candidate("fake", Launch(2, 1))
    with pool() as p:
        p.prepare(SPEC, 8, [a, b, wrong])
        for cand in (a, b, wrong):
            p.compile(SPEC, 8, cand)
        assert p.checked(SPEC, 8, a) == (True, None)
        assert p.checked(SPEC, 8, wrong) == (True, "wrong output")
        assert p.checked(SPEC, 8, b) == (False, None)  # warmed as `a` (same source), launched with a's grid
        assert p.checked(SPEC, 16, a) == (False, None)  # another row count: not checked there
    assert [c for where, c in checks] == [a.config, wrong.config]


def test_a_study_does_not_check_again_what_a_worker_checked(checks, tmp_path):
    options = StudyOptions(trials=8, time_budget=60, compile_workers=4, compile_baseline=False)
    with pool() as p:
        result = StudyRunner(SPEC, 8, {"fake": LaunchBackend(), "torch": TorchBackend()}, ScriptedTimer(), options,
                             storage=make_storage(None, tmp_path / "j.journal"), name="s", copy_gbps=10.0,
                             compile_pool=p).run()
    here = [c for where, c in checks if where == "here"]
    worker = [c for where, c in checks if where == "worker"]
    # every config of the space evaluated: the two warmed ones checked by a worker only, the two that share their
    # source (and torch, never warmed) checked here
    assert len(worker) == 2 and not set(worker) & set(here)
    assert len(here) == 3 and None in here  # torch eager's kernel has no config
    assert sorted(result.failed.values()) == ["wrong output", "wrong output"]  # k=2 in either grid


def test_the_pool_and_the_plan_name_backends_as_the_registry_does():
    from autonorm.backends import BACKENDS
    from autonorm.tune import plan as planner

    # a misspelt name silently compiled Numba CUDA in the tuning process's threads, on the timer's path
    assert set(compile_pool.WARMED_ON) <= set(BACKENDS) and set(planner.COMPILE_S) <= set(BACKENDS)


@pytest.mark.parametrize("shape_free", [True, False])
def test_a_backend_that_does_not_specialize_on_rows_is_warmed_once_for_all_of_a_specs_row_counts(
        checks, monkeypatch, shape_free):
    monkeypatch.setattr(compile_pool, "SHAPE_FREE", frozenset({"fake"} if shape_free else ()))
    cand = Candidate("fake", Launch(1, 1))
    with pool() as p:
        for rows in (8, 16):
            p.prepare(SPEC, rows, [cand])
            p.compile(SPEC, rows, cand)
        # the second row count: warmed again only where the compiler may specialize on it; else the
        # tuning process checks the kernel it compiled before
        assert p.checked(SPEC, 16, cand) == ((False, None) if shape_free else (True, None))
    assert len([c for where, c in checks if where == "worker"]) == (1 if shape_free else 2)


def test_on_a_gpu_a_specs_studies_checked_at_the_same_rows_share_each_candidates_verdict(checks, monkeypatch):
    from autonorm.verify import VERIFY_MIN_ROWS

    class GpuWorkers(InlineWorkers):  # no GPU here: a worker's compile and check, done, found right
        def submit(self, fn, *args):
            submitted.append(args)
            return super().submit(lambda *a: (0.0, None))

    monkeypatch.setitem(compile_pool.WARMED_ON, "fake", "cuda")
    cand, torch_eager = Candidate("fake", Launch(1, 1)), Candidate("torch", TorchBackend().heuristic(SPEC))
    p, submitted = CompilePool({"fake": LaunchBackend(), "torch": TorchBackend()}, "cuda", workers=1), []
    p._processes = GpuWorkers()
    with p:
        p.prepare(SPEC, 8, [cand])
        p.compile(SPEC, 8, cand)  # waits for the worker (the tuning process's own compile fails without a GPU)
        p.remember(SPEC, 8, torch_eager, None)  # the tuning process's own check of torch eager
        # 8 and 16 rows are both verified at VERIFY_MIN_ROWS: the worker's and the tuning process's verdicts hold
        assert p.checked(SPEC, 16, cand) == (True, None) and p.checked(SPEC, 16, torch_eager) == (True, None)
        # verified at its own row count: checked again
        assert p.checked(SPEC, 2 * VERIFY_MIN_ROWS, cand) == (False, None)
        assert p.checked(SPEC, 2 * VERIFY_MIN_ROWS, torch_eager) == (False, None)
    assert [(config, rows) for _, _, config, _, rows in submitted] == [(cand.config, 8)]


def test_on_the_cpu_each_row_count_is_checked_as_before(checks):
    torch_eager = Candidate("torch", TorchBackend().heuristic(SPEC))
    with pool() as p:
        p.remember(SPEC, 8, torch_eager, None)
        assert p.checked(SPEC, 8, torch_eager) == (False, None)


def test_a_study_hands_the_checks_it_ran_itself_to_the_pool(checks, tmp_path, monkeypatch):
    options = StudyOptions(trials=8, time_budget=60, compile_workers=4, compile_baseline=False)
    kept = []
    with pool() as p:
        monkeypatch.setattr(p, "remember", lambda spec, rows, cand, verdict: kept.append((cand.backend, verdict)))
        StudyRunner(SPEC, 8, {"fake": LaunchBackend(), "torch": TorchBackend()}, ScriptedTimer(), options,
                    storage=make_storage(None, tmp_path / "j.journal"), name="s", copy_gbps=10.0,
                    compile_pool=p).run()
    # the three checked here (test_a_study_does_not_check_again_what_a_worker_checked), not the workers' two
    assert len(kept) == 3 and ("torch", None) in kept and ("fake", "wrong output") in kept
