"""The order a budgeted study times its first candidates in (autonorm/tune/rank.py): compiles paid once."""
import pytest
import torch

from autonorm.spec import NormSpec
from autonorm.tune import SearchSpace, rank

numba = pytest.importorskip("numba")


@pytest.fixture(scope="module")
def cpu_space():
    from backends.numba_cpu import NumbaCpuBackend
    from backends.torch_eager import TorchBackend

    spec = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 1024)
    return SearchSpace(spec, {"numba-cpu": NumbaCpuBackend(), "torch": TorchBackend()}, torch.device("cpu"))


def _heuristic_seeds(space):
    return [c for c in space.candidates() if c.config == space.backends[c.backend].heuristic(space.spec)]


def _launch_variants_of_the_heuristic(space) -> int:
    """The numba-cpu configs other than the heuristic that render its source (its vector_width and fastmath)."""
    h = space.backends["numba-cpu"].heuristic(space.spec)
    return sum((c.vector_width, c.fastmath) == (h.vector_width, h.fastmath) for c in space.configs["numba-cpu"]) - 1


def test_candidates_sharing_a_seeds_compiled_source_come_first_then_ranked_more(cpu_space):
    facts = rank.DeviceFacts("cpu", workers=2, copy_gbps=20.0)
    seeds = _heuristic_seeds(cpu_space)
    chosen, name = rank.first_to_time(cpu_space, 1024, facts, seeds)
    compiled = {rank.compile_key(cpu_space, s) for s in seeds}
    shared = [c for c in cpu_space.candidates() if rank.compile_key(cpu_space, c) in compiled
              and c.key not in {s.key for s in seeds}]
    assert name == "near the heuristic"
    # numba-cpu renders one source per (vector_width, fastmath): its launch variants share the heuristic's
    n_shared = _launch_variants_of_the_heuristic(cpu_space)
    assert len(shared) == n_shared
    assert {c.key for c in chosen[:n_shared]} == {c.key for c in shared}
    assert all(rank.compile_key(cpu_space, c) not in compiled for c in chosen[n_shared:])
    assert len(chosen) == n_shared + rank.RANKED
    assert not {c.key for c in chosen} & {s.key for s in seeds}
    # within each group the distance from the heuristic still orders
    heuristic = cpu_space.backends["numba-cpu"].heuristic(cpu_space.spec)
    steps = [rank.heuristic_distance(cpu_space, c, heuristic) for c in chosen[:n_shared]]
    assert steps == sorted(steps)


def test_a_knob_the_other_knobs_pin_counts_no_steps_from_the_heuristic(cpu_space):
    # A one-thread forward takes one rows_per_task: it is one step (the thread count) from the parallel heuristic,
    # among the first launch variants a budgeted study times, not six steps away behind them.
    from autonorm.tune import Candidate
    from backends.numba_cpu import SERIAL_ROWS_PER_TASK

    heuristic = cpu_space.backends["numba-cpu"].heuristic(cpu_space.spec)
    serial = Candidate("numba-cpu", type(heuristic)(rows_per_task=SERIAL_ROWS_PER_TASK, vector_width=1, threads=1,
                                                    fastmath=True))
    assert heuristic.threads == 0 and heuristic.rows_per_task != SERIAL_ROWS_PER_TASK
    assert cpu_space.named(serial.key) is not None
    assert rank.heuristic_distance(cpu_space, serial, heuristic) == 1
    parallel = Candidate("numba-cpu", type(heuristic)(rows_per_task=heuristic.rows_per_task // 4, vector_width=1,
                                                      threads=0, fastmath=True))
    assert rank.heuristic_distance(cpu_space, parallel, heuristic) > 1  # a parallel launch's rows_per_task counts
    chosen, _ = rank.first_to_time(cpu_space, 1024, rank.DeviceFacts("cpu", workers=2, copy_gbps=20.0),
                                   _heuristic_seeds(cpu_space))
    # the first batch after the seeds (two candidates, one per compile worker): one moves rows_per_task, one the
    # thread count, instead of both rows_per_task neighbours
    assert serial.key in {c.key for c in chosen[:2]}
    assert {c.config.threads for c in chosen[:2]} == {0, 1}


