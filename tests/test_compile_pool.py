"""The compile pool: a Numba CPU candidate compiled in a worker process is loaded from Numba's on-disk cache by
the tuning process (its dispatchers count cache hits, no misses); backends that cannot be warmed out of process
compile in a thread pool; a pool whose workers die leaves the tuning process to compile alone."""
import os
import sys
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import pytest
from fakes import FakeBackendBase

from autonorm.config import Config, knob
from autonorm.spec import NormSpec
from autonorm.tune.compile_pool import CompilePool
from autonorm.tune.space import Candidate
from autonorm.verify import check_candidate

SPEC = NormSpec("rmsnorm", "fwd", "float32", "float32", 64)


def _warmed_in_a_worker_then_compiled_here(tmp_path, monkeypatch, spec, config):
    """The kernel the tuning process compiles after a worker compiled `config`, checked (every variant
    launched, so each one loads), and the pool's compile seconds."""
    from autonorm.backends import get_backend

    monkeypatch.setenv("AUTONORM_CACHE_DIR", str(tmp_path))
    backend = get_backend("numba-cpu")
    cand = Candidate("numba-cpu", config)
    # a config no other test compiles: its module must not be in this process yet, or nothing would load
    module = f"autonorm_numba_cpu_{backend.render(spec, config).sha256[:24]}"
    assert module not in sys.modules
    with CompilePool({"numba-cpu": backend}, "cpu", workers=1) as pool:
        pool.prepare(spec, 64, [cand])  # on a CPU: returns once the worker is done
        assert module not in sys.modules  # the worker compiled, not this process
        assert list((tmp_path / "numba_cpu" / "__pycache__").glob("*.nbi")), "the worker left no Numba cache index"
        kernel, reason = pool.compile(spec, 64, cand)
        assert reason is None
        assert check_candidate(spec, kernel, 64, "cpu") is None
        assert pool.compile_s["numba-cpu"] > 0  # the worker's compile is counted
    return kernel


def _cache_counts(dispatcher) -> tuple[int, int]:
    if not hasattr(dispatcher, "stats"):  # a cfunc (a team worker of torch's OpenMP team) counts its hits only
        return dispatcher.cache_hits, 0
    return sum(dispatcher.stats.cache_hits.values()), sum(dispatcher.stats.cache_misses.values())


def test_a_candidate_compiled_in_a_worker_is_a_cache_hit_in_the_tuning_process(tmp_path, monkeypatch):
    pytest.importorskip("numba")
    from autonorm.backends.numba_cpu import NumbaCpuConfig

    # threads=1: only the serial variant exists, the cheapest compile that shows the mechanism
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 80, weight=False)
    kernel = _warmed_in_a_worker_then_compiled_here(
        tmp_path, monkeypatch, spec, NumbaCpuConfig(rows_per_task=256, vector_width=16, threads=1, fastmath=False))
    hits, misses = _cache_counts(kernel.dispatchers[1])
    assert hits >= 1 and misses == 0


@pytest.mark.slow  # Numba's parallel variant takes minutes to compile on a loaded 2-core machine
def test_both_variants_compiled_in_a_worker_are_cache_hits(tmp_path, monkeypatch):
    pytest.importorskip("numba")
    from autonorm.backends.numba_cpu import NumbaCpuConfig

    spec = NormSpec("layernorm", "fwd", "float16", "float32", 96, bias=True, residual=True)
    kernel = _warmed_in_a_worker_then_compiled_here(
        tmp_path, monkeypatch, spec, NumbaCpuConfig(rows_per_task=2, vector_width=16, threads=0, fastmath=False))
    for dispatcher in kernel.dispatchers:  # parallel, then serial
        hits, misses = _cache_counts(dispatcher)
        assert hits >= 1 and misses == 0


@dataclass(frozen=True)
class Knob(Config):
    backend = "fake"
    k: int = knob((1, 2, 3))


class FakeBackend(FakeBackendBase):
    config_cls = Knob

    def build(self, source, spec, config, device):
        if config.k == 3:
            raise RuntimeError("does not compile")
        return lambda *args: config.k


def test_a_backend_not_warmed_out_of_process_compiles_in_threads_and_failures_say_why():
    with CompilePool({"fake": FakeBackend()}, "cpu", workers=2) as pool:
        assert not pool.warmed("fake")
        good, bad = Candidate("fake", Knob(k=2)), Candidate("fake", Knob(k=3))
        pool.prepare(SPEC, 8, [good, bad])
        assert pool._processes is None  # no worker process was started for it
        kernel, reason = pool.compile(SPEC, 8, good)
        assert reason is None and kernel() == 2
        kernel, reason = pool.compile(SPEC, 8, bad)
        assert kernel is None and reason == "compile failed: RuntimeError: does not compile"
        assert set(pool.compile_s) == {"fake"}


