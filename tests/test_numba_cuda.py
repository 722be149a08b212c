"""Numba CUDA backend: the correctness grid in Numba's CUDA simulator (CPU tier) and on a GPU.

The simulator runs every CUDA thread as a Python thread, so CPU-tier shapes are
tiny: N <= 300 except the shared grid's mixed-precision sizes, a few rows, one
config that loops over chunks. The GPU tier runs the full shared grid.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install autonorm[cuda13])")

import grid  # noqa: E402

from autonorm import settings, verify  # noqa: E402
from autonorm.backends import get_backend  # noqa: E402
from autonorm.backends import numba_cuda as nc  # noqa: E402
from autonorm.backends import numba_cuda_config as ncc  # noqa: E402
from autonorm.errors import InvalidConfigError  # noqa: E402
from autonorm.spec import NormSpec  # noqa: E402

BACKEND = get_backend("numba")
SIMULATED = nc._simulator()
DEVICE = "cpu" if SIMULATED else "cuda"
needs_backend = pytest.mark.skipif(not BACKEND.is_available(), reason=str(BACKEND.unavailable_reason()))

# Sizes the simulator affords: 1, a prime, an odd size, and 300 (> one 256-wide chunk of most configs).
SIM_CASES = grid.params(hidden=(1, 7, 123, 300), feature_hidden=(123,))
# threads*items = 64 < 300: the row is processed in 5 chunks, re-read from memory in each pass.
CHUNKED = nc.NumbaCudaConfig(threads=32, items=2, rows=1, vec=2)


@needs_backend
@pytest.mark.skipif(not SIMULATED, reason="CPU tier: runs in the CUDA simulator")
@pytest.mark.parametrize("spec,rows,strided", SIM_CASES)
def test_grid_simulator(spec, rows, strided):
    grid.check_case(BACKEND, spec, rows, strided, DEVICE)


@needs_backend
@pytest.mark.parametrize("op", grid.OPS)
@pytest.mark.parametrize("direction", grid.DIRECTIONS)
def test_chunked_rows(op, direction):
    feats = dict(bias=True) if op == "layernorm" else dict(offset=True)
    spec = NormSpec(op, direction, "bfloat16", "float32", 300, residual=True, **feats)
    assert BACKEND.render_context(spec, CHUNKED)["nchunk"] == 5
    # the backward's dW/dB partials read-modify-written per row, then summed column-outer; the forward's
    # row read back from global memory, then from its copy in shared memory
    others = dict(bwd=dict(partials="columns"), fwd=dict(row_cache="shared"))[direction]
    for config in (CHUNKED, CHUNKED.replace(**others)):
        grid.check_case(BACKEND, spec, 3, True, DEVICE, config=config)


@needs_backend
@pytest.mark.parametrize("op", grid.OPS)
@pytest.mark.parametrize("dtype,vec", [("float16", 1), ("float32", 2), ("bfloat16", 4)])
@pytest.mark.parametrize("residual", [False, True])
def test_forward_row_in_shared_memory(op, dtype, vec, residual):
    """Chunked rows kept in shared memory by pass 1, as words of each input dtype (scalars at vec=1), with
    and without the residual (h cached as rounded for the store)."""
    feats = dict(bias=True) if op == "layernorm" else dict(offset=True)
    spec = NormSpec(op, "fwd", dtype, "float32", 296, residual=residual, **feats)
    config = nc.NumbaCudaConfig(threads=32, items=4, rows=1, vec=vec, row_cache="shared")
    assert BACKEND.render_context(spec, config)["nchunk"] == 3
    grid.check_case(BACKEND, spec, 2, True, DEVICE, config=config)


def test_shared_row_cache_rules():
    """row_cache=shared is the chunked forward's, within Numba's 48 KiB of static shared memory, and the
    heuristic's choice there."""
    fwd = NormSpec("layernorm", "fwd", "bfloat16", "bfloat16", 300, bias=True, residual=True)
    shared = CHUNKED.replace(row_cache="shared")
    assert nc.NumbaCudaConfig.is_valid(fwd, shared) is None
    assert "applies to the forward" in nc.NumbaCudaConfig.is_valid(fwd.with_direction("bwd"), shared)
    in_registers = nc.NumbaCudaConfig(threads=64, items=8, rows=1, vec=4, row_cache="shared")
    assert "chunked rows" in nc.NumbaCudaConfig.is_valid(fwd, in_registers)
    # 24K bf16 elements fill the 48 KiB alone, before the reduction buffers
    big = replace(fwd, hidden=24576)
    assert "over Numba's static 49152" in nc.NumbaCudaConfig.is_valid(big, BACKEND.heuristic(big).replace(
        row_cache="shared"))
    for hidden, x_dtype, expected in ((16384, "bfloat16", "shared"), (20480, "bfloat16", "shared"),
                                      (24576, "bfloat16", "global"), (8192, "float32", "shared"),
                                      (16384, "float32", "global"), (4096, "bfloat16", "global")):
        spec = replace(fwd, hidden=hidden, x_dtype=x_dtype, w_dtype=x_dtype)
        config = BACKEND.heuristic(spec)
        assert config.row_cache == expected, (hidden, x_dtype)
        if expected == "shared":
            assert ncc.forward_smem_bytes(spec, config) == hidden * spec.x_itemsize + 3 * config.threads * 4
    assert BACKEND.heuristic(replace(fwd.with_direction("bwd"), hidden=16384)).row_cache == "global"


