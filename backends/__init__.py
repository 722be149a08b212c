"""The backend registry: data, imported lazily, so optional dependencies load only when used.

Adding a backend is one line here plus a module (see backends/README.md).
"""
from __future__ import annotations

import importlib
import threading

import torch

from autonorm.errors import BackendUnavailableError, UnknownBackendError

# name -> "module:Class". Order is the preference among available backends when
# no database says otherwise (fastest-in-general first; torch is the last resort).
BACKENDS: dict[str, str] = {
    "triton": "autonorm.backends.triton:TritonBackend",
    "cupy": "autonorm.backends.cupy:CupyBackend",
    "numba": "autonorm.backends.numba_cuda:NumbaCudaBackend",
    "numba-cpu": "autonorm.backends.numba_cpu:NumbaCpuBackend",
    "torch": "autonorm.backends.torch_eager:TorchBackend",
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
