"""Device identity: the name, slug and keys under which kernels are cached and tuned."""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `autonorm db` and `--help` run without it
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


# x86-64 micro-architecture levels (the psABI's), by the /proc/cpuinfo flags each adds to the one before:
# one VM type can run on several CPU generations, and kernels tuned with AVX-512 are not those of AVX2.
_X86_LEVELS = (
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
)


def isa_level(flags: set[str], machine: str) -> str:
    """'x86-64-v3' for an AVX2 CPU's flags; the machine name ('aarch64') off x86."""
    if machine.lower() not in ("x86_64", "amd64"):
        return slugify(machine)
    level = "x86-64"
    for name, needed in _X86_LEVELS:
        if not needed <= flags:
            break
        level = name
    return level


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def _cuda_identity(index: int) -> dict:
    import torch

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
    machine = platform.machine() or "unknown"
    # Without /proc/cpuinfo (macOS, Windows) the level is unknown: the machine name stands in.
    isa = isa_level(set(cpu_flags()), machine) if cpu_flags() else slugify(machine)
    return {
        "name": name,
        "slug": f"cpu-{slugify(name)}-{cores}c-{isa}",
        "legacy_slug": f"cpu-{slugify(name)}-{cores}c",  # before the ISA level: databases tuned then still load
        "kind": "cpu",
        "compute_capability": None,
        "sm_count": cores,
        "l2_bytes": 0,
        "memory_bytes": 0,
    }


def identity(device: torch.device | str | None = None) -> dict:
    """Name, slug, kind, compute capability and size of a device (memoized)."""
    import torch

    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return _cuda_identity(device.index if device.index is not None else torch.cuda.current_device())
    return _cpu_identity()


def slug_aliases(slug: str) -> tuple[str, ...]:
    """Database slugs that name the device `slug`: itself, and this CPU's slug from before the ISA level."""
    cpu = _cpu_identity()
    return (slug, cpu["legacy_slug"]) if slug == cpu["slug"] else (slug,)


def device_key(device: torch.device) -> str:
    """The compile-cache part of a device: kernels compiled for one run on it."""
    if device.type == "cuda":
        import torch

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
    import torch

    from . import __version__

    driver = None
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            driver = str(torch._C._cuda_getDriverVersion())
    out = {"autonorm": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda, "driver": driver, "nvrtc": _nvrtc_version()}
    for key, names in (("triton", ("triton",)), ("cupy", ("cupy-cuda13x", "cupy-cuda12x", "cupy")),
                       ("numba", ("numba",)), ("numba_cuda", ("numba-cuda",)), ("optuna", ("optuna",)),
                       ("liger_kernel", ("liger-kernel", "liger_kernel")), ("quack", ("quack-kernels",)),
                       ("cutlass_dsl", ("nvidia-cutlass-dsl",))):
        out[key] = _dist_version(*names)
    return out


def _nvrtc_version() -> str | None:
    """NVRTC's version as CuPy sees it ('13.0'), None without CuPy or a CUDA runtime."""
    try:
        import cupy

        major, minor = cupy.cuda.nvrtc.getVersion()
        return f"{major}.{minor}"
    except Exception:  # not installed, or no usable CUDA runtime here
        return None


# The compiler that builds each backend's kernels, as named in `software_versions()`.
BACKEND_COMPILER = {"triton": "triton", "numba-cpu": "numba", "numba": "numba_cuda", "cupy": "nvrtc"}


@functools.cache
def _running_compiler(name: str) -> str | None:
    if name == "nvrtc":
        return _nvrtc_version()
    return _dist_version({"numba_cuda": "numba-cuda"}.get(name, name))


def _major_minor(version: str | None) -> str | None:
    return ".".join(re.findall(r"\d+", version)[:2]) if version else None


def stale_compiler(backend: str, tuned_versions: dict) -> str | None:
    """'triton 3.8 -> 3.9' when `backend`'s compiler (major.minor) differs from the one a database was tuned
    with (its `versions`), else None (also when either version is unknown).

    Kernels still compile and run under another compiler, but its code (and so the best config) may differ."""
    name = BACKEND_COMPILER.get(backend)
    if name is None:
        return None
    tuned, running = _major_minor(tuned_versions.get(name)), _major_minor(_running_compiler(name))
    if tuned is None or running is None or tuned == running:
        return None
    return f"{name} {tuned} -> {running}"