@needs_backend
@pytest.mark.parametrize("op", grid.OPS)
@pytest.mark.parametrize("dtype,vec", [("float16", 1), ("float32", 2), ("bfloat16", 4)])
def test_backward_prefetches_the_next_row(op, dtype, vec):
    """prefetch=1: each slot's next row is fetched (packed words, scalars at vec=1) before this row's
    reductions. 9 rows over the simulator's 2 blocks x 2 slots: every slot walks 2-3 rows and the last
    iteration has slots without a row, which must neither fetch nor write."""
    feats = dict(bias=True) if op == "layernorm" else dict(offset=True)
    spec = NormSpec(op, "bwd", dtype, "float32", 96, residual=True, **feats)
    config = nc.NumbaCudaConfig(threads=32, items=4, rows=2, vec=vec, prefetch=1)
    assert nc.NumbaCudaConfig.is_valid(spec, config) is None
    assert "_fetch(x, sx, dy, sdy, nxt" in BACKEND.render(spec, config).text
    grid.check_case(BACKEND, spec, 9, True, DEVICE, config=config)


def test_prefetch_rules():
    """prefetch is the backward's with the row in registers; the heuristic leaves it to the tuner."""
    bwd = NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 300)
    in_registers = nc.NumbaCudaConfig(threads=64, items=8, rows=1, vec=4, prefetch=1)
    assert nc.NumbaCudaConfig.is_valid(bwd, in_registers) is None
    assert "row in registers" in nc.NumbaCudaConfig.is_valid(bwd.with_direction("fwd"), in_registers)
    assert "row in registers" in nc.NumbaCudaConfig.is_valid(bwd, CHUNKED.replace(prefetch=1))
    assert "_fetch" not in BACKEND.render(bwd, in_registers.replace(prefetch=0)).text
    assert BACKEND.heuristic(bwd).prefetch == 0


def test_backward_grid_fills_half_of_each_sm():
    """The persistent backward launches enough blocks an SM for half of its 2048 threads (at most 16)."""
    for threads, rows, expected in ((32, 4, 8), (128, 1, 8), (32, 1, 16), (512, 1, 2), (1024, 1, 1)):
        config = nc.NumbaCudaConfig(threads=threads, items=8, rows=rows, vec=4)
        assert nc.persistent_blocks_per_sm(config) == expected, (threads, rows)


