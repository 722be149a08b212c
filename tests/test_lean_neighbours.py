"""On a GPU a neighbour (a study seeded from its sources' winners) times those winners, torch eager and the
heuristics of the backends its sources won with, not every backend's heuristic; on the CPU it keeps them all.
The plan counts the GPU neighbour's seeds as the most the rule can leave it, before any winner is known.
"""
import torch
from test_transfer import BlockBackend, BlockConfig, spec

from autonorm.backends.torch_eager import TorchBackend
from autonorm.tune import SearchSpace, transfer
from autonorm.tune import plan as planner
from autonorm.tune.run import neighbour_seeds
from autonorm.tune.space import Candidate

# three backends of the same fake kernels under three names (a GPU's Triton, CuPy and Numba CUDA), and torch eager
BACKENDS = {"fake": BlockBackend(), "other": BlockBackend(), "third": BlockBackend(), "torch": TorchBackend()}


def heuristics(s):
    return [transfer.Seed(Candidate(name, b.heuristic(s)), "heuristic") for name, b in BACKENDS.items()]


def test_a_gpu_neighbour_drops_the_heuristics_of_backends_none_of_its_sources_won_with():
    s = spec(512)
    space = SearchSpace(s, BACKENDS)
    won = [transfer.Seed(Candidate("fake", BlockConfig(128, 4, 2)), "anchor N=256 R=64")]
    gpu = neighbour_seeds(torch.device("cuda"), space, won, heuristics(s))
    assert [(x.candidate.backend, x.source) for x in gpu] == [("fake", "anchor N=256 R=64"), ("fake", "heuristic"),
                                                              ("torch", "heuristic")]
    cpu = neighbour_seeds(torch.device("cpu"), space, won, heuristics(s))  # the CPU's budgeted search unchanged
    assert [x.candidate.backend for x in cpu] == ["fake", "fake", "other", "third", "torch"]
    # an anchor (no winner transferred) keeps every heuristic on a GPU too
    assert [x.candidate.backend for x in neighbour_seeds(torch.device("cuda"), space, [], heuristics(s))] == [
        "fake", "other", "third", "torch"]


def test_a_seed_that_is_not_only_a_heuristic_is_kept():
    s = spec(512)
    earlier = transfer.Seed(Candidate("other", BlockConfig(64, 2, 1)), "earlier winner")
    merged = transfer.Seed(Candidate("other", BlockConfig(32, 2, 1)), "heuristic + same-arch h100-pcie")
    won = [transfer.Seed(Candidate("fake", BlockConfig(128, 4, 2)), "anchor N=256 R=64")]
    kept = transfer.lean_seeds([earlier, merged] + heuristics(s), won)
    assert kept[:2] == [earlier, merged]
    assert [x.candidate.backend for x in kept[2:]] == ["fake", "torch"]
    assert transfer.lean_seeds(heuristics(s), []) == heuristics(s)  # its sources left out: every heuristic


def test_the_plan_counts_a_gpu_neighbours_seeds_as_the_most_the_rule_leaves():
    costs = planner.Costs(dict.fromkeys(BACKENDS, 0.0), time_s=0.05, finish_s=0.2)
    shapes = [(spec(h), 64) for h in (256, 512, 1024)]  # 512: a neighbour of 2 sources

    def seeds(lean):
        jobs = [(x, r, f"study-{x.hidden}", SearchSpace(x, BACKENDS), heuristics(x)) for x, r in shapes]
        plans = planner.study_plans(jobs, costs, 60, {})
        transfer.shape_plans(plans, transfer.roles(shapes), [job[4] for job in jobs], lean)
        return [p.seeds for p in plans]
    # 2 winners, torch eager, and at most one more heuristic a source: 2 of the 3 others
    assert seeds(True) == [4, 2 + 1 + 2, 4]
    assert seeds(False) == [4, 4 + 2, 4]
    assert transfer.lean_count(heuristics(spec(512)), 1) == 1 + 1 + 1  # one source: one heuristic beside torch's
