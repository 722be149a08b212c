"""Machine-code facts of the numba-cpu kernels on an AVX2 host: their hot loops are packed 256-bit code.

A kernel that stops vectorizing (a call left in a loop, a bounds or negative-index check, a reduction LLVM may
not reorder) loses several times its speed; timing thresholds would be noise on a shared machine, what the
compiler emitted is not. Each kernel source
is imported from a fresh folder, so Numba compiles it here (it refuses to disassemble cached code).
"""
import importlib.util
import re

import pytest

pytest.importorskip("numba")

from autonorm.backends import get_backend  # noqa: E402
from autonorm.spec import NormSpec  # noqa: E402


def _host_has_avx2() -> bool:
    from llvmlite import binding

    try:
        return bool(binding.get_host_cpu_features().get("avx2"))
    except RuntimeError:  # no feature map on this host (not x86)
        return False


pytestmark = pytest.mark.skipif(not _host_has_avx2(), reason="needs an x86 host with AVX2 (ymm registers)")


def _serial_asm(spec: NormSpec, tmp_path) -> str:
    """The assembly of the heuristic config's serial kernel, compiled for the launcher's argument types."""
    from numba import types

    backend = get_backend("numba-cpu")
    path = tmp_path / f"k_{spec.direction}.py"
    path.write_text(backend.render(spec, backend.heuristic(spec)).text)
    module_spec = importlib.util.spec_from_file_location(f"asm_probe_{spec.direction}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    # launch arguments: addresses, strides and sizes are Python ints, eps and offset floats
    code = module.kernel_serial.py_func.__code__
    signature = tuple(types.float64 if name in ("eps_", "offset_") else types.int64
                      for name in code.co_varnames[:code.co_argcount])
    module.kernel_serial.compile(signature)
    return module.kernel_serial.inspect_asm(signature)


WIDEN = r"vpmovzxwd\s.*%ymm"  # 16-bit lanes zero-extended to 32 (bf16 -> fp32 is that and a shift)
NARROW = r"vpackusdw\s"  # fp32 lanes packed to 16 bits
STORE = r"vmovdq[ua]\s+%[xy]mm\d+, .*\("  # a packed store to memory


def _loops(asm: str) -> list[str]:
    """The bodies of the basic blocks that jump back to their own label (the compiled inner loops)."""
    loops = []
    for block in re.split(r"\n(?=\.LBB\d+_\d+:)", asm):
        label = re.match(r"(\.LBB\d+_\d+):", block)
        if label and re.search(rf"\n\s*j\w+\s+{re.escape(label.group(1))}\b", block):
            loops.append(block)
    return loops


def _packed_loop(loops: list[str], *patterns: str) -> bool:
    """Whether one of the loops contains every pattern."""
    return any(all(re.search(p, body) for p in patterns) for body in loops)


def test_bf16_forward_hot_loops_are_packed(tmp_path):
    """RMSNorm bf16 forward: the sum of squares widens bf16 to fp32 in ymm registers and accumulates with packed
    FMAs; the last pass widens, scales, narrows packed and stores y, 8 or 16 elements an iteration."""
    spec = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 4096, **NormSpec.feature_kwargs("weight"))
    loops = _loops(_serial_asm(spec, tmp_path))
    assert _packed_loop(loops, WIDEN, r"vfmadd\d+ps\s.*%ymm"), "the sum of squares is not packed ymm code"
    assert _packed_loop(loops, WIDEN, r"vmulps\s.*%ymm", NARROW, STORE), "the last pass is not packed ymm code"


def test_bf16_backward_hot_loops_are_packed(tmp_path):
    """RMSNorm bf16 backward: pass 1 widens x and dy in ymm registers and updates the task's fp32 dW partial row
    with packed stores; pass 2 computes dx packed, narrows it packed and stores it."""
    spec = NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 4096, **NormSpec.feature_kwargs("weight"))
    loops = _loops(_serial_asm(spec, tmp_path))
    assert _packed_loop(loops, WIDEN, r"vmov[au]ps\s+%ymm\d+, .*\("), "pass 1 (dW partials) is not packed ymm code"
    assert _packed_loop(loops, WIDEN, r"vsubps\s.*%ymm", NARROW, STORE), "the dx pass is not packed ymm code"