class _FakeKernel:
    """What the launcher reads of a compiled kernel, for a given register and shared memory use."""

    def __init__(self, py_func, regs, smem):
        self.py_func, self.regs_per_thread, self.shared_mem_per_block = py_func, regs, smem
        self.signatures = []

    def compile(self, sig):
        self.signatures.append(sig)
        return self


@pytest.mark.parametrize("regs,smem,rows,expected", [
    (32, 0, 1, 8),  # 8 x 128 threads resident: half of the SM, as the rule asks
    (32, 0, 2, 4),  # 256-thread blocks: 4
    (128, 0, 1, 4),  # 128 registers: 4 blocks of 128 threads fill 64K registers
    (32, 60 * 1024, 1, 3),  # 60 KiB of shared memory a block: 3 fit Hopper's 228 KiB
])
def test_backward_grid_is_capped_at_resident_blocks(monkeypatch, regs, smem, rows, expected):
    """On a GPU the persistent backward launches SMs x min(blocks for half an SM's threads, blocks resident),
    counted from the compiled kernel's registers and shared memory (faked here: no GPU), so no block waits for a
    second wave."""
    from types import SimpleNamespace

    from autonorm.backends.base import import_generated

    spec = NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 1024)
    config = nc.NumbaCudaConfig(threads=128, items=8, rows=rows, vec=4)
    kernel = _FakeKernel(import_generated(BACKEND.render(spec, config), "numba_cuda")._kernel.py_func, regs, smem)
    props = SimpleNamespace(major=9, minor=0, multi_processor_count=132, regs_per_multiprocessor=65536,
                            shared_memory_per_multiprocessor=228 * 1024, max_threads_per_multi_processor=2048)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)

    launcher = nc._Launcher.__new__(nc._Launcher)
    launcher.device = torch.device("cuda", 0)
    launcher.cuda = SimpleNamespace(gpus=[_NoContext()])
    launcher.cap_to_resident(kernel, spec, config)
    assert launcher.max_blocks == 132 * expected
    assert kernel.signatures == [nc.kernel_signature(spec, 4, kernel.py_func)]  # compiled for the launch's types


class _NoContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_column_partials_rules():
    """partials=columns is the chunked backward's with a weight, and the heuristic's choice there."""
    chunked = NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 300, bias=True)
    columns = CHUNKED.replace(partials="columns")
    assert nc.NumbaCudaConfig.is_valid(chunked, columns) is None
    assert "backward with dW/dB" in nc.NumbaCudaConfig.is_valid(chunked.with_direction("fwd"), columns)
    assert "backward with dW/dB" in nc.NumbaCudaConfig.is_valid(replace(chunked, weight=False, bias=False), columns)
    in_registers = nc.NumbaCudaConfig(threads=64, items=8, rows=1, vec=4)
    assert "chunked rows" in nc.NumbaCudaConfig.is_valid(chunked, in_registers.replace(partials="columns"))
    assert BACKEND.heuristic(replace(chunked, hidden=65536)).partials == "columns"
    assert BACKEND.heuristic(replace(chunked, hidden=4096)).partials == "rows"  # in registers
    assert BACKEND.heuristic(replace(chunked, hidden=65536, weight=False, bias=False)).partials == "rows"


@needs_backend
@pytest.mark.parametrize("op,direction", [("rmsnorm", "fwd"), ("layernorm", "bwd"),  # both directions and ops...
                                          pytest.param("layernorm", "fwd", marks=pytest.mark.slow),  # ...the rest slow
                                          pytest.param("rmsnorm", "bwd", marks=pytest.mark.slow)])
