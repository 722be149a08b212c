"""The CuPy backend's CUDA C++ kernels built for the CPU harness (autonorm/cuda_host.py): every (spec, config) rendered
into one translation unit, built by g++ against cuda_host.h into one shared library (cached on disk by source,
header and compiler), and each kernel's compiler profile (registers, static shared memory) for the launch rules."""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from . import settings
from .backends import get_backend
from .errors import KernelError
from .render import render

HEADER = Path(__file__).with_name("cuda_host.h")
# -O0: the build dominates (0.2 s a kernel against 0.5 s at -O1; fiber switches dominate the run anyway). The
# alignment sanitizer reports a misaligned AnPack access (a vector access the GPU would fault on) and stops.
CXX_FLAGS = ("-std=c++17", "-O0", "-shared", "-fPIC", "-fsanitize=alignment", "-fno-sanitize-recover=alignment")
REPORT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "hardware-fit.json"


@cache
def _compiler_version() -> str:
    return subprocess.run(["g++", "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]


def translation_unit(pairs) -> str:
    """Every (spec, config) rendering in its own namespace with a kernel-name suffix, and an `extern "C"`
    launch entry per kernel, in one file (one g++ call builds them all)."""
    backend = get_backend("cupy")
    parts = ['#include "cuda_host.h"']
    for i, (spec, config) in enumerate(pairs):
        backend.validate(spec, config)
        ctx = {**backend.render_context(spec, config), "suffix": f"_{i}", "headers": False}
        text = render(backend.template_name(spec), spec, config, **ctx).text
        parts.append(f"// {spec.short()} | {config.short()}\nnamespace an_case_{i} {{\n{text}\n}}")
        for kind in ("vec", "scalar"):
            name = f"an_{spec.direction}_{kind}_{i}"
            parts.append(f'extern "C" int an_host_{name}(const an_host::Launch* L) '
                         f'{{ return an_host::launch(an_case_{i}::{name}, L); }}')
    parts.append('extern "C" int an_host_sites() { return int(an_host::sites().size()); }\n'
                 'extern "C" const char* an_host_site_name(int i) { return an_host::sites()[i].name; }\n'
                 'extern "C" unsigned long an_host_site_bytes(int i) { return an_host::sites()[i].bytes; }')
    return "\n".join(parts) + "\n"


def build_library(pairs) -> ctypes.CDLL:
    """The kernels of `pairs` built into one shared library, cached on disk by source, header and compiler."""
    text = translation_unit(pairs)
    key = hashlib.sha256("\0".join([text, HEADER.read_text(), _compiler_version(), *CXX_FLAGS]).encode()).hexdigest()
    folder = settings.cache_dir() / "cuda_host"
    lib = folder / f"{key[:32]}.so"
    if not lib.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src, out = Path(tmp) / "kernels.cpp", Path(tmp) / "kernels.so"
            src.write_text(text)
            proc = subprocess.run(["g++", *CXX_FLAGS, "-I", str(HEADER.parent), str(src), "-o", str(out)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode:
                raise KernelError(f"g++ could not build the CUDA C++ for the CPU:\n{proc.stderr[-3000:]}")
            os.replace(out, lib)
    return ctypes.CDLL(str(lib))


def static_bytes(lib: ctypes.CDLL, case: int) -> int:
    """Static shared memory of case `case`: its declaration sites (an_site_<name> local to its namespace),
    each counted once (the vector and scalar entry points declare the same arrays). An upper bound of what
    nvcc allocates: it drops an array the kernel never uses (`red` where a row fits one warp)."""
    lib.an_host_site_name.restype = ctypes.c_char_p
    lib.an_host_site_bytes.restype = ctypes.c_ulong
    tag, sizes = f"N{len(f'an_case_{case}')}an_case_{case}", {}
    for i in range(lib.an_host_sites()):
        name = lib.an_host_site_name(i).decode()
        if tag in name:
            sizes[re.search(r"an_site_([A-Za-z0-9]+)", name).group(1)] = lib.an_host_site_bytes(i)
    return sum(sizes.values())


@cache
def _saved_profiles() -> dict:
    """`Job.identity()` -> profile in the audit's saved report, when this checkout has one."""
    from .audit.report import ReportError, load_report

    try:
        return load_report(REPORT) if REPORT.exists() else {}
    except ReportError:
        return {}


def profiles(pairs, arch: str, nvcc: bool = False) -> list:
    """The compiler's profile (registers, static shared memory) of each (spec, config)'s kernel on `arch`: from
    the audit's saved report (None where it lacks the kernel), or with `nvcc`, from `nvcc -cubin -Xptxas -v`
    (one call for all)."""
    from .audit.jobs import Job

    jobs = [Job("cupy", spec, config, arch) for spec, config in pairs]
    if not nvcc:
        return [_saved_profiles().get(job.identity()) for job in jobs]
    from .audit.compilers import cupy_profiles

    with tempfile.TemporaryDirectory() as tmp:
        return cupy_profiles(jobs, tmp)
