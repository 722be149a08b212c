"""Replaying a search on a table of earlier timings (kernel_tuner's "simulation mode").

The tuner's own `StudyRunner` runs against `ReplayBackend`s, whose kernels carry
their candidate key, and a `ReplayTimer` that answers from the table: the search
is judged without timing noise, as often as wanted (scripts/search_efficiency.py,
docs/benchmarks/search-efficiency.md).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from .. import measure
from ..backends.torch_eager import TorchBackend
from .fleet import make_storage
from .options import StudyOptions
from .run import heuristic_seeds
from .space import Candidate, SearchSpace
from .study import StudyRunner


class ReplayBackend:
    """Stands in for a real backend: same name, configs and space; kernels carry their candidate key."""

    def __init__(self, real):
        self.real, self.name, self.config_cls = real, real.name, real.config_cls
        self._eager = {}

    def space(self, spec):
        return self.real.space(spec)

    def heuristic(self, spec):
        return self.real.heuristic(spec)

    def seed_configs(self, spec):
        return self.real.seed_configs(spec)

    def template_hash(self):
        return "replay"

    def compile(self, spec, config, device):
        eager = self._eager.setdefault(spec, TorchBackend().build(None, spec, None, device))

        def kernel(*args):
            return eager(*args)
        kernel.key = Candidate(self.name, config).key
        return kernel


class ReplayTimer:
    """Timings from `table` (candidate key -> µs); a key missing from it failed when it was measured."""

    def __init__(self, table):
        self.table, self.order = table, []

    def _us(self, kernel):
        return self.table.get(getattr(kernel, "key", None), float("inf"))

    def measure(self, spec, kernel, rows):
        self.order.append(kernel.key)
        us = self._us(kernel)
        if us == float("inf"):
            raise RuntimeError("not in the table (failed when it was measured)")
        return measure.Timing(us, us, us, 1)

    def interleaved(self, spec, kernels, rows):
        return [measure.Timing(self._us(k), self._us(k), self._us(k), 1) for k in kernels]

    def describe(self):
        return {"timer": "replay"}


def replay(spec, rows, backends, table, seed, extra_seeds=(), n_trials=None, sampler=None) -> list[str]:
    """The candidate keys one tuner search times, in order, replayed on `table`.

    Default: a budget one below the space size and patience off, which keeps the runner in TPE mode
    (not exhaustive) until it has seen everything. With `n_trials` (and `patience` None), the tuner's
    own stopping rules apply: what `autonorm tune --trials n_trials` would spend. `sampler` (seed -> an
    Optuna sampler) replaces the tuner's."""
    replay = {name: ReplayBackend(b) for name, b in backends.items()}
    size = len(SearchSpace(spec, backends))
    timer = ReplayTimer(table)
    with tempfile.TemporaryDirectory() as tmp:
        storage = make_storage(None, Path(tmp) / "j")
        seeds = heuristic_seeds(backends, spec) + list(extra_seeds)
        # The table holds only candidates verified when they were measured: nothing to verify again.
        options = StudyOptions(trials=n_trials or size - 1, time_budget=3600, patience=None if n_trials else size,
                               compile_workers=1, compile_baseline=False, seed=seed, sampler=sampler, verify=False)
        StudyRunner(spec, rows, replay, timer, options, storage=storage, name="replay", seeds=seeds).run()
    return timer.order
