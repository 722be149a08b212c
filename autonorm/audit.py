"""`autonorm audit`: cross-compile kernels for a GPU architecture and report how they fit it.

No GPU is needed: each backend's real compiler runs here with the specialization the
runtime gives it, for `--arch sm_80,sm_90`:

- Triton: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` with the
  launcher's `tt.divisibility=16` hints (16-byte aligned pointers, 16-divisible ints), then
  `ptxas -v` on its PTX;
- CuPy: `nvcc -cubin -Xptxas -v` on the rendered CUDA source (one translation unit per
  batch, as the nvcc tests do);
- Numba CUDA: `numba.cuda.compile_ptx` (NVVM, from the nvidia-nvvm / nvidia-cuda-nvrtc
  wheels) in a subprocess without NUMBA_ENABLE_CUDASIM, then `ptxas -v`.

Per kernel: registers, spill bytes, stack, static + dynamic shared memory, threads per
block, theoretical occupancy (resident blocks and warps per SM from registers, shared
memory and threads), the 128-bit share of global loads and stores (from the SASS) and the
cp.async (LDGSTS) count. Results are cached by source hash under `<cache_dir>/audit`;
compiles run two at a time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .hardware import ARCHS, MAX_REGS_PER_THREAD, Arch, device_arch, register_cap, resident_blocks  # noqa: F401 (audit.X names)
from .spec import ITEMSIZE, NormSpec

HELP = "cross-compile kernels for sm_80/sm_90 (no GPU) and report registers, spills, occupancy, vector width"
WORKERS = 2
BACKENDS = ("triton", "cupy", "numba")
# Bumped when what a cached profile holds changes.
PROFILE_VERSION = 1


class AuditToolError(RuntimeError):
    """A toolchain piece the audit needs is missing; the message says what to install."""


@dataclass
class Profile:
    """What the compiler says about one kernel on one architecture."""

    backend: str
    spec: str
    config: str
    arch: str
    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem_static: int
    smem_dynamic: int
    threads: int
    global_loads: int
    global_loads_128: int
    global_stores: int
    global_stores_128: int
    cp_async: int
    sass_sha256: str
    blocks_per_sm: int = 0
    warps_per_sm: int = 0
    occupancy: float = 0.0
    limiter: str = ""

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def launchable(self) -> bool:
        return self.blocks_per_sm > 0

    @property
    def load_share_128(self) -> float:
        return self.global_loads_128 / self.global_loads if self.global_loads else 0.0

    @property
    def store_share_128(self) -> float:
        return self.global_stores_128 / self.global_stores if self.global_stores else 0.0

    def fits(self) -> bool:
        """No spill and the block can be resident on an SM."""
        return self.spill_bytes == 0 and self.launchable

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(spill_bytes=self.spill_bytes, launchable=self.launchable,
                 load_share_128=round(self.load_share_128, 3), store_share_128=round(self.store_share_128, 3))
        return d

    def summary(self) -> dict:
        """The few numbers a database record keeps of its winner."""
        return {"arch": self.arch, "registers": self.registers, "spill_bytes": self.spill_bytes,
                "smem": self.smem_static + self.smem_dynamic, "threads": self.threads,
                "blocks_per_sm": self.blocks_per_sm, "occupancy": round(self.occupancy, 3),
                "load_share_128": round(self.load_share_128, 3)}


def occupancy(p: Profile, arch: Arch) -> Profile:
    """Fill in resident blocks / warps per SM and what limits them."""
    p.blocks_per_sm, p.limiter = resident_blocks(p.registers, p.threads, p.smem_static + p.smem_dynamic, arch)
    p.warps_per_sm = p.blocks_per_sm * -(-p.threads // 32)
    p.occupancy = p.warps_per_sm / (arch.threads // 32)
    return p


# --- toolchain ------------------------------------------------------------------------
def _triton_bin() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin"
    return path if path.is_dir() else None


def _tool_candidates(name: str) -> list[str]:
    """Every copy of a CUDA tool here: PATH, CUDA_HOME, the Triton wheel (ptxas, cuobjdump, nvdisasm)."""
    found = []
    for path in (shutil.which(name), *(Path(os.environ[v]) / "bin" / name for v in ("CUDA_HOME", "CUDA_PATH")
                                       if os.environ.get(v)),
                 *((_triton_bin() / n) for n in ((name, "ptxas-blackwell") if name == "ptxas" else (name,))
                   if _triton_bin() is not None)):
        if path and os.access(path, os.X_OK) and str(path) not in found:
            found.append(str(path))
    return found


def _cuda_version(tool: str) -> tuple[int, int]:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


_TOOLS: dict[str, list[str]] = {}


def tool(name: str) -> str:
    """The newest copy of a CUDA tool, or AuditToolError naming what provides it."""
    if name not in _TOOLS:
        _TOOLS[name] = sorted(_tool_candidates(name), key=_cuda_version, reverse=True)
    if not _TOOLS[name]:
        hint = {"nvcc": "the CUDA toolkit (nvcc on PATH or CUDA_HOME): the CuPy kernels are compiled with it",
                }.get(name, "pip install autonorm[audit] (the triton wheel ships ptxas, cuobjdump and nvdisasm)")
        raise AuditToolError(f"autonorm audit needs {name}: install {hint}")
    return _TOOLS[name][0]


def toolchain(backends=BACKENDS) -> dict:
    """Versions of every compiler the audit runs (the report states them)."""
    out = {"ptxas": ".".join(map(str, _cuda_version(tool("ptxas")))),
           "cuobjdump": ".".join(map(str, _cuda_version(tool("cuobjdump"))))}
    if "triton" in backends:
        import triton
        out["triton"] = triton.__version__
    if "cupy" in backends:
        out["nvcc"] = ".".join(map(str, _cuda_version(tool("nvcc"))))
    if "numba" in backends:
        from importlib.metadata import PackageNotFoundError, version
        for dist in ("numba", "numba-cuda", "nvidia-nvvm"):
            try:
                out[dist] = version(dist)
            except PackageNotFoundError:
                out[dist] = "missing"
    return out


# --- ptxas log and SASS ------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_log(log: str) -> dict[str, dict]:
    """Per entry function: registers, stack, spill stores/loads and static shared memory."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = out.setdefault(m.group(1), {"registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0,
                                                  "smem_static": 0})
        elif current is not None and (m := _PROPS.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _USED.search(line)):
            current.update(registers=int(m.group(1)), smem_static=int(m.group(2) or 0))
    return out