def test_which_backends_are_warmed_depends_on_the_device():
    cpu, cuda = CompilePool({}, "cpu", workers=2), CompilePool({}, "cuda", workers=2)
    assert cpu.warmed("numba-cpu") and not cpu.warmed("triton") and not cpu.warmed("numba")
    assert cuda.warmed("triton") and cuda.warmed("cupy") and cuda.warmed("numba")  # "numba": Numba CUDA
    assert not cuda.warmed("numba-cpu") and not cuda.warmed("torch")
    assert not CompilePool({}, "cpu", workers=0).warmed("numba-cpu")
    assert not CompilePool({}, "cpu", workers=2, processes=False).warmed("numba-cpu")


def test_workers_that_die_leave_the_tuning_process_to_compile(caplog):
    pytest.importorskip("numba")
    from autonorm.backends import get_backend

    class DeadPool:
        def submit(self, *args, **kwargs):
            raise BrokenProcessPool("a worker died")

        def shutdown(self, **kwargs):
            pass

    backend = get_backend("numba-cpu")
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 64)
    cand = Candidate("numba-cpu", backend.heuristic(spec))
    with CompilePool({"numba-cpu": backend}, "cpu", workers=2) as pool:
        pool._processes = DeadPool()
        pool.prepare(spec, 8, [cand])
        assert not pool.warmed("numba-cpu") and "compile workers stopped" in caplog.text
        kernel, reason = pool.compile(spec, 8, cand)
        assert reason is None and callable(kernel)


def test_the_tune_summary_adds_compile_seconds_per_backend_and_the_share_spent_timing():
    from autonorm.tune.finalize import StudyResult
    from autonorm.tune.run import time_summary

    ran = [StudyResult(SPEC, 8, None, 4, 4, compile_s={"numba-cpu": 3.0, "torch": 0.5}, timing_s=6.0, wall_s=10.0),
           StudyResult(SPEC, 16, None, 4, 4, compile_s={"numba-cpu": 1.0}, timing_s=9.0, wall_s=20.0)]
    stored = StudyResult(SPEC, 32, None, 4, 4)  # taken from the storage: nothing ran
    assert time_summary(ran + [stored]) == "compiling: numba-cpu 4.0 s, torch 0.5 s; timing: 50% of 30 s in 2 studies"
    assert time_summary([stored]) == "no study ran: nothing compiled or timed"


def test_a_pool_shared_by_a_grids_studies_hands_each_spec_its_own_kernel():
    class ByHidden(FakeBackend):
        def build(self, source, spec, config, device):
            return lambda *args: spec.hidden

    cand, other = Candidate("fake", Knob(k=1)), NormSpec("rmsnorm", "fwd", "float32", "float32", 128)
    with CompilePool({"fake": ByHidden()}, "cpu", workers=1) as pool:
        pool.prepare(SPEC, 8, [cand])  # a study that stopped before it timed this candidate
        kernel, reason = pool.compile(other, 8, cand)
        assert reason is None and kernel() == 128


# -- Triton: one warm job per specialization class of the row count, not per row count --

def test_tritons_integer_classes_are_tritons_own():
    pytest.importorskip("triton")
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from autonorm.tune.compile_pool import triton_int_class

    classes = {}
    for value in (1, 2, 3, 15, 16, 17, 32, 1031, 2048, 2**31 - 16, 2**31, 2**31 + 3):
        tritons = native_specialize_impl(BaseBackend, value, False, True, True)  # (type, specialization)
        classes.setdefault(triton_int_class(value), set()).add(tritons)
    # the same class here is one specialization there, and different classes are different ones
    assert all(len(ts) == 1 for ts in classes.values())
    assert len({t for ts in classes.values() for t in ts}) == len(classes)


