"""Each backend's real compiler, run here for a GPU architecture with the runtime's specialization.

- Triton: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` with the
  launcher's `tt.divisibility=16` hints, then `ptxas -v` on its PTX;
- CuPy: `nvcc -cubin -Xptxas -v` on the rendered CUDA source, one translation unit per batch;
- Numba CUDA: `numba.cuda.compile_ptx` (NVVM) with the kernel's launch bounds, then `ptxas -v`.

Triton and Numba compile in a subprocess without TRITON_INTERPRET and
NUMBA_ENABLE_CUDASIM (which the CPU test tier sets, and which replace the real compilers).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

from ..hardware import ARCHS
from ..spec import NormSpec
from .jobs import Job
from .profile import Profile, occupancy
from .tools import AuditToolError, parse_ptxas_log, ptxas, sass_counts, tool


def _profile(job: Job, kernel: str, ptxas_info: dict, sass: dict, threads: int, smem_dynamic: int) -> Profile:
    p = Profile(job.backend, job.spec.short(), job.config.short(), job.arch, kernel, threads=threads,
                smem_dynamic=smem_dynamic, **ptxas_info, **sass)
    return occupancy(p, ARCHS[job.arch])


def _only(d: dict, pattern: str, what: str) -> tuple[str, dict]:
    hits = [k for k in d if re.search(pattern, k)]
    if len(hits) != 1:
        raise RuntimeError(f"{what}: expected one function matching {pattern!r}, found {sorted(d)}")
    return hits[0], d[hits[0]]


# Triton -------------------------------------------------------------------------------------
_TT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# Arguments the launcher passes as None (a compile-time constant to Triton) when this flag is off.
_OPTIONAL = {"R": "HAS_RESIDUAL", "stride_r": "HAS_RESIDUAL", "H": "HAS_RESIDUAL", "stride_h": "HAS_RESIDUAL",
             "DH": "HAS_RESIDUAL", "stride_dh": "HAS_RESIDUAL", "W": "HAS_WEIGHT", "DWP": "HAS_WEIGHT",
             "B": "HAS_BIAS", "DBP": "HAS_BIAS", "MEAN": "LAYERNORM", "C12": "COLUMN_OUTER", "offset": "HAS_OFFSET"}


def triton_signature(spec: NormSpec, fn, constants: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a kernel as Triton's launcher specializes it for contiguous
    rows: pointers of aligned tensors and 16-divisible ints get `tt.divisibility=16`; the tensors and
    scalars a flag in `constants` leaves out are None."""
    x, w = "*" + _TT[spec.x_dtype], "*" + _TT[spec.w_dtype]
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        absent = name in _OPTIONAL and not constants[_OPTIONAL[name]]
        if param.is_constexpr or absent:
            signature[name] = "constexpr"
            constexprs[(i,)] = None if absent else constants[name]
            continue
        if name in ("X", "Y", "R", "H", "DY", "DX", "DH"):
            signature[name], aligned = x, True
        elif name in ("W", "B"):
            signature[name], aligned = w, True
        elif name in ("MEAN", "RSTD", "DWP", "DBP", "C12"):  # fp32 buffers torch allocates (C12: row scratch)
            signature[name], aligned = "*fp32", True
        elif name.startswith("stride_"):
            signature[name], aligned = "i32", spec.hidden % 16 == 0  # contiguous rows: stride = N
        elif name in ("M", "rows_per_program"):
            signature[name], aligned = "i32", False
        elif name in ("eps", "offset"):
            signature[name], aligned = "fp32", False
        else:
            raise RuntimeError(f"audit: unknown Triton kernel parameter {name!r}: teach triton_signature its type")
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _load_module(path: str, name: str):
    """Import a generated kernel module from its file (registered: Triton resolves globals through it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _triton_compile(items: list[dict]) -> list[dict]:
    """Worker body: Triton's own compiler for each {path, spec, num_warps, cc} -> {ptx, name, shared}."""
    import triton

    from .. import settings

    settings.pin_triton_fp_fusion()  # compile exactly as the runtime launches (backends/triton.py)

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        raise AuditToolError(f"triton {triton.__version__} has no ASTSource/GPUTarget API ({exc}): "
                             "the audit needs triton >= 3.3") from exc
    out = []
    for i, item in enumerate(items):
        spec = NormSpec(**item["spec"])
        module = _load_module(item["path"], f"autonorm_audit_triton_{i}")
        fn = getattr(module, f"_{spec.op}_{spec.direction}")
        constants = {name: getattr(module, name) for name in ("N", "BLOCK_N", "ROWS_PER_PROGRAM")}
        constants.update(module.FLAGS)  # the kernel's switches (tl.constexpr)
        constants["ROW_ALIGN"] = module.row_align(spec.hidden)  # contiguous rows: the stride is N
        signature, constexprs, attrs = triton_signature(spec, fn, constants)
        try:
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                    target=GPUTarget("cuda", item["cc"], 32),
                                    options={"num_warps": item["num_warps"], **item.get("options", {})})
        except TypeError as exc:  # an older ASTSource signature
            raise AuditToolError(f"triton {triton.__version__}: ASTSource(fn, signature, constexprs, attrs) "
                                 f"failed ({exc}); the audit needs triton >= 3.3") from exc
        out.append({"ptx": kernel.asm["ptx"], "name": kernel.metadata.name, "shared": kernel.metadata.shared})
    return out


