"""scripts/planner_tables.py: search-efficiency tables replayed, the budgeted planner's order beside TPE's."""
from pathlib import Path

import pytest
import torch

from autonorm.spec import NormSpec
from autonorm.tune import SearchSpace, rank

pytest.importorskip("numba")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pt():
    from fakes import load_script

    return load_script("planner_tables")


def test_to_target_counts_candidates_and_distinct_compiles_until_two_percent(pt):
    table = {"a": 10.0, "b": 9.0, "c": 5.0, "d": 5.05}
    source = {"a": "s1", "b": "s1", "c": "s2", "d": "s3"}.get
    assert pt.to_target(["a", "b", "d", "c"], table, source) == (3, 2)  # d is within 2% of c's 5.0
    assert pt.to_target(["a", "b"], table, source) is None


def test_a_best_sharing_the_heuristics_source_is_found_by_the_planner_without_a_further_compile(pt):
    from backends.numba_cpu import NumbaCpuBackend
    from backends.torch_eager import TorchBackend

    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 1024)
    space = SearchSpace(spec, {"numba-cpu": NumbaCpuBackend(), "torch": TorchBackend()}, torch.device("cpu"))
    heuristic = NumbaCpuBackend().heuristic(spec)

    def us(cand):  # fastest: the heuristic's source with the most rows a task on the whole pool (not a seed)
        if cand.backend == "torch":
            return 500.0
        c = cand.config
        same_source = (c.vector_width, c.fastmath) == (heuristic.vector_width, heuristic.fastmath)
        return 100.0 + (0 if same_source else 50) + (256 - c.rows_per_task) / 10 + (c.threads != 0) * 5
    table = {c.key: us(c) for c in space.candidates()}
    facts = rank.DeviceFacts("cpu", workers=2, copy_gbps=20.0)
    row = pt.study_row(space, 1024, facts, table, tpe_seeds=1)
    trials, compiles = row["planner"]
    assert compiles == 2  # the numba-cpu heuristic's source and torch: nothing else compiled
    assert trials <= 2 + 26
    assert row["sources"] == 9 and row["space"] == len(space)
    assert f"| {trials} (2) |" in pt.markdown([row])
    assert row["transfer"] is None and row["transfer_from"] == []


def test_a_transferred_best_is_timed_right_after_the_heuristics(pt):
    from backends.numba_cpu import NumbaCpuBackend
    from backends.torch_eager import TorchBackend

    spec = NormSpec("layernorm", "fwd", "float32", "float32", 1024, **NormSpec.feature_kwargs("weight+bias"))
    space = SearchSpace(spec, {"numba-cpu": NumbaCpuBackend(), "torch": TorchBackend()}, torch.device("cpu"))
    far = next(c for c in space.candidates() if c.backend == "numba-cpu" and c.config.vector_width == 16
               and not c.config.fastmath and c.config.rows_per_task == 1)
    table = {c.key: (50.0 if c.key == far.key else 100.0 + i % 7) for i, c in enumerate(space.candidates())}
    facts = rank.DeviceFacts("cpu", workers=2, copy_gbps=20.0)
    row = pt.study_row(space, 1024, facts, table, tpe_seeds=1, transferred=[far])
    # the heuristics (numba-cpu's on the pool and on one thread, one source; torch), then the transferred best:
    # a third source
    assert row["transfer"] == (4, 3)
    assert row["planner"] is None or row["planner"][0] > 4
    assert far.short() in pt.markdown([row])
