"""Device identity: the name, slug and keys under which kernels are cached and tuned."""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
from importlib import metadata

import torch


def slugify(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


@functools.cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@functools.cache
def _cuda_identity(index: int) -> dict:
    props = torch.cuda.get_device_properties(index)
    return {
        "name": props.name,
        "slug": slugify(props.name),
        "kind": "cuda",
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "l2_bytes": getattr(props, "L2_cache_size", 0),
        "memory_bytes": props.total_memory,
    }


@functools.cache
def _cpu_identity() -> dict:
    name = cpu_name()
    cores = os.cpu_count() or 1
    return {
        "name": name,
        "slug": f"cpu-{slugify(name)}-{cores}c",
        "kind": "cpu",
        "compute_capability": None,
        "sm_count": cores,
        "l2_bytes": 0,
        "memory_bytes": 0,
    }


def identity(device: torch.device | str | None = None) -> dict:
    """Name, slug, kind, compute capability and size of a device (memoized)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return _cuda_identity(device.index if device.index is not None else torch.cuda.current_device())
    return _cpu_identity()


def device_key(device: torch.device) -> str:
    """The compile-cache part of a device: kernels compiled for one run on it."""
    if device.type == "cuda":
        ident = identity(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}:sm{ident['compute_capability']}"
    return "cpu"


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def software_versions() -> dict:
    """Versions of everything a measurement depends on (None: not installed); databases and reports record it."""
    from . import __version__

    driver = None
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            driver = str(torch._C._cuda_getDriverVersion())
    out = {"autonorm": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda, "driver": driver}
    for key, names in (("triton", ("triton",)), ("cupy", ("cupy-cuda13x", "cupy-cuda12x", "cupy")),
                       ("numba", ("numba",)), ("numba_cuda", ("numba-cuda",)), ("optuna", ("optuna",)),
                       ("liger_kernel", ("liger-kernel", "liger_kernel")), ("quack", ("quack-kernels",)),
                       ("cutlass_dsl", ("nvidia-cutlass-dsl",))):
        out[key] = _dist_version(*names)
    return out
