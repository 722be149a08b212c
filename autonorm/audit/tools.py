"""The CUDA tools the audit runs (ptxas, cuobjdump, nvcc: the newest copy here) and what they print.

ptxas and cuobjdump ship in the Triton wheel; nvcc comes with a CUDA toolkit. A
missing piece is an `AuditToolError` that names what installs it.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

BACKENDS = ("triton", "cupy", "numba")


class AuditToolError(RuntimeError):
    """A toolchain piece the audit needs is missing; the message says what to install."""


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


# LDGSTS (cp.async) first and whole opcodes only: `LDG` alone also matched the start of LDGSTS, which counted
# every cp.async as a global load and none as cp.async (and LDGDEPBAR, its commit, as a load).
_GLOBAL = re.compile(r"\b(LDGSTS|LDG|STG)\b(\.[\w.]*)?")


def sass_counts(cubin: str) -> dict[str, dict]:
    """Per function of a cubin: global loads (cp.async included) / stores, how many are 128-bit (loads: and
    64-bit), cp.async (LDGSTS) count."""
    proc = subprocess.run([tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"cuobjdump -sass {cubin} failed: {proc.stderr.strip()}")
    return parse_sass(proc.stdout)


def parse_sass(listing: str) -> dict[str, dict]:
    """sass_counts of a `cuobjdump -sass` listing."""
    out: dict[str, dict] = {}
    current = None
    text: list[str] = []
    for line in listing.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            current = out.setdefault(m.group(1), {"global_loads": 0, "global_loads_128": 0, "global_loads_64": 0,
                                                  "global_stores": 0, "global_stores_128": 0, "cp_async": 0})
            text = current.setdefault("_text", [])
            continue
        if current is None:
            continue
        # The instruction without its address and encoding, for the SASS hash.
        if m := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s*(.*?);", line):
            text.append(m.group(1))
        for op, mods in _GLOBAL.findall(line):
            wide = ".128" in mods
            if op in ("LDG", "LDGSTS"):  # a cp.async reads global memory too (into shared, not registers)
                current["cp_async"] += op == "LDGSTS"
                current["global_loads"] += 1
                current["global_loads_128"] += wide
                current["global_loads_64"] += ".64" in mods
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