def triton_profiles(jobs: list[Job], workdir: str) -> list[Profile]:
    items = [{"path": _module_file(j, "triton"), "spec": j.spec.to_dict(), "num_warps": j.config.num_warps,
              "cc": ARCHS[j.arch].cc} for j in jobs]
    out = []
    for job, result in zip(jobs, _run_worker("triton", items)):
        name = result["name"]
        log, cubin = ptxas(result["ptx"], workdir, f"triton_{job.arch}_{job.source().sha256[:16]}")
        _, info = _only(parse_ptxas_log(log), re.escape(name), "ptxas")
        _, sass = _only(sass_counts(cubin), re.escape(name), "cuobjdump")
        out.append(_profile(job, name, info, sass, job.config.num_warps * 32, result["shared"]))
    return out


# CuPy ----------------------------------------------------------------------------------------
CUPY_HEADERS = "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"


def cupy_translation_unit(pairs) -> str:
    """All renderings in one file: a namespace and a kernel-name suffix keep them apart
    (one nvcc call compiles them all)."""
    from ..backends import get_backend
    from ..render import render

    backend = get_backend("cupy")
    parts = [CUPY_HEADERS]
    for i, (spec, config) in enumerate(pairs):
        backend.validate(spec, config)
        ctx = {**backend.render_context(spec, config), "suffix": f"_{i}", "headers": False}
        text = render(backend.template_name(spec), spec, config, **ctx).text
        parts.append(f"// {spec.short()} | {config.short()}\nnamespace an_case_{i} {{\n{text}\n}}\n")
    return "\n".join(parts)


def cupy_profiles(jobs: list[Job], workdir: str) -> list[Profile]:
    """One nvcc call for a batch of CuPy jobs of one architecture."""
    from ..backends.cupy import dynamic_smem

    arch = jobs[0].arch
    stem = f"cupy_{arch}_{hashlib.sha256(repr([(j.spec, j.config) for j in jobs]).encode()).hexdigest()[:16]}"
    path, cubin = os.path.join(workdir, stem + ".cu"), os.path.join(workdir, stem + ".cubin")
    with open(path, "w") as f:
        f.write(cupy_translation_unit([(j.spec, j.config) for j in jobs]))
    # CuPy compiles with NVRTC and `-std=c++17 -arch=sm_<cc>`; nvcc runs the same front end and ptxas.
    proc = subprocess.run([tool("nvcc"), "-std=c++17", f"-arch={arch}", "-cubin", "-Xptxas", "-v", path, "-o", cubin],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"nvcc -arch={arch} failed on {path}:\n{proc.stderr[-3000:]}")
    info, sass = parse_ptxas_log(proc.stderr + proc.stdout), sass_counts(cubin)
    out = []
    for i, job in enumerate(jobs):
        name = f"an_{job.spec.direction}_vec_{i}"
        out.append(_profile(job, name, info[name], sass[name], job.config.threads, dynamic_smem(job.spec, job.config)))
    return out


