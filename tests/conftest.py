"""One place for the test tier's environment and skips.

Without a CUDA GPU the CPU tier runs Triton kernels in Triton's interpreter and
Numba CUDA kernels in Numba's simulator. Both must be switched on before those
libraries are imported, hence here, before any test module loads.
"""
import atexit
import os
import shutil
import tempfile

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
# Keep compiled-kernel caches inside the test session, never in the user's home.
os.environ.setdefault("AUTONORM_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".cache"))
# The user's own tuned databases would change which rung the dispatcher tests see: an empty folder instead.
os.environ["AUTONORM_USER_DB_DIR"] = tempfile.mkdtemp(prefix="autonorm-test-user-db-")
atexit.register(shutil.rmtree, os.environ["AUTONORM_USER_DB_DIR"], True)

from autonorm.backends import base  # noqa: E402  (after the environment above)

DEVICE = "cuda" if HAS_GPU else "cpu"


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: without the plugin, pytest never calls it
def pytest_xdist_auto_num_workers(config):
    """How many workers `-n auto` (pyproject's addopts) starts: one per CPU this process may run on, at most 8
    (each holds torch, Triton and Numba: about 1.7 GB), for a run of a folder (README's command). None where
    only test files or ids are named (starting workers would take longer than most files) or on a machine with
    a GPU, whose tests time kernels and must not share it; `-n N` on the command line still says how many."""
    if HAS_GPU or all(os.path.isfile(arg.split("::")[0]) for arg in config.args):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, 8)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_tests.sh on a GPU machine)")
    for item in items:
        # The marker, not `item.keywords`: keywords also hold folder names (a checkout in a folder "gpu").
        if item.get_closest_marker("gpu") is not None and not HAS_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """Every kernel output starts as NaN, so an unwritten element fails its check."""
    base.poison_outputs(True)
    yield
    base.poison_outputs(False)


@pytest.fixture
def use_backend(monkeypatch):
    """Force AUTONORM_BACKEND for one test, and forget earlier resolutions both ways."""
    import autonorm

    def force(name):
        monkeypatch.setenv("AUTONORM_BACKEND", name)
        autonorm.reset()

    yield force
    monkeypatch.delenv("AUTONORM_BACKEND", raising=False)
    autonorm.reset()


@pytest.fixture
def device():
    return DEVICE
