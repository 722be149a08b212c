"""The backend registry: data, imported lazily, so optional dependencies load only when used.

Adding a backend is one line here plus a module (see backends/README.md).
"""
from __future__ import annotations

import importlib
import threading
from typing import NamedTuple

import torch

from autonorm.errors import BackendUnavailableError, UnknownBackendError


class Registration(NamedTuple):
    """Where a backend lives, the device kinds it is chosen for automatically, and its rank there."""

    target: str  # "module:Class"
    native: tuple[str, ...]  # device types; interpreters and simulators run only when forced
    rank: int  # lower is preferred among available backends when no database says otherwise


# Fastest-in-general first; torch is the last resort everywhere.
REGISTRY: dict[str, Registration] = {
    "triton": Registration("autonorm.backends.triton:TritonBackend", ("cuda",), 0),
    "cupy": Registration("autonorm.backends.cupy:CupyBackend", ("cuda",), 1),
    "numba": Registration("autonorm.backends.numba_cuda:NumbaCudaBackend", ("cuda",), 2),
    "numba-cpu": Registration("autonorm.backends.numba_cpu:NumbaCpuBackend", ("cpu",), 3),
    "torch": Registration("autonorm.backends.torch_eager:TorchBackend", ("cuda", "cpu"), 99),
}

_BY_RANK = sorted(REGISTRY, key=lambda name: REGISTRY[name].rank)

# name -> "module:Class", in preference order.
BACKENDS: dict[str, str] = {name: REGISTRY[name].target for name in _BY_RANK}

# Automatic choice per device type, best first (the dispatcher's heuristic rung, the tuner's native backends).
DEFAULT_ORDER: dict[str, tuple[str, ...]] = {
    kind: tuple(name for name in _BY_RANK if kind in REGISTRY[name].native) for kind in ("cuda", "cpu")
}

_instances: dict = {}
_lock = threading.Lock()


def get_backend(name: str):
    """The backend instance for `name` (created once). Unknown names list the known ones."""
    if name not in BACKENDS:
        raise UnknownBackendError(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    backend = _instances.get(name)
    if backend is None:
        with _lock:
            backend = _instances.get(name)
            if backend is None:
                module_name, cls_name = BACKENDS[name].split(":")
                try:
                    module = importlib.import_module(module_name)
                except ImportError as exc:  # the module itself must import without its extras
                    raise BackendUnavailableError(f"backend {name!r} failed to import: {exc}") from exc
                backend = getattr(module, cls_name)()
                _instances[name] = backend
    return backend


def available(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends usable here (for `device`, when given), in preference order."""
    names = []
    for name in BACKENDS:
        try:
            backend = get_backend(name)
        except BackendUnavailableError:
            continue
        if not backend.is_available():
            continue
        if device is not None and not backend.supports_device(torch.device(device)):
            continue
        names.append(name)
    return names