_GLOBAL = re.compile(r"\b(LDG|STG|LDGSTS)(\.[\w.]*)?")


def sass_counts(cubin: str) -> dict[str, dict]:
    """Per function of a cubin: global loads / stores, how many are 128-bit, cp.async (LDGSTS) count."""
    proc = subprocess.run([tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"cuobjdump -sass {cubin} failed: {proc.stderr.strip()}")
    out: dict[str, dict] = {}
    current = None
    text: list[str] = []
    for line in proc.stdout.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            current = out.setdefault(m.group(1), {"global_loads": 0, "global_loads_128": 0, "global_stores": 0,
                                                  "global_stores_128": 0, "cp_async": 0})
            text = current.setdefault("_text", [])
            continue
        if current is None:
            continue
        # The instruction without its address and encoding, for the SASS hash.
        if m := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s*(.*?);", line):
            text.append(m.group(1))
        for op, mods in _GLOBAL.findall(line):
            wide = ".128" in mods
            if op == "LDGSTS":
                current["cp_async"] += 1
            elif op == "LDG":
                current["global_loads"] += 1
                current["global_loads_128"] += wide
            else:
                current["global_stores"] += 1
                current["global_stores_128"] += wide
    for counts in out.values():
        counts["sass_sha256"] = hashlib.sha256("\n".join(counts.pop("_text")).encode()).hexdigest()
    return out


_PTX_VERSION = re.compile(r"Unsupported \.version (\d+\.\d+); current version is '(\d+\.\d+)'")


def ptxas(ptx: str, workdir: str, stem: str) -> tuple[str, str]:
    """Assemble PTX with `ptxas -v` for the architecture its `.target` names; -> (log, cubin path).

    NVVM or Triton may emit a newer PTX ISA version than the newest ptxas here accepts; the
    kernels use no instruction of the newer ISA, so the `.version` line is lowered to what
    ptxas supports (and ptxas still rejects anything it cannot assemble).
    """
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    path, cubin = os.path.join(workdir, stem + ".ptx"), os.path.join(workdir, stem + ".cubin")
    for _ in range(2):
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([tool("ptxas"), "-v", f"--gpu-name={target}", path, "-o", cubin],
                              capture_output=True, text=True, check=False)
        m = _PTX_VERSION.search(proc.stderr)
        if proc.returncode and m:
            ptx = re.sub(r"^\.version\s+\S+", f".version {m.group(2)}", ptx, count=1, flags=re.M)
            continue
        break
    if proc.returncode:
        raise RuntimeError(f"ptxas failed on {path}:\n{proc.stderr[-3000:]}")
    return proc.stderr + proc.stdout, cubin


# --- one job per (backend, spec, config, arch) ---------------------------------------------
@dataclass(frozen=True)
class Job:
    backend: str
    spec: NormSpec
    config: object
    arch: str

    def source(self):
        from .backends import get_backend

        return get_backend(self.backend).render(self.spec, self.config)

    def cache_key(self, versions: dict) -> str:
        text = json.dumps([PROFILE_VERSION, self.backend, self.arch, self.source().sha256, self.spec.to_dict(),
                           self.config.to_dict(), versions], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


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


def triton_signature(spec: NormSpec, fn, constants: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a kernel as Triton's launcher specializes it for contiguous
    rows: pointers of aligned tensors and 16-divisible ints get `tt.divisibility=16`."""
    x, w = "*" + _TT[spec.x_dtype], "*" + _TT[spec.w_dtype]
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = constants[name]
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

    from . import knobs

    knobs.pin_triton_fp_fusion()  # compile exactly as the runtime launches (backends/triton.py)

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


def _triton_profiles(jobs: list[Job], workdir: str) -> list[Profile]:
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
    from .backends import get_backend
    from .render import render

    backend = get_backend("cupy")
    parts = [CUPY_HEADERS]
    for i, (spec, config) in enumerate(pairs):
        backend.validate(spec, config)
        ctx = {**backend.render_context(spec, config), "suffix": f"_{i}", "headers": False}
        text = render(backend.template_name(spec), spec, config, **ctx).text
        parts.append(f"// {spec.short()} | {config.short()}\nnamespace an_case_{i} {{\n{text}\n}}\n")
    return "\n".join(parts)


def _cupy_profiles(jobs: list[Job], workdir: str) -> list[Profile]:
    """One nvcc call for a batch of CuPy jobs of one architecture."""
    from .backends.cupy import dynamic_smem

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
    from numba import cuda, types

    # Device functions called by a kernel are compiled for the *current device's* compute
    # capability (numba-cuda's dispatcher asks the driver); there is no driver here, so the
    # target of this batch (one architecture per worker) stands in for that device.
    cc = {tuple(item["cc"]) for item in items}
    if len(cc) > 1:
        raise ValueError(f"one numba audit worker compiles for one architecture, got {sorted(cc)}")
    device = pytypes.SimpleNamespace(compute_capability=cc.pop() if cc else (9, 0))
    numba.cuda.dispatcher.get_current_device = lambda: device
    scalar = {"float32": types.float32, "float16": types.float16, "bfloat16": types.uint16}
    out = []
    for i, item in enumerate(items):
        spec = NormSpec(**item["spec"])
        dispatcher = _load_module(item["path"], f"autonorm_audit_numba_{i}")._kernel
        x, w, f32 = (types.Array(scalar[spec.x_dtype], 1, "C"), types.Array(scalar[spec.w_dtype], 1, "C"),
                     types.Array(types.float32, 1, "C"))
        # As _Launcher passes them: inputs as flat rows, outputs and partials as 2-D arrays.
        x2 = types.Array(scalar[spec.x_dtype], 2, "C")
        kinds = {"x": x, "dy": x, "res": x, "dh": x, "h": x2, "y": x2, "dx": x2, "w": w, "b": w,
                 "pw": types.Array(types.float32, 2, "C"), "pb": types.Array(types.float32, 2, "C"),
                 "mean_out": f32, "rstd_out": f32, "mean_in": f32, "rstd_in": f32,
                 "M": types.int64, "eps": types.float32, "offset": types.float32}
        code = dispatcher.py_func.__code__
        names = code.co_varnames[:code.co_argcount]
        sig = tuple(types.int64 if n.startswith("s") and n not in kinds else kinds[n] for n in names)
        bounds = dispatcher.targetoptions.get("launch_bounds")
        ptx, _ = cuda.compile_ptx(dispatcher.py_func, sig, cc=tuple(item["cc"]), launch_bounds=bounds)
        out.append({"ptx": ptx})
    return out


def _numba_profiles(jobs: list[Job], workdir: str) -> list[Profile]:
    items = [{"path": _module_file(j, "numba_cuda"), "spec": j.spec.to_dict(), "cc": divmod(ARCHS[j.arch].cc, 10)}
             for j in jobs]
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
    from .knobs import cache_dir

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
    proc = subprocess.run([sys.executable, "-c", f"from autonorm.audit import _worker; _worker({kind!r})"],
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


# --- driver ------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    from .knobs import cache_dir

    path = cache_dir() / "audit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load_cached(key: str) -> Profile | None:
    try:
        data = json.loads((_cache_dir() / f"{key}.json").read_text())
        return Profile(**{f.name: data[f.name] for f in dataclasses.fields(Profile)})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(key: str, p: Profile) -> None:
    folder = _cache_dir()
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(dataclasses.asdict(p), f)
    os.replace(tmp, folder / f"{key}.json")  # atomic: a concurrent reader never sees half a file


def _batches(jobs: list[Job], size: int, workers: int) -> list[list[Job]]:
    """Jobs of one (backend, arch) per batch (one nvcc call / numba worker each), split so every worker has one."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.backend, job.arch), []).append(job)
    out = []
    for group in groups.values():
        per = max(1, min(size, -(-len(group) // workers)))
        out += [group[i:i + per] for i in range(0, len(group), per)]
    return out


def cached(jobs: list[Job]) -> list[tuple[Job, Profile]]:
    """The jobs whose profile the cache already holds, with it (nothing is compiled)."""
    versions = toolchain(sorted({j.backend for j in jobs})) if jobs else {}
    found = [(j, _load_cached(j.cache_key(versions))) for j in jobs]
    return [(j, p) for j, p in found if p is not None]


def audit(jobs: list[Job], progress=None, workers: int = WORKERS) -> list[Profile]:
    """Profiles of `jobs` (same order), from the cache or compiled `workers` at a time."""
    versions = toolchain(sorted({j.backend for j in jobs})) if jobs else {}
    keys = [j.cache_key(versions) for j in jobs]
    results: dict[int, Profile] = {}
    todo = []
    for i, (job, key) in enumerate(zip(jobs, keys)):
        cached = _load_cached(key)
        if cached is not None:
            results[i] = cached
        else:
            todo.append(job)
    index = {id(j): i for i, j in enumerate(jobs)}
    with tempfile.TemporaryDirectory(prefix="autonorm-audit-") as workdir:
        def run(batch: list[Job]) -> list[tuple[Job, Profile]]:
            compile_batch = {"cupy": _cupy_profiles, "numba": _numba_profiles, "triton": _triton_profiles}
            return list(zip(batch, compile_batch[batch[0].backend](batch, workdir)))

        batches = _batches(todo, 16, workers)  # small batches: results are cached as each finishes
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for done in pool.map(run, batches):
                for job, p in done:
                    i = index[id(job)]
                    results[i] = p
                    _store(keys[i], p)
                    if progress:
                        progress(p)
    return [results[i] for i in range(len(jobs))]


def _has_nvvm() -> bool:
    """NVVM for numba-cuda: the nvidia-nvvm wheel, or a CUDA toolkit's nvvm/ folder."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("nvidia-nvvm")
        return True
    except PackageNotFoundError:
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        return (Path(home) / "nvvm" / "lib64").is_dir()


def check_backends(names) -> None:
    """AuditToolError naming what to install when a backend's compiler is missing here."""
    import importlib.util

    for name in names:
        if name == "triton" and importlib.util.find_spec("triton") is None:
            raise AuditToolError("autonorm audit of triton kernels needs triton: pip install autonorm[triton]")
        if name == "numba" and importlib.util.find_spec("numba") is None:
            raise AuditToolError("autonorm audit of numba kernels needs numba-cuda: pip install autonorm[audit]")
        if name == "numba" and not _has_nvvm():
            raise AuditToolError("autonorm audit of numba kernels needs NVVM and NVRTC: pip install autonorm[audit] "
                                 "(the nvidia-nvvm and nvidia-cuda-nvrtc wheels) or a CUDA toolkit in CUDA_HOME")
        if name == "cupy":
            tool("nvcc")
    tool("ptxas")
    tool("cuobjdump")


def heuristic_jobs(specs, backends, archs) -> list[Job]:
    from .backends import get_backend

    return [Job(b, s, get_backend(b).heuristic(s), a) for b in backends for s in specs for a in archs]


def space_jobs(spec: NormSpec, backends, archs) -> list[Job]:
    from .backends import get_backend

    return [Job(b, spec, c, a) for b in backends for c in get_backend(b).space(spec) for a in archs]


def database_jobs(path, archs, backends=BACKENDS) -> list[Job]:
    """Every record winner (and runner-up) of a tuning database whose backend the audit compiles."""
    from .db import TuningDB

    db = TuningDB.load(path)
    jobs = []
    for record in db.records.values():
        spec = record.key.spec()
        for entry in (record.winner, *record.runners_up):
            if entry.backend in backends:
                jobs += [Job(entry.backend, spec, entry.config, a) for a in archs]
    return list(dict.fromkeys(jobs))


def prune_space(spec: NormSpec, configs: dict, device, workers: int | None = None) -> dict:
    """The tuner's hook: `configs` ({backend: [config]}) without the configs that spill or cannot
    launch on `device` (a CUDA device), judged by compiling them for its architecture.

    Backends without a GPU compiler here (torch, numba-cpu) keep their configs. A missing
    toolchain piece prunes nothing and says so once: the tuner then times every candidate.
    """
    import logging

    import torch

    props = torch.cuda.get_device_properties(device)
    arch = device_arch(props)
    ARCHS.setdefault(arch.name, arch)
    auditable = [name for name in configs if name in BACKENDS]
    try:
        check_backends(auditable)
    except AuditToolError as exc:
        logging.getLogger("autonorm.audit").warning("search space not pruned: %s", exc)
        return configs
    jobs = [Job(name, spec, c, arch.name) for name in auditable for c in configs[name]]
    fits = {(j.backend, j.config): p.fits() for j, p in zip(jobs, audit(jobs, workers=workers or os.cpu_count()))}
    return {name: [c for c in cs if fits.get((name, c), True)] for name, cs in configs.items()}


def gate_failures(p: Profile, spec: NormSpec) -> list[str]:
    """Why a kernel does not fit: spills, a block that cannot be resident, unvectorized loads of x."""
    problems = []
    if p.spill_bytes:
        problems.append(f"spills {p.spill_bytes} bytes")
    if p.registers * p.threads > ARCHS[p.arch].regs or not p.launchable:
        problems.append(f"{p.registers} registers x {p.threads} threads cannot be resident ({p.limiter})")
    # Numba has no vector loads; Triton and CuPy load x 16 bytes at a time on aligned rows.
    if p.backend != "numba" and spec.hidden * ITEMSIZE[spec.x_dtype] % 16 == 0 and not p.global_loads_128:
        problems.append("no 128-bit global load although rows are 16-byte aligned")
    return problems


# --- report --------------------------------------------------------------------------------
COLUMNS = ("backend", "arch", "spec", "config", "regs", "spill", "stack", "smem", "threads", "blocks/SM",
           "occupancy", "ld128", "st128", "cp.async")


def row(p: Profile) -> tuple:
    return (p.backend, p.arch, p.spec, p.config, p.registers, p.spill_bytes, p.stack,
            p.smem_static + p.smem_dynamic, p.threads, p.blocks_per_sm, f"{p.occupancy:.0%}",
            f"{p.global_loads_128}/{p.global_loads}", f"{p.global_stores_128}/{p.global_stores}", p.cp_async)


def table(profiles: list[Profile], markdown: bool = False) -> str:
    rows = [tuple(map(str, COLUMNS))] + [tuple(map(str, row(p))) for p in profiles]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        lines.insert(1, "|" + "|".join("---" for _ in COLUMNS) + "|")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def doc(jobs: list[Job], profiles: list[Profile], versions: dict, command: str) -> str:
    """The hardware-fit page: per backend, one row per spec with both architectures side by side."""
    import datetime

    archs = list(dict.fromkeys(p.arch for p in profiles))
    by_key = {(j.backend, j.spec, j.arch): (j, p) for j, p in zip(jobs, profiles)}
    fits = sum(not gate_failures(p, j.spec) for j, p in zip(jobs, profiles))
    lines = [
        "# Hardware fit of the heuristic kernels",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()} (no GPU: cross-compiled).",
        "Toolchain: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        "Per kernel and architecture: registers per thread, spill bytes (stores + loads), threads per block,",
        "resident blocks per SM and theoretical occupancy (warps resident / 64), and 128-bit global loads",
        "out of all global loads (from the SASS). A kernel fits when it does not spill, a block can be",
        "resident (registers x threads <= 65,536) and x is loaded 16 bytes at a time wherever",
        "N * itemsize is a multiple of 16 (Numba CUDA has no vector loads: its share is reported, not",
        "gated). Regenerate with the command above; `tests/test_audit.py` gates the same numbers in CI.",
        "",
        f"**{fits} of {len(profiles)} kernels fit.**",
    ]
    for backend in dict.fromkeys(j.backend for j in jobs):
        lines += ["", f"## {backend}", ""]
        head = ["op", "dir", "dtype", "N", "config"]
        for a in archs:
            head += [f"{a} regs", f"{a} spill", f"{a} threads", f"{a} blocks/SM", f"{a} occ.", f"{a} ld128"]
        head.append("fits")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for spec in dict.fromkeys(j.spec for j in jobs if j.backend == backend):
            cells = [spec.op, spec.direction, spec.x_dtype, str(spec.hidden)]
            ok = True
            config = ""
            for a in archs:
                job, p = by_key[(backend, spec, a)]
                config = job.config.short()
                ok &= not gate_failures(p, spec)
                cells += [str(p.registers), str(p.spill_bytes), str(p.threads), str(p.blocks_per_sm),
                          f"{p.occupancy:.0%}", f"{p.global_loads_128}/{p.global_loads}"]
            cells.insert(4, f"`{config}`")
            cells.append("yes" if ok else "**no**")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser) -> None:
    parser.add_argument("--arch", default="sm_80,sm_90", help=f"comma-separated, of {', '.join(ARCHS)}")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, of triton, cupy, numba")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--grid", default=None, help="heuristics of every spec of a grid (standard, quick)")
    what.add_argument("--db", default=None, metavar="PATH", help="every record of a tuning database")
    what.add_argument("--hidden", type=int, default=None, help="one spec (with --op/--direction/--dtype)")
    parser.add_argument("--dtypes", default=None, help="with --grid: only these dtypes (comma-separated)")
    parser.add_argument("--op", default="rmsnorm", choices=("rmsnorm", "layernorm"))
    parser.add_argument("--direction", default="fwd", choices=("fwd", "bwd"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--space", action="store_true", help="with --hidden: the spec's whole search space")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel instead of a table")
    parser.add_argument("--markdown", action="store_true", help="the table as Markdown")
    parser.add_argument("--cached-only", action="store_true",
                        help="report only kernels already in the audit cache (compile nothing)")
    parser.add_argument("--doc", action="store_true",
                        help="a Markdown page: toolchain, then one table per backend (docs/benchmarks/hardware-fit.md)")


def main(args) -> int:
    from .grids import get
    from .spec import dtype_name

    try:
        archs = [a.strip() for a in args.arch.split(",") if a.strip()]
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        for a in archs:
            if a not in ARCHS:
                raise ValueError(f"unknown --arch {a!r}: expected some of {', '.join(ARCHS)}")
        for b in backends:
            if b not in BACKENDS:
                raise ValueError(f"backend {b!r} has no GPU compiler to audit: expected some of {', '.join(BACKENDS)}")
        if args.db:
            jobs = database_jobs(args.db, archs, backends)
        elif args.hidden is not None:
            dt = dtype_name(args.dtype)
            spec = NormSpec(args.op, args.direction, dt, dt, args.hidden)
            jobs = space_jobs(spec, backends, archs) if args.space else heuristic_jobs([spec], backends, archs)
        else:
            specs = get(args.grid or "quick").specs()
            if args.dtypes:
                wanted = {dtype_name(d.strip()) for d in args.dtypes.split(",")}
                specs = [s for s in specs if s.x_dtype in wanted]
            jobs = heuristic_jobs(specs, backends, archs)
        check_backends(sorted({j.backend for j in jobs}))
    except AuditToolError as exc:
        print(f"autonorm audit: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"autonorm audit: {exc}", file=sys.stderr)
        return 2
    print(f"autonorm audit: {len(jobs)} kernels ({', '.join(backends)} x {', '.join(archs)})", file=sys.stderr)
    if args.cached_only:
        requested = len(jobs)
        # Whole specs only (every arch present), so the page's rows are complete.
        found = {(j.backend, j.spec, j.arch): (j, p) for j, p in cached(jobs)}
        complete = {(j.backend, j.spec) for j in jobs if all((j.backend, j.spec, a) in found for a in archs)}
        pairs = [found[(j.backend, j.spec, j.arch)] for j in jobs if (j.backend, j.spec) in complete]
        jobs, profiles = [j for j, _ in pairs], [p for _, p in pairs]
        print(f"autonorm audit: {len(jobs)} of {requested} kernels are cached; the others are left out",
              file=sys.stderr)
    else:
        profiles = audit(jobs)
    bad = 0
    for job, p in zip(jobs, profiles):
        bad += bool(gate_failures(p, job.spec))
    if args.doc:
        print(doc(jobs, profiles, toolchain(backends), " ".join(["autonorm audit", *sys.argv[2:]])))
        if args.cached_only and len(jobs) < requested:
            print(f"\nThis page holds {len(jobs)} of the {requested} kernels requested (those compiled so far);"
                  " rerun without --cached-only for the rest.")
    elif args.json:
        for job, p in zip(jobs, profiles):
            print(json.dumps({**p.to_json(), "problems": gate_failures(p, job.spec)}))
    else:
        print(table(profiles, markdown=args.markdown))
        print(f"\n{len(profiles) - bad} of {len(profiles)} fit (no spill, resident, 128-bit loads of aligned x); "
              f"toolchain {json.dumps(toolchain(backends))}", file=sys.stderr)
    return 0
