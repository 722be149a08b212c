"""Choose the kernel for a call, once per key, and remember it.

A key is built from cheap attributes of the call's tensors (no NormSpec is built
on the steady-state path); a miss resolves it into a `Choice` holding the
compiled kernel, and every later call with that key costs one dict lookup.

Resolution order today: AUTONORM_DISABLE -> torch; AUTONORM_BACKEND -> that
backend's heuristic config; else the first available backend of the device's
default order with its heuristic config. (The database ladder of DESIGN §7
slots in before the heuristic rung.)
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from . import knobs
from .config import Config
from .errors import BackendUnavailableError
from .spec import DTYPE_NAMES, NormSpec, rows_bucket

log = logging.getLogger("autonorm")

# Automatic choice per device type, best first. Interpreters and simulators are
# never chosen automatically: they run only when forced with AUTONORM_BACKEND.
DEFAULT_ORDER = {
    "cuda": ("triton", "cupy", "numba", "torch"),
    "cpu": ("numba-cpu", "torch"),
}


@dataclass(frozen=True)
class Choice:
    """What a key resolved to, and why (`rung`)."""

    spec: NormSpec
    backend: str
    config: Config
    rung: str
    kernel: object

    def describe(self) -> str:
        return f"{self.spec.short()} -> {self.backend} [{self.config.short()}] (rung: {self.rung})"


_choices: dict[tuple, Choice] = {}
_lock = threading.Lock()


def reset() -> None:
    """Forget every resolution (after changing knobs or loading a database)."""
    with _lock:
        _choices.clear()


def make_key(op, direction, x, weight, bias, residual, offset):
    w_dtype = weight.dtype if weight is not None else x.dtype
    return (op, direction, x.dtype, w_dtype, x.shape[-1], weight is not None, bias is not None,
            residual is not None, offset != 0.0, x.device, rows_bucket(x.numel() // max(x.shape[-1], 1)))


def spec_from_key(key) -> NormSpec:
    op, direction, x_dtype, w_dtype, n, has_w, has_b, has_r, has_off, _device, _bucket = key
    return NormSpec(op, direction, DTYPE_NAMES[x_dtype], DTYPE_NAMES[w_dtype], n,
                    weight=has_w, bias=has_b, residual=has_r, offset=has_off)


def choice_for(key) -> Choice:
    """The memoized choice for a key (resolving it on first use)."""
    choice = _choices.get(key)
    if choice is None:
        with _lock:
            choice = _choices.get(key)
            if choice is None:
                choice = _resolve(spec_from_key(key), key[9], key[10])
                _choices[key] = choice
                if knobs.log_choices():
                    log.warning("autonorm: %s", choice.describe())
    return choice


def _make_choice(backend_name: str, spec: NormSpec, config: Config | None, device, rung: str) -> Choice:
    from .backends import get_backend

    backend = get_backend(backend_name)
    config = config if config is not None else backend.heuristic(spec)
    return Choice(spec, backend_name, config, rung, backend.compile(spec, config, device))


def _resolve(spec: NormSpec, device: torch.device, bucket: int) -> Choice:
    from .backends import get_backend

    if knobs.disabled():
        return _make_choice("torch", spec, None, device, "disabled")
    forced = knobs.backend()
    if forced is not None:
        backend = get_backend(forced)  # unknown names raise with the list of known ones
        backend.check_available()
        if not backend.supports_device(device):
            raise BackendUnavailableError(
                f"AUTONORM_BACKEND={forced} cannot run on {device} tensors"
                + (" (set TRITON_INTERPRET=1 before importing autonorm to run Triton on CPU)"
                   if forced == "triton" and device.type == "cpu" else ""))
        return _make_choice(forced, spec, None, device, "forced")
    for name in DEFAULT_ORDER.get(device.type, ("torch",)):
        try:
            backend = get_backend(name)
        except BackendUnavailableError:
            continue
        if backend.is_available() and backend.supports_device(device):
            return _make_choice(name, spec, None, device, "heuristic" if name != "torch" else "torch")
    return _make_choice("torch", spec, None, device, "torch")


def explain(op, direction, x, weight=None, bias=None, residual=None, offset=0.0) -> Choice:
    """The choice a call with these tensors would use."""
    return choice_for(make_key(op, direction, x, weight, bias, residual, offset))