def test_fp32_weight_under_16bit_words(op, direction):
    """4 bf16 elements a 64-bit word lie over 16 bytes of an fp32 weight, loaded as 2 weight words: with the
    row in registers (the backward holds the weight across rows) and chunked, and from a strided or
    misaligned weight view, which the launcher copies into whole words."""
    feats = dict(bias=True) if op == "layernorm" else dict(offset=True)
    spec = NormSpec(op, direction, "bfloat16", "float32", 256, **feats)
    assert nc.weight_word_elements(spec, 4) == 2
    cached = nc.NumbaCudaConfig(threads=32, items=8, rows=1, vec=4)
    chunked = nc.NumbaCudaConfig(threads=32, items=4, rows=1, vec=4)
    assert nc.row_in_registers(spec, cached) and not nc.row_in_registers(spec, chunked)
    for config in (cached, chunked):
        grid.check_case(BACKEND, spec, 5, False, DEVICE, config=config)
    inputs = verify.make_inputs(spec, 5, DEVICE)
    strided = torch.empty(2 * 256, dtype=torch.float32, device=DEVICE)[::2].copy_(inputs.weight)
    misaligned = torch.empty(256 + 1, dtype=torch.float32, device=DEVICE)[1:].copy_(inputs.weight)
    for weight in (strided, misaligned):
        changed = replace(inputs, weight=weight)
        result = verify.compare(spec, changed, BACKEND.compile(spec, cached, DEVICE)(*changed.args(spec)))
        assert result.ok, (spec.short(), result.errors)


@needs_backend
@pytest.mark.parametrize("op", grid.OPS)
@pytest.mark.parametrize("direction", grid.DIRECTIONS)
def test_configs_from_space(op, direction):
    """The extremes of the space and one in between, with several rows per block and a missing row."""
    spec = NormSpec(op, direction, "float16", "float16", 100)
    space = BACKEND.space(spec)
    multi_row = [c for c in space if c.rows > 1]
    picks = {space[0], space[-1], space[len(space) // 2], multi_row[-1]}
    for config in sorted(picks, key=lambda c: c.short()):
        grid.check_case(BACKEND, spec, 5, False, DEVICE, config=config)  # 5 rows: the last block is partial


@needs_backend
@pytest.mark.skipif(not SIMULATED, reason="CPU tier: runs in the CUDA simulator")
def test_bf16_narrowing_follows_the_contract():
    """fp32 -> bf16 as numba-cpu does it: torch's round-to-nearest-even, Inf on overflow, and a NaN stays
    a quiet NaN with its sign (docs/design.md, "bf16")."""
    import numpy as np
    from numba import cuda

    from autonorm.backends.base import import_generated

    spec = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 8)
    module = import_generated(BACKEND.render(spec, BACKEND.heuristic(spec)), "numba_cuda")
    narrow = module._f32_to_bf16

    # Defined with `cuda` and `narrow` as globals: the simulator swaps in its own `cuda` through globals.
    scope = {"cuda": cuda, "narrow": narrow}
    exec(textwrap.dedent("""
        def kernel(f, out):
            i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
            if i < f.size:
                out[i] = narrow(f[i])
    """), scope)
    kernel = cuda.jit(scope["kernel"])

    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(1 << 31), (1 << 31) - 1, (448,), generator=gen, dtype=torch.int64).to(torch.int32)
    specials = torch.tensor([0.0, -0.0, 1.0, 1.00390625, 1.01171875, -2.5, 3.4e38, -3.4e38, float("inf"),
                             float("-inf"), float("nan"), -float("nan")])
    f = torch.cat([bits.view(torch.float32), specials, -specials])
    out = np.zeros(f.numel(), np.uint16)
    kernel[(f.numel() + 63) // 64, 64](f.numpy(), out)
    got = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
    nan = torch.isnan(f)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int16), f[~nan].to(torch.bfloat16).view(torch.int16))
    nan_bits = f[nan].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(got[nan].view(torch.int16).to(torch.int64) & 0xFFFF, (nan_bits >> 16) | 0x40)


@needs_backend
def test_backward_is_deterministic():
    spec = NormSpec("layernorm", "bwd", "float32", "float32", 96, bias=True)
    kernel = BACKEND.compile(spec, nc.NumbaCudaConfig(threads=32, items=4, rows=2, vec=2), DEVICE)
    inputs = verify.make_inputs(spec, 7, DEVICE)
    first = kernel(*inputs.args(spec))
    second = kernel(*inputs.args(spec))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_backend