def test_at_equal_steps_every_set_of_knobs_moved_is_tried_before_a_second_of_any():
    from autonorm.tune import Candidate

    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 4096)
    from backends.numba_cpu import NumbaCpuBackend
    space = SearchSpace(spec, {"numba-cpu": NumbaCpuBackend()}, torch.device("cpu"))
    heuristic = space.backends["numba-cpu"].heuristic(spec)
    order = rank.nearest_to_heuristics(space)
    steps = [rank.heuristic_distance(space, c, heuristic) for c in order]
    assert steps == sorted(steps)
    for d in set(steps):
        moved = [rank._moved_knobs(space, c, heuristic) for c, s in zip(order, steps) if s == d]
        groups = list(dict.fromkeys(moved))
        assert moved[:len(groups)] == groups  # each set of moved knobs once, first
    one_step = {rank._moved_knobs(space, c, heuristic) for c, s in zip(order, steps) if s == 1}
    assert {("rows_per_task",), ("threads",)} <= one_step and Candidate("numba-cpu", heuristic).key == order[0].key


def test_compile_key_is_the_rendered_source_not_the_config(cpu_space):
    a, b = (c for c in cpu_space.candidates() if c.backend == "numba-cpu" and c.config.vector_width == 1
            and c.config.fastmath and c.config.threads == 0 and c.config.rows_per_task in (8, 64))
    other = next(c for c in cpu_space.candidates() if c.backend == "numba-cpu" and c.config.vector_width == 4)
    assert a.key != b.key and rank.compile_key(cpu_space, a) == rank.compile_key(cpu_space, b)
    assert rank.compile_key(cpu_space, other) != rank.compile_key(cpu_space, a)


def test_a_budgeted_study_is_seeded_with_the_shared_source_candidates_then_the_ranked(cpu_space):
    from autonorm.tune.run import _with_ranked
    from autonorm.tune.transfer import Seed

    facts = rank.DeviceFacts("cpu", workers=2, copy_gbps=20.0)
    seeds = [Seed(c, "heuristic") for c in _heuristic_seeds(cpu_space)]
    chosen = _with_ranked(seeds, cpu_space, 1024, facts)
    compiled = {rank.compile_key(cpu_space, s.candidate) for s in seeds}
    n_shared = _launch_variants_of_the_heuristic(cpu_space)
    assert chosen[:2] == seeds and len(chosen) == 2 + n_shared + rank.RANKED
    assert all(rank.compile_key(cpu_space, s.candidate) in compiled for s in chosen[2:2 + n_shared])
    assert {s.source for s in chosen[2:]} == {"near the heuristic"}


@pytest.mark.parametrize("pool", ["torch team", "numba"])
def test_numba_cpu_seeds_its_heuristic_and_a_second_launch_of_its_source(cpu_space, pool, monkeypatch):
    """On torch's OpenMP team the second seed is the heuristic with the fewest tasks; on Numba's pool, the heuristic
    on one thread. Either is a timing, not a compile."""
    from backends.numba_cpu import SERIAL_ROWS_PER_TASK, NumbaCpuBackend, _TorchTeam

    if pool == "numba":
        monkeypatch.setattr(_TorchTeam, "looked", True)
        monkeypatch.setattr(_TorchTeam, "parallel", None)
    elif _TorchTeam.entry() is None:
        pytest.skip("torch does not run on GNU OpenMP here")
    backend = NumbaCpuBackend()
    for spec in (cpu_space.spec, NormSpec("layernorm", "bwd", "float32", "float32", 4096, bias=True)):
        heuristic, second = backend.seed_configs(spec)
        assert heuristic == backend.heuristic(spec) and heuristic.threads == 0
        assert second.threads == (0 if pool == "torch team" else 1)
        assert (second.vector_width, second.fastmath) == (heuristic.vector_width, heuristic.fastmath)
        # the fewest tasks: on one thread a backward's fewest dW partials, on the team the fewest serial calls
        assert second.rows_per_task == SERIAL_ROWS_PER_TASK != heuristic.rows_per_task
        assert backend.render(spec, second).sha256 == backend.render(spec, heuristic).sha256  # a timing, no compile
    from autonorm.tune.run import _seeds

    seeds = [s.candidate for s in _seeds(cpu_space.spec, 1024, cpu_space, None, [])]
    # every backend's heuristic first: a study cut to its first batch of two has timed torch eager
    assert [(c.backend, getattr(c.config, "threads", None)) for c in seeds] == [("numba-cpu", 0), ("torch", None),
                                                                               ("numba-cpu", second.threads)]
