"""Machine-code facts of the numba-cpu kernels on an AVX2 host: their hot loops are packed 256-bit code.

Timing thresholds would be noise on a shared machine; what the compiler emitted is not. Each kernel source
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


def test_bf16_forward_store_loop_is_packed_and_runs_the_next_rows_sum(tmp_path):
    """RMSNorm bf16 forward: one loop widens bf16 to fp32 in ymm registers (vpmovzxwd), narrows packed
    (vpackusdw) and stores y, and accumulates the next row's sum of squares with packed FMAs: the next row's
    loads overlap this row's arithmetic."""
    spec = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 4096, **NormSpec.feature_kwargs("weight"))
    loops = _loops(_serial_asm(spec, tmp_path))
    assert any(re.search(r"vpmovzxwd\s.*%ymm", body) for body in loops), "no loop widens bf16 with ymm registers"
    fused = [body for body in loops if all(re.search(p, body) for p in (NARROW, STORE, r"vfmadd\d+ps\s.*%ymm"))]
    assert fused, "no loop both narrows and stores y packed and accumulates a sum of squares with packed FMAs"


def test_bf16_backward_dx_loop_is_packed_and_runs_the_next_rows_partials(tmp_path):
    """RMSNorm bf16 backward: one loop narrows and stores dx packed and adds the next row's dy * xhat to the
    task's fp32 dW partial row with packed ymm stores: the next row's loads overlap this row's arithmetic."""
    spec = NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 4096, **NormSpec.feature_kwargs("weight"))
    loops = _loops(_serial_asm(spec, tmp_path))
    assert any(re.search(r"vpmovzxwd\s.*%ymm", body) for body in loops), "no loop widens bf16 with ymm registers"
    fused = [body for body in loops if all(re.search(p, body) for p in (NARROW, STORE, r"vmov[au]ps\s+%ymm\d+, .*\("))]
    assert fused, "no loop both narrows and stores dx packed and stores fp32 dW partials from ymm registers"