def test_source_is_written_to_the_cache_dir():
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 8)
    config = BACKEND.heuristic(spec)
    BACKEND.compile(spec, config, DEVICE)
    source = BACKEND.render(spec, config)
    path = settings.cache_dir() / "numba_cuda" / f"{source.sha256}.py"
    assert path.read_text() == source.text


@needs_backend
@pytest.mark.skipif(not SIMULATED, reason="the simulator case")
def test_public_functions_route_to_numba(use_backend):
    from autonorm import dispatch

    use_backend("numba")
    assert grid.public_api_3d("rmsnorm", torch.float32, DEVICE) < 1e-5
    x, w = torch.randn(6, 96), torch.randn(96)
    for direction in grid.DIRECTIONS:
        choice = dispatch.choice_for_tensors("rmsnorm", direction, x, w)
        assert (choice.backend, choice.rung) == ("numba", "forced")


# --- config: domain, validity, heuristic (no kernels run) ---------------------------

@pytest.mark.parametrize("hidden", [1, 7, 64, 123, 760, 4096, 5120, 65537, 262144, 1 << 20])
@pytest.mark.parametrize("dtype", grid.DTYPES)
def test_heuristic_is_valid_and_in_space(hidden, dtype):
    spec = NormSpec("rmsnorm", "fwd", dtype, dtype, hidden)
    config = nc.NumbaCudaConfig.heuristic(spec)
    assert nc.NumbaCudaConfig.is_valid(spec, config) is None
    assert config in nc.NumbaCudaConfig.space(spec)
    if hidden <= 4096:  # the whole row fits one chunk: it stays in registers
        assert config.threads * config.items >= hidden


def test_validity_rules():
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 4096)
    assert "exceeds 1024" in nc.NumbaCudaConfig.is_valid(spec, nc.NumbaCudaConfig(threads=256, items=8, rows=8, vec=1))
    small = NormSpec("rmsnorm", "fwd", "float32", "float32", 10)
    assert "half of" in nc.NumbaCudaConfig.is_valid(small, nc.NumbaCudaConfig(threads=64, items=1, rows=1, vec=1))
    assert nc.NumbaCudaConfig.is_valid(small, nc.NumbaCudaConfig(threads=32, items=1, rows=8, vec=1)) is None
    with pytest.raises(InvalidConfigError):
        nc.NumbaCudaConfig.from_dict({"threads": 48, "items": 1, "rows": 1})
    with pytest.raises(InvalidConfigError):
        nc.NumbaCudaConfig.from_dict({"threads": "32", "items": 1, "rows": 1})


def test_unavailable_without_numba_cuda(monkeypatch):
    monkeypatch.setattr(nc, "_numba_cuda", lambda: None)
    reason = nc.NumbaCudaBackend().unavailable_reason()
    assert "pip install autonorm[cuda13]" in reason


@pytest.mark.skipif(not SIMULATED, reason="the simulator case")
def test_devices_under_the_simulator():
    assert BACKEND.supports_device(torch.device("cpu"))
    assert not BACKEND.supports_device(torch.device("cuda"))
    assert BACKEND.version().endswith("+sim")


# --- the same sources compiled by Numba for a real GPU (typing + lowering, no GPU needed) ----