# Numba CUDA ----------------------------------------------------------------------------------
def _numba_compile(items: list[dict]) -> list[dict]:
    """Worker body: numba-cuda's compiler for each {path, spec, cc} -> {ptx}, with the kernel's launch bounds."""
    import types as pytypes

    import numba.cuda.dispatcher
    from numba import cuda

    from autonorm.backends.numba_cuda import kernel_signature

    # Device functions called by a kernel are compiled for the *current device's* compute
    # capability (numba-cuda's dispatcher asks the driver); there is no driver here, so the
    # target of this batch (one architecture per worker) stands in for that device.
    cc = {tuple(item["cc"]) for item in items}
    if len(cc) > 1:
        raise ValueError(f"one numba audit worker compiles for one architecture, got {sorted(cc)}")
    device = pytypes.SimpleNamespace(compute_capability=cc.pop() if cc else (9, 0))
    numba.cuda.dispatcher.get_current_device = lambda: device
    out = []
    for i, item in enumerate(items):
        spec = NormSpec(**item["spec"])
        dispatcher = _load_module(item["path"], f"autonorm_audit_numba_{i}")._kernel
        sig = kernel_signature(spec, item["vec"], dispatcher.py_func)
        bounds = dispatcher.targetoptions.get("launch_bounds")
        ptx, _ = cuda.compile_ptx(dispatcher.py_func, sig, cc=tuple(item["cc"]), launch_bounds=bounds)
        out.append({"ptx": ptx})
    return out


def numba_profiles(jobs: list[Job], workdir: str) -> list[Profile]:
    items = [{"path": _module_file(j, "numba_cuda"), "spec": j.spec.to_dict(), "cc": divmod(ARCHS[j.arch].cc, 10),
              "vec": j.config.vec} for j in jobs]
    out = []
    for job, result in zip(jobs, _run_worker("numba", items)):
        log, cubin = ptxas(result["ptx"], workdir, f"numba_{job.arch}_{job.source().sha256[:16]}")
        name, info = _only(parse_ptxas_log(log), "_kernel", "ptxas")
        _, sass = _only(sass_counts(cubin), "_kernel", "cuobjdump")
        out.append(_profile(job, name, info, sass, job.config.threads * job.config.rows, 0))
    return out


# Compile workers ------------------------------------------------------------------------------
def _module_file(job: Job, folder: str) -> str:
    """The generated module's file, where the backend itself writes it (cache folder, by source hash)."""
    from ..settings import cache_dir

    source = job.source()
    path = cache_dir() / folder / f"{source.sha256}.py"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source.text)
        os.replace(tmp, path)
    return str(path)


_WORKERS = {"triton": _triton_compile, "numba": _numba_compile}


def _worker(kind: str) -> None:
    """Subprocess entry: JSON items on stdin, JSON results on stdout."""
    json.dump(_WORKERS[kind](json.load(sys.stdin)), sys.stdout)


def _run_worker(kind: str, items: list[dict]) -> list[dict]:
    """Run a compile worker in a subprocess without the simulators: TRITON_INTERPRET and
    NUMBA_ENABLE_CUDASIM (set by the CPU test tier) replace the real compilers."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NUMBA_ENABLE_CUDASIM")}
    proc = subprocess.run([sys.executable, "-c", f"from autonorm.audit.compilers import _worker; _worker({kind!r})"],
                          input=json.dumps(items), capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        tail = proc.stderr[-3000:]
        if kind == "numba" and ("nvrtc" in tail.lower() or "nvvm" in tail.lower()):
            raise AuditToolError("numba's CUDA compiler needs NVVM and NVRTC: pip install autonorm[audit] "
                                 f"(nvidia-nvvm, nvidia-cuda-nvrtc)\n{tail}")
        if "AuditToolError" in tail:
            raise AuditToolError(tail.strip().splitlines()[-1])
        raise RuntimeError(f"{kind} compile worker failed:\n{tail}")
    return json.loads(proc.stdout)
