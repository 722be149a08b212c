"""The spaces of a grid's specs enumerated over the compile pool's worker processes (`space.build_spaces`) are the
spaces the tuning process would build one after another; a small grid, or a backend the registry does not know,
is enumerated in the tuning process."""
from dataclasses import dataclass

import pytest
from fakes import TorchBackedFake

from autonorm.backends import get_backend
from autonorm.config import Config, knob
from autonorm.grids import STANDARD
from autonorm.tune import space as space_module
from autonorm.tune.compile_pool import CompilePool
from autonorm.tune.space import SearchSpace, build_spaces

SPECS = [s for s in STANDARD.specs() if s.hidden in (256, 4096) and s.x_dtype == "bfloat16"][:4]


class CountingExecutor:
    """An executor that counts the specs it was handed, then runs them on the real one."""

    def __init__(self, inner):
        self.inner, self.mapped = inner, []

    def map(self, fn, *iterables):
        self.mapped += list(iterables[0])
        return self.inner.map(fn, *iterables)


def _same(a: SearchSpace, b: SearchSpace) -> bool:
    return (a.spec, a.configs, a.knobs, a.device, a.backends) == (b.spec, b.configs, b.knobs, b.device, b.backends)


def test_spaces_built_in_worker_processes_are_the_serial_ones(monkeypatch):
    monkeypatch.setattr(space_module, "PARALLEL_MIN_SPECS", 2)
    backends = {name: get_backend(name) for name in ("triton", "cupy", "numba", "numba-cpu", "torch")}
    with CompilePool(backends, "cpu", workers=2) as pool:
        executor = CountingExecutor(pool.executor())
        parallel = build_spaces(SPECS, backends, "cpu", executor)
    assert executor.mapped == SPECS  # enumerated in the workers
    serial = {spec: SearchSpace(spec, backends, "cpu") for spec in SPECS}
    assert list(parallel) == SPECS and all(_same(parallel[s], serial[s]) for s in SPECS)
    assert all(len(parallel[s]) > 0 and parallel[s].backends is backends for s in SPECS)


@dataclass(frozen=True)
class Unregistered(Config):
    backend = "fake"
    width: int = knob((32, 64))


class Fake(TorchBackedFake):
    config_cls = Unregistered


class Unused:
    def map(self, *args):
        raise AssertionError("a small grid, or a backend a worker cannot make, is enumerated here")


@pytest.mark.parametrize("backends, specs", [({"torch": get_backend("torch")}, SPECS[:2]),
                                             ({"fake": Fake()}, SPECS * 8)])
def test_a_small_grid_or_an_unregistered_backend_is_enumerated_here(backends, specs):
    spaces = build_spaces(specs, backends, None, Unused())
    assert all(_same(spaces[s], SearchSpace(s, backends)) for s in specs)


def test_workers_that_fail_leave_the_tuning_process_to_build_the_spaces(monkeypatch, caplog):
    class Broken:
        def map(self, *args):
            raise RuntimeError("cannot start")

    monkeypatch.setattr(space_module, "PARALLEL_MIN_SPECS", 1)
    backends = {"torch": get_backend("torch")}
    spaces = build_spaces(SPECS, backends, None, Broken())
    assert all(_same(spaces[s], SearchSpace(s, backends)) for s in SPECS) and "building them here" in caplog.text