_LOWER = textwrap.dedent("""
    import sys
    import numba.cuda.cudadrv.nvrtc as nvrtc
    import numba.cuda.dispatcher as dispatcher
    from types import SimpleNamespace
    from numba import types as t
    from numba.cuda.compiler import compile_cuda
    from autonorm.backends import get_backend
    from autonorm.backends.base import import_generated
    from autonorm.backends.numba_cuda import kernel_signature
    from autonorm.spec import NormSpec

    # Device functions ask the current device for its compute capability, and
    # codegen asks NVRTC for the arch flag: answer both for sm_80, without a GPU.
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=(8, 0))
    nvrtc.get_arch_option = lambda major, minor: f"compute_{major}{minor}"
    backend = get_backend("numba")
    for op in ("rmsnorm", "layernorm"):
        for direction in ("fwd", "bwd"):
            feats = dict(bias=True) if op == "layernorm" else dict(offset=True)
            # scalar accesses; 4 bf16 a word under 2 words of the fp32 weight; chunked, 4 fp16 a word
            for x_dtype, w_dtype, n in (("bfloat16", "float32", 123), ("bfloat16", "float32", 2048),
                                        ("float16", "float16", 70000)):
                spec = NormSpec(op, direction, x_dtype, w_dtype, n, residual=True, **feats)
                config = backend.heuristic(spec)
                module = import_generated(backend.render(spec, config), "numba_cuda")
                sig = kernel_signature(spec, config.vec, module._kernel.py_func)
                ir = compile_cuda(module._kernel.py_func, t.void, sig, cc=(8, 0))
                ir = ir.library.get_llvm_str()
                # fp32 math only: the one use of a double is a folded constant truncation.
                bad = [l for l in ir.splitlines() if " double" in l and "fptrunc double" not in l
                       and not l.startswith("declare")]
                assert not bad, (spec.short(), bad[:3])
    print("lowered")
""")


@pytest.mark.slow  # every kernel lowered by NVVM in a subprocess (~20 s); the audit's saved report gates them too
def test_kernels_lower_for_a_real_gpu(tmp_path):
    """The simulator runs Python, not Numba's CUDA compiler: compile the same sources for sm_80 too."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["AUTONORM_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _LOWER], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and ("NvvmSupportError" in proc.stderr or "libNVVM cannot be found" in proc.stderr):
        pytest.skip("libNVVM (CUDA toolkit) not found: cannot lower Numba CUDA kernels here")
    assert proc.returncode == 0 and "lowered" in proc.stdout, proc.stderr[-3000:]


# --- GPU tier -----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("spec,rows,strided", grid.params())
def test_grid_gpu(spec, rows, strided):
    grid.check_case(BACKEND, spec, rows, strided, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("op", grid.OPS)
def test_backward_grid_and_prefetch_on_the_device(op):
    """The persistent backward on the device: at least a block an SM, at most the rule's, as numba-cuda reports
    the compiled kernel's registers and shared memory; with and without prefetch, over enough rows that every
    block walks several."""
    from autonorm.backends.base import import_generated

    spec = NormSpec(op, "bwd", "bfloat16", "bfloat16", 4096, bias=op == "layernorm", residual=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for config in (BACKEND.heuristic(spec), BACKEND.heuristic(spec).replace(prefetch=1)):
        launcher = nc._Launcher(torch.device("cuda", 0), spec, config)
        launcher.cap_to_resident(import_generated(BACKEND.render(spec, config), "numba_cuda")._kernel, spec, config)
        assert sms <= launcher.max_blocks <= sms * nc.persistent_blocks_per_sm(config)
        grid.check_case(BACKEND, spec, 3001, True, "cuda", config=config)


@needs_backend
def test_chunked_layernorm_variance_is_centered():
    """A large mean, a small spread and a ramp along the row (every thread and chunk its own mean):
    E[x^2] - E[x]^2 in fp32 would lose every digit; the Welford/Chan merge must not."""
    spec = NormSpec("layernorm", "fwd", "float32", "float32", 300, weight=False)
    kernel = BACKEND.compile(spec, CHUNKED, DEVICE)
    noise = 0.01 * torch.randn(3, 300, generator=torch.Generator().manual_seed(0))
    x = (300 + torch.linspace(0, 0.1, 300) + noise).to(DEVICE)
    _, _, mean, rstd = kernel(x, None, None, None, 1e-12, 0.0)
    assert torch.allclose(mean.double(), x.double().mean(1), rtol=1e-7)
    assert torch.allclose(rstd.double(), x.double().var(1, unbiased=False).rsqrt(), rtol=1e-3)