class _SpyKernel:
    """Stands in for a rendered module's @triton.jit kernel: records the integer arguments of each launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(
            tuple(a for a in args if isinstance(a, int) and not isinstance(a, bool)))


@pytest.mark.parametrize("spec", [NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 4096),
                                  NormSpec("layernorm", "bwd", "float16", "float32", 1024, bias=True)])
def test_the_triton_signature_follows_the_integers_the_launcher_passes(tmp_path, monkeypatch, spec):
    pytest.importorskip("triton")
    from autonorm.backends.base import import_generated
    from autonorm.backends.triton import TritonBackend
    from autonorm.tune.compile_pool import triton_int_class, triton_row_args
    from autonorm.verify import make_inputs

    monkeypatch.setenv("AUTONORM_CACHE_DIR", str(tmp_path))
    backend = TritonBackend()
    for config in (backend.heuristic(spec), *backend.space(spec)[:: max(1, len(backend.space(spec)) // 6)]):
        module = import_generated(backend.render(spec, config), "triton")
        spy = _SpyKernel()
        monkeypatch.setattr(module, f"_{spec.op}_{spec.direction}", spy)
        for rows in (1, 2, 3, 16, 17, 48, 256, 1031, 4096):
            module.launch(*make_inputs(spec, rows, "cpu").args(spec))
            passed, row_args = spy.launches[-1], triton_row_args(spec, config, rows)
            # the row strides come first and are the spec's; what follows is what triton_row_args says
            assert passed[-len(row_args):] == row_args
            assert all(triton_int_class(v) == triton_int_class(spec.hidden) for v in passed[:-len(row_args)])


class _SpyWorkers:
    """The worker pool on a GPU that is not here: records each warm job's row count, each one done at once."""

    def __init__(self):
        self.rows = []

    def submit(self, fn, backend_name, spec, config, device, rows):
        from concurrent.futures import Future

        self.rows.append(rows)
        future = Future()
        future.set_result((0.0, None))
        return future

    def shutdown(self, **kwargs):
        pass


def test_a_triton_seed_is_warmed_once_per_specialization_class_and_a_warm_class_submits_nothing():
    pytest.importorskip("triton")
    from autonorm.backends.triton import TritonBackend

    spec = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 4096)  # verified at 1,031 rows below it, 2,048 above
    backend = TritonBackend()
    cand = Candidate("triton", backend.heuristic(spec))
    pool = CompilePool({"triton": backend}, "cuda", workers=1)
    pool._processes = workers = _SpyWorkers()
    with pool:
        for rows in (16, 256, 1, 4096, 32768, 64):
            pool.prepare(spec, rows, [cand])
    # 16: the timer's class (divisible by 16) and the check's (1,031 and 3 rows: neither, contiguous and strided);
    # 256 and 64: nothing new; 1: a constant; 4096: verified at 2,048 rows, row-strided and divisible by 16, new;
    # 32768: the same classes as 4096
    assert workers.rows == [16, 1, 4096]
    assert pool.checked(spec, 256, cand) == (True, None)  # verified at 1,031 rows, as 16 was


def test_the_worker_launches_the_timers_class_when_the_check_does_not():
    from autonorm.tune.compile_pool import _launch_timed_class, timed_rows_to_warm

    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 64)
    config = None  # the forward's row arguments do not depend on the config
    assert timed_rows_to_warm(spec, config, 256) == 16  # the smallest of 256's class: small inputs
    assert timed_rows_to_warm(spec, config, 1) == 1
    assert timed_rows_to_warm(spec, config, 5) is None  # the check's 3 rows are of its class
    assert timed_rows_to_warm(spec, config, 4096) is None  # checked at 4,096 rows itself
    launched = []
    _launch_timed_class(spec, config, lambda *args: launched.append(args[0].shape[0]), 256, "cpu")
    _launch_timed_class(spec, config, lambda *args: launched.append(args[0].shape[0]), 4096, "cpu")
    assert launched == [16]


def test_a_compile_worker_exits_without_the_teardown_registered_before_it_started(tmp_path):
    # A worker's interpreter teardown (torch's and Numba's atexit work, registered at their import) kept the tuning
    # process waiting at the run's end: the worker's own handler ends it first, after flushing what it printed.
    import subprocess

    marker = tmp_path / "teardown-ran"
    code = (
        "import atexit, pathlib\n"
        f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'ran')  # stands for an import's teardown\n"
        "from autonorm.tune.compile_pool import _start_worker\n"
        f"_start_worker({str(tmp_path)!r})\n"
        "print('compiled', end='')  # buffered: stdout is a pipe\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "compiled" and not marker.exists()


def test_a_seeds_batch_wait_is_kept_with_whether_it_compiled_a_new_source():
    pool = CompilePool({}, "cpu", workers=1, processes=False)
    pool.note_batch({"numba-cpu:a"}, 4.0, seeds=True)  # the first study of source a: compiles it
    pool.note_batch({"numba-cpu:a"}, 1.0, seeds=True)  # a later study of a: the checks alone
    pool.note_batch({"numba-cpu:b"}, 6.0)  # a search batch with a new source: not a seeds' wait
    pool.close()
    assert pool.seed_waits == [(True, 4.0), (False, 1.0)]
    assert pool.compile_waits == [4.0, 6.0]
