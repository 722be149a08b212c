"""CPU tier of the CuPy backend: its CUDA sources compile with nvcc for sm_80 and sm_90.

CuPy itself compiles with NVRTC on the GPU machine; here nvcc stands in for it (same
front end, same headers). For each op and direction, >= 200 configs across specs
(extremes of every knob included) go into ONE translation unit per architecture:
each rendering in its own namespace with a unique kernel-name suffix, so one nvcc
call compiles them all (one call per config would blow the CI budget).
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from autonorm.audit import cupy_translation_unit as translation_unit
from autonorm.backends.cupy import CupyBackend, CupyConfig
from autonorm.spec import NormSpec

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA sources cannot be compile-checked")

ARCHS = ("sm_80", "sm_90")
HIDDEN = (1, 7, 4096, 65537, 262144)
SAMPLES = 200
BACKEND = CupyBackend()


def _specs(op: str, direction: str) -> list[NormSpec]:
    """Dtypes x sizes x features, every feature flag exercised somewhere."""
    specs = []
    extra = {"bias": True} if op == "layernorm" else {"offset": True}
    for n in HIDDEN:
        specs.append(NormSpec(op, direction, "float32", "float32", n))
        specs.append(NormSpec(op, direction, "bfloat16", "float32", n, residual=True, **extra))
        specs.append(NormSpec(op, direction, "float16", "float16", n, weight=False))
    specs.append(NormSpec(op, direction, "bfloat16", "bfloat16", 760, residual=True))
    specs.append(NormSpec(op, direction, "float16", "float32", 5120, **extra))
    if op == "rmsnorm":  # Hugging Face casting modes (a forward feature)
        specs.append(NormSpec(op, direction, "bfloat16", "bfloat16", 4096, casting_mode="llama"))
        specs.append(NormSpec(op, direction, "float16", "float32", 760, offset=True, casting_mode="none"))
    return specs


def _extremes(spec: NormSpec, space: list[CupyConfig]) -> list[CupyConfig]:
    """For every knob, a config of the space at its smallest and at its largest value
    (every value of a string knob), when the space has one."""
    picked = []
    for name, domain in CupyConfig.domain().items():
        values = domain if isinstance(domain[0], str) else (min(domain), max(domain))
        for value in values:
            match = next((c for c in space if getattr(c, name) == value), None)
            if match is not None:
                picked.append(match)
    return picked


def sample(op: str, direction: str, count: int = SAMPLES, seed: int = 0) -> list[tuple[NormSpec, CupyConfig]]:
    """Heuristics and extremes of every spec, then random configs until `count` distinct pairs. Drawn from every
    valid config (`CupyConfig.space`), not the tuner's menu: any of them may come from a database and must build."""
    rng = random.Random(seed)
    spaces = {spec: CupyConfig.space(spec) for spec in _specs(op, direction)}
    chosen: dict[tuple, None] = {}
    for spec, space in spaces.items():
        rng.shuffle(space)
        for config in [BACKEND.heuristic(spec), *_extremes(spec, space)]:
            chosen[(spec, config)] = None
    specs = list(spaces)
    while len(chosen) < count:
        spec = rng.choice(specs)
        chosen[(spec, rng.choice(spaces[spec]))] = None
    return list(chosen)


def _nvcc(path: str, arch: str) -> subprocess.CompletedProcess:
    return subprocess.run([NVCC, "-std=c++17", f"-arch={arch}", "-c", path, "-o", f"{path}.{arch}.o",
                           "-Werror", "all-warnings"], capture_output=True, text=True, check=False)


@needs_nvcc
@pytest.mark.slow  # nvcc on ~100 kernels for two architectures, 70-100 s a case (the saved-report gate stays)
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_sampled_configs_compile(op, direction, tmp_path):
    pairs = sample(op, direction)
    assert len(pairs) >= SAMPLES
    # The sample covers both ends of every knob (the point of including extremes).
    for name, domain in CupyConfig.domain().items():
        seen = {getattr(c, name) for _, c in pairs}
        if direction == "fwd" and name in ("partials_per_sm", "partials", "prefetch"):
            assert seen == {CupyConfig.domain()[name][0]}  # backward knobs: the forward takes the first value
            continue
        if name == "row_cache":  # every value, the cluster splits included
            assert seen == set(domain), sorted(seen)
            continue
        assert min(domain) in seen and max(domain) in seen, (name, sorted(seen))

    def compile_for(arch):
        # Thread-block clusters exist from sm_90: sm_80 gets every other config.
        cc = int(arch[len("sm_"):])
        path = str(tmp_path / f"{op}_{direction}_{arch}.cu")
        with open(path, "w") as f:
            f.write(translation_unit([(s, c) for s, c in pairs if c.min_compute_capability() <= cc]))
        return path, _nvcc(path, arch)

    with ThreadPoolExecutor(max_workers=2) as pool:  # the two architectures in parallel (2 CI cores)
        results = dict(zip(ARCHS, pool.map(compile_for, ARCHS)))
    for arch, (path, proc) in results.items():
        assert proc.returncode == 0, f"nvcc -arch={arch} failed on {path}:\n{proc.stderr[-6000:]}"
        assert os.path.getsize(f"{path}.{arch}.o") > 0


@pytest.mark.parametrize("spec", [
    NormSpec("rmsnorm", "fwd", "bfloat16", "float32", 4096, residual=True, offset=True),
    NormSpec("rmsnorm", "bwd", "float32", "float32", 7),
    NormSpec("layernorm", "fwd", "float16", "float16", 65537, bias=True),
    NormSpec("layernorm", "bwd", "bfloat16", "float32", 760, bias=True, residual=True),
], ids=lambda s: s.short())
def test_every_config_of_the_space_renders(spec):
    space = CupyConfig.space(spec)  # every valid config, not only the tuner's menu: a database may name any
    assert space and BACKEND.heuristic(spec) in space
    names = {f"an_{spec.direction}_vec", f"an_{spec.direction}_scalar"}
    for config in space:
        text = BACKEND.render(spec, config).text
        assert f"constexpr int THREADS = {config.threads};" in text, config.short()
        assert f"constexpr int VEC = {config.vec};" in text and f"constexpr int ROWS = {config.rows};" in text
        # The backward's register cache and the forward's shared cache state one block an SM as their
        # minimum (ptxas spilled without it).
        pinned = {"bwd": "registers", "fwd": "shared"}[spec.direction]
        cluster = config.row_cache.startswith("cluster")
        bounds = "THREADS, 1" if config.row_cache == pinned or cluster else "THREADS"
        attrs = ("__cluster_dims__(CLUSTER, 1, 1) " if cluster else "") + f"__launch_bounds__({bounds})"
        assert all(f"void {attrs} {name}(" in text for name in names), config.short()


def test_validity_rules():
    spec = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 4096)
    ok = CupyConfig(threads=256, vec=8, rows=1, unroll=1, row_cache="registers", partials_per_sm=1,
                    partials="registers")
    assert CupyConfig.is_valid(spec, ok) is None
    assert "16-byte" in CupyConfig.is_valid(NormSpec("rmsnorm", "fwd", "float32", "float32", 4096), ok)
    assert "divide" in CupyConfig.is_valid(NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 4100), ok)
    assert "registers" in CupyConfig.is_valid(NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 65536), ok)
    # The shared row cache holds the input dtype, up to Hopper's 227 KiB a block: 64K bf16 fit, 128K do not.
    assert CupyConfig.is_valid(NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 65536),
                               ok.replace(row_cache="shared")) is None
    assert "shared" in CupyConfig.is_valid(NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 131072),
                                           ok.replace(row_cache="shared"))
    assert "shared" in CupyConfig.is_valid(NormSpec("rmsnorm", "bwd", "float32", "float32", 32768),
                                           ok.replace(row_cache="shared", vec=4))
    assert CupyConfig.is_valid(NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 262144),
                               ok.replace(row_cache="none")) is None
    assert "backward" in CupyConfig.is_valid(spec, ok.replace(partials_per_sm=4))
    assert "partials" in CupyConfig.is_valid(spec, ok.replace(partials="global"))
    # dW/dB sums in registers: a quarter of the register cap a thread (16 elements at 1024 threads).
    bwd = NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 16384)
    shared = ok.replace(threads=1024, row_cache="shared")
    assert CupyConfig.is_valid(bwd, shared) is None  # 16 dW elements a thread
    assert "partials in registers need 32" in CupyConfig.is_valid(NormSpec("layernorm", "bwd", "bfloat16", "bfloat16",
                                                                            16384, bias=True), shared)
    assert CupyConfig.is_valid(bwd, shared.replace(partials="global")) is None
    assert "registers" in CupyConfig.is_valid(bwd, ok.replace(threads=1024, partials="global"))
    assert "partials" in CupyConfig.is_valid(NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 16384, weight=False),
                                             shared.replace(partials="global"))
    # Every spec size of the contract has a valid heuristic (the 'none' cache fits any N).
    for n in (1, 2, 3, 7, 123, 760, 4096, 65537, 262144, 1 << 20):
        for d in ("fwd", "bwd"):
            s = NormSpec("layernorm", d, "float16", "float32", n, bias=True)
            assert CupyConfig.is_valid(s, CupyConfig.heuristic(s)) is None


def test_shared_row_cache_is_sized_in_the_input_dtype():
    from autonorm.backends.cupy_config import SMEM_HEURISTIC, SMEM_WITHOUT_OPT_IN, dynamic_smem

    for direction, n, copies in (("fwd", 65536, 1), ("bwd", 32768, 2)):
        spec = NormSpec("layernorm", direction, "bfloat16", "bfloat16", n, bias=True)
        config = CupyConfig.heuristic(spec)
        # One read of x per row at 64K (forward) and 32K (backward: x and dy): 128 KiB of bf16, over the
        # 48 KiB a block gets without opting in, within A100's 163 KiB; 1024 threads, one block an SM.
        assert config.row_cache == "shared" and config.threads == 1024
        assert dynamic_smem(spec, config) == copies * n * 2
        assert SMEM_WITHOUT_OPT_IN < dynamic_smem(spec, config) <= SMEM_HEURISTIC
    text = BACKEND.render(spec, config).text
    assert "reinterpret_cast<T*>(an_smem)" in text and "float* cached" not in text
    # Past A100's maximum the heuristic re-reads from global memory instead.
    big = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 131072)
    assert CupyConfig.heuristic(big).row_cache == "none"


def test_unavailable_reason_names_the_problem():
    reason = BACKEND.unavailable_reason()
    import torch
    if not torch.cuda.is_available():
        assert reason is not None and ("cupy" in reason or "CUDA" in reason)


# --- the launcher, checked without a GPU: its argument tuples against the rendered signatures ---

def _signature(text: str, kernel: str) -> list[str]:
    """Parameter declarations of `kernel` in rendered source (expanding the params macro)."""
    import re
    text = re.sub(r"//[^\n]*", "", text)
    macros = {m.group(1): m.group(2) for m in re.finditer(r"#define (AN_\w+_PARAMS) ((?:[^\n]*\\\n)*[^\n]*)", text)}
    params = re.search(rf"\b{kernel}\(([^)]*)\)", text).group(1).strip()
    params = macros.get(params, params).replace("\\\n", " ")
    return [p.strip() for p in params.split(",")]


def _expected_type(decl: str):
    import numpy
    if "*" in decl or decl.startswith("long long"):
        return int  # CuPy sends a Python int as an 8-byte int64: a pointer or a long long
    assert decl.startswith("float "), decl
    return numpy.float32  # a Python float would go as 8-byte float64


class _Recorder:
    """Stands in for cupy's launch: records (kernel name, grid, block, args, shared memory)."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def ptr(t):
        from autonorm.backends.cupy import _CupyLaunch
        return _CupyLaunch.ptr(t)

    def __call__(self, fn, grid, block, args, smem=0):
        self.calls.append((fn, grid, block, args, smem))


@pytest.mark.parametrize("spec", [
    NormSpec("rmsnorm", "fwd", "bfloat16", "float32", 4096, residual=True, offset=True),
    NormSpec("layernorm", "fwd", "float16", "float16", 760, bias=True),
    NormSpec("rmsnorm", "bwd", "float32", "float32", 7, weight=False),
    NormSpec("layernorm", "bwd", "bfloat16", "float32", 4096, bias=True, residual=True),
    NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 131072, bias=True),  # partials="columns": a scratch vector
], ids=lambda s: s.short())
@pytest.mark.parametrize("strided", [False, True])
def test_launcher_arguments_match_kernel_signatures(spec, strided):
    pytest.importorskip("cupy")
    from autonorm import verify
    from autonorm.backends.cupy import CupyLauncher

    config = BACKEND.heuristic(spec)
    text = BACKEND.render(spec, config).text
    d = spec.direction
    launcher = CupyLauncher(spec, config, (f"an_{d}_vec", f"an_{d}_scalar"), 4 * config.partials_per_sm,
                         recorder := _Recorder())
    rows = 37
    inputs = verify.make_inputs(spec, rows, "cpu", strided=strided)
    outputs = getattr(launcher, "forward" if d == "fwd" else "backward")(*inputs.args(spec))
    assert recorder.calls
    for name, grid, block, args, smem in recorder.calls:
        decls = _signature(text, name)
        assert len(args) == len(decls), (name, decls, args)
        for decl, arg in zip(decls, args):
            assert type(arg) is _expected_type(decl), (name, decl, arg)
        assert block == (config.threads,)
        assert smem == 0 or config.row_cache == "shared"
    # Odd row strides (strided inputs) rule out packed accesses; aligned contiguous tensors use them.
    first = recorder.calls[0][0]
    assert first == f"an_{d}_{'scalar' if strided and config.vec > 1 else 'vec'}"
    if d == "fwd":
        assert recorder.calls[0][1] == (-(-rows // config.rows),)
        y, h, mean, rstd = outputs
        assert y.shape == (rows, spec.hidden) and rstd.shape == (rows,)
        assert (h is not None) == spec.residual and (mean is not None) == spec.is_layernorm
    else:
        assert recorder.calls[0][1][0] <= 4 * config.partials_per_sm  # persistent grid: at most max_blocks
        assert len(recorder.calls) == 1  # the dW/dB partials are summed by torch
        dx, dw, db = outputs
        assert dx.shape == (rows, spec.hidden) and (dw is not None) == spec.weight and (db is not None) == spec.bias


@pytest.mark.parametrize("cache", ["shared", "none"])
def test_backward_partials_in_registers_are_written_once(cache):
    """partials="registers": a thread sums its columns' dW/dB over its rows in registers and writes its partial
    row once after the row loop; "global" adds into it for every row."""
    spec = NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 8192, bias=True)
    config = CupyConfig(threads=1024, vec=8, rows=1, unroll=1, row_cache=cache, partials_per_sm=1, partials="registers")
    assert CupyConfig.is_valid(spec, config) is None
    on_chip = BACKEND.render(spec, config).text
    per_row = BACKEND.render(spec, config.replace(partials="global")).text
    assert "accw[k][e] += dv[e] * xh[e];" in on_chip and "pw[j * VEC + e] = accw[k][e];" in on_chip
    assert "pw[j * VEC + e] +=" not in on_chip and "pb[j * VEC + e] +=" not in on_chip
    assert "pw[j * VEC + e] += dv[e] * xh[e];" in per_row and "accw" not in per_row
    # Up to 16 dW/dB elements a thread: what fits the 64 registers of a 1024-thread block (the audit checks it).
    rms_16k = CupyConfig.heuristic(NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 16384))
    assert (rms_16k.row_cache, rms_16k.threads, rms_16k.partials) == ("shared", 1024, "registers")
    ln_16k = CupyConfig.heuristic(NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 16384, bias=True))
    assert (ln_16k.row_cache, ln_16k.partials) == ("shared", "global")


def test_backward_partials_by_columns():
    """partials="columns" (no row cache): the first pass keeps each row's sums for dx in a scratch vector; after a
    barrier, the second pass walks each column vector down the group's rows, writing dx and summing dW/dB in
    registers, and writes each partial once: no read-modify-write per row."""
    spec = NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 262144, bias=True, residual=True)
    config = CupyConfig.heuristic(spec)
    assert (config.row_cache, config.partials) == ("none", "columns")
    text = BACKEND.render(spec, config).text
    body = text[text.index("void an_bwd_body("):]
    assert "float* __restrict__ c12)" in body and "offset, c12);" in text
    assert "c12[row] = c1;" in body and "c12[M + row] = c2;" in body
    second = body[body.index("__syncthreads();\n    for (int j = lane; j < NV; j += TPR)"):]
    assert "an_row_sum" not in second and "pw[j * VEC + e] = aw[e];" in second and "pb[j * VEC + e] = ab[e];" in second
    assert "pw[j * VEC + e] +=" not in text and "pb[j * VEC + e] +=" not in text
    rms = NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 65536)
    rms_text = BACKEND.render(rms, CupyConfig.heuristic(rms)).text
    assert "c12[row] = c1;" in rms_text and "c12[M + row]" not in rms_text  # RMSNorm keeps c1 only
    # Without the column pass the kernel takes no scratch vector.
    assert "c12" not in BACKEND.render(spec, config.replace(partials="global")).text
    # The rules: rows read from global memory, and dW/dB to sum.
    mid = NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 16384, bias=True)
    assert CupyConfig.is_valid(mid, config.replace(threads=1024)) is None
    assert "row_cache=none" in CupyConfig.is_valid(mid, config.replace(row_cache="shared", threads=1024))
    assert "partials" in CupyConfig.is_valid(NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 262144,
                                                      weight=False), config)


def test_backward_prefetch():
    """prefetch=1 (backward, row in registers): the weight is read once before the row loop, and the next row's
    x, dy and statistics are loaded before this row's reductions; is_valid keeps it where it fits."""
    from autonorm.backends.cupy_config import max_prefetch_elems

    spec = NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 4096, bias=True, residual=True)
    config = CupyConfig.heuristic(spec)
    assert (config.row_cache, config.prefetch) == ("registers", 0)  # not the heuristic's choice until measured
    streaming = config.replace(prefetch=1)
    assert CupyConfig.is_valid(spec, streaming) is None
    text = BACKEND.render(spec, streaming).text
    body = text[text.index("void an_bwd_body("):]
    loop = body[body.index("for (long long row0"):]
    # The weight loads precede the loop; inside it, the next row's fetch precedes the first reduction.
    assert "an_load<ALIGNED>(w, lane + k * TPR, wo[k]);" in body[:body.index("for (long long row0")]
    assert "an_g<" not in loop and "(w," not in loop
    assert loop.index("an_fetch_row<ALIGNED>(") < loop.index("an_row_sum(")
    assert "an_fetch_row" not in BACKEND.render(spec, config).text
    # The rules: the backward with its row in registers (within the doubled register budget) or shared memory.
    assert "backward" in CupyConfig.is_valid(dataclasses.replace(spec, direction="fwd"), streaming)
    assert "registers or shared" in CupyConfig.is_valid(spec, config.replace(row_cache="none", prefetch=1))
    assert "registers or shared" in CupyConfig.is_valid(
        dataclasses.replace(spec, hidden=65536), config.replace(row_cache="cluster8", threads=1024, prefetch=1))
    wide = NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 8192, bias=True)
    assert 8192 // 1024 > max_prefetch_elems(1024)
    too_many = CupyConfig(threads=1024, vec=8, rows=1, unroll=1, row_cache="registers", partials_per_sm=1,
                          partials="registers", prefetch=1)
    assert CupyConfig.is_valid(wide, too_many.replace(prefetch=0)) is None
    assert "twice in registers" in CupyConfig.is_valid(wide, too_many)


def test_backward_prefetch_into_shared_memory():
    """prefetch=1 with the row in shared memory: two row buffers; inside the row loop each thread waits for its own
    cp.async copies of this row, then issues the next row's into the other buffer, before any reduction; the
    unaligned entry point loads through registers. is_valid keeps it to 4-, 8- and 16-byte copies."""
    from autonorm.backends.cupy_config import dynamic_smem

    spec = NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 16384, bias=True, residual=True)
    config = CupyConfig.heuristic(spec)
    assert (config.row_cache, config.partials, config.prefetch) == ("shared", "global", 0)
    streaming = config.replace(prefetch=1)
    assert CupyConfig.is_valid(spec, streaming) is None
    assert dynamic_smem(spec, streaming) == 2 * dynamic_smem(spec, config) == 2 * 2 * 16384 * 2
    text = BACKEND.render(spec, streaming).text
    assert "cp.async.cg.shared.global [%0], [%1], 16;" in text and "cp.async.wait_all;" in text
    body = text[text.index("void an_bwd_body("):]
    loop = body[body.index("for (long long row0"):]
    assert "cur ^= 1" in loop[:loop.index("\n")]  # the buffers swap every row
    wait, copy = loop.index("an_cp_async_wait();"), loop.index("an_copy_row(")
    assert wait < copy < loop.index("an_row_sum(")
    assert "an_copy_row(" in body[:body.index("for (long long row0")]  # the first row, before the loop
    assert "cp.async" not in BACKEND.render(spec, config).text
    # 2-byte vectors cannot be copied by cp.async; the doubled buffers must fit a block's shared memory.
    narrow = streaming.replace(vec=1, threads=1024)
    assert "cp.async moves 4, 8 or 16" in CupyConfig.is_valid(spec, narrow)
    wide = NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 32768, bias=True)
    assert CupyConfig.is_valid(wide, streaming.replace(prefetch=0)) is None
    assert "bytes a block" in CupyConfig.is_valid(wide, streaming)


def test_cluster_split_of_a_row():
    """row_cache="clusterC" (forward, sm_90+): C blocks of a thread-block cluster each cache a 1/C slice of the
    row in shared memory and merge the row's statistics through distributed shared memory, in rank order."""
    from autonorm import verify
    from autonorm.backends.cupy import CupyLauncher
    from autonorm.backends.cupy_config import cluster_size, dynamic_smem

    spec = NormSpec("layernorm", "fwd", "bfloat16", "bfloat16", 262144, bias=True, residual=True)
    config = CupyConfig(threads=1024, vec=8, rows=1, unroll=1, row_cache="cluster4", partials_per_sm=1,
                        partials="registers")
    assert CupyConfig.is_valid(spec, config) is None and cluster_size(config) == 4
    assert config.min_compute_capability() == 90 and config.replace(row_cache="shared").min_compute_capability() == 0
    assert dynamic_smem(spec, config) == 262144 // 4 * 2  # a quarter of the row a block, in bf16
    text = BACKEND.render(spec, config).text
    assert "constexpr int CLUSTER = 4;" in text and "__cluster_dims__(CLUSTER, 1, 1)" in text
    assert "mapa.shared::cluster.u32" in text and "barrier.cluster.wait.acquire.aligned" in text
    assert "for (unsigned r = 0; r < CLUSTER; ++r)" in text  # the merge in rank order: the same bits in every block
    # The rules: one row a cluster, whole vectors a slice, the slice within a block's shared memory.
    assert "rows=1" in CupyConfig.is_valid(spec, config.replace(rows=2))
    assert "slices" in CupyConfig.is_valid(NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 65544), config)
    assert "bytes a block" in CupyConfig.is_valid(NormSpec("rmsnorm", "fwd", "float32", "float32", 1 << 20),
                                                  config.replace(vec=4))
    # Every space holds cluster configs only where they are valid, and the heuristic never picks one (the
    # same heuristic serves GPUs without clusters).
    assert any(c.row_cache == "cluster8" for c in BACKEND.space(spec))
    assert all(CupyConfig.heuristic(NormSpec(op, "fwd", "bfloat16", "bfloat16", n)).min_compute_capability() == 0
               for op in ("rmsnorm", "layernorm") for n in (4096, 65536, 262144))
    # A cluster takes one row: the launch has C blocks a row.
    launcher = CupyLauncher(spec, config, ("an_fwd_vec", "an_fwd_scalar"), 1, recorder := _Recorder())
    launcher.forward(*verify.make_inputs(spec, 3, "cpu").args(spec))
    ((name, grid, block, _, smem),) = recorder.calls
    assert (name, grid, block, smem) == ("an_fwd_vec", (12,), (1024,), 262144 // 4 * 2)


def test_cluster_backward():
    """row_cache="clusterC" in the backward (sm_90+): each block caches x and dy of its slice, sums its slice's
    dW/dB over the cluster's rows, and the row's two sums merge through distributed shared memory, one cluster
    barrier a row (the published sums double-buffered by the row's parity); clusters loop over the rows."""
    from autonorm import verify
    from autonorm.backends.cupy import CupyLauncher
    from autonorm.backends.cupy_config import dynamic_smem

    spec = NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 65536, bias=True, residual=True)
    config = CupyConfig(threads=1024, vec=8, rows=1, unroll=1, row_cache="cluster8", partials_per_sm=1,
                        partials="registers")
    assert CupyConfig.is_valid(spec, config) is None and config.min_compute_capability() == 90
    assert dynamic_smem(spec, config) == 65536 // 8 * 2 * 2  # x and dy of an eighth of the row, in bf16
    text = BACKEND.render(spec, config).text
    assert "constexpr int CLUSTER = 8;" in text and "constexpr int ITEMS = 1;" in text  # 8 bf16 a thread
    assert "an_cluster_sums(s1, s2, part + 2 * parity);" in text and "parity ^= 1" in text
    assert "for (unsigned r = 0; r < CLUSTER; ++r)" in text  # rank order: the same bits in every block
    assert text.count("__cluster_dims__(CLUSTER, 1, 1) __launch_bounds__(THREADS, 1)") == 2
    # dW/dB in registers need a slice of at most 8 (LayerNorm: two sums) or 16 elements a thread.
    assert "partials in registers" in CupyConfig.is_valid(spec, config.replace(row_cache="cluster4"))
    assert CupyConfig.is_valid(spec, config.replace(row_cache="cluster4", partials="global")) is None
    assert "row_cache=none" in CupyConfig.is_valid(spec, config.replace(partials="columns"))
    assert "prefetch" in CupyConfig.is_valid(spec, config.replace(prefetch=1))
    # Persistent: at most the resident blocks, whole clusters, one partial row per cluster, every row covered.
    for rows, max_blocks, grid in ((7, 32, 32), (2, 32, 16), (7, 12, 8)):
        launcher = CupyLauncher(spec, config, ("an_bwd_vec", "an_bwd_scalar"), max_blocks, recorder := _Recorder())
        dx, dw, db = launcher.backward(*verify.make_inputs(spec, rows, "cpu").args(spec))
        ((name, launched, block, _, smem),) = recorder.calls
        assert (name, launched, block, smem) == ("an_bwd_vec", (grid,), (1024,), 65536 // 8 * 4)
        assert dx.shape == (rows, 65536) and dw.shape == db.shape == (65536,)


def test_backward_partials_in_shared_memory():
    """partials="shared": fp32 dW/dB sums beside a shared-memory row cache (or a cluster block's slice), 16-byte
    aligned after it, zeroed, added to for every row by the column's owner and copied to the partial row once;
    the heuristic's choice where the row and the sums fit A100's shared memory and registers do not."""
    from autonorm.backends.cupy_config import SMEM_MAX, dynamic_smem, partials_smem_offset

    rms = NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 20480)
    config = BACKEND.heuristic(rms)
    assert (config.row_cache, config.partials, config.threads) == ("shared", "shared", 1024)
    assert dynamic_smem(rms, config) == 20480 * 2 * 2 + 20480 * 4
    text = BACKEND.render(rms, config).text
    assert "constexpr int AN_PART_OFFSET = 81920;" in text
    assert "pw = reinterpret_cast<float*>(an_smem + AN_PART_OFFSET)" in text
    assert "gpw[j * VEC + e] = pw[j * VEC + e];" in text
    ln = NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 12288, bias=True, residual=True)
    config = BACKEND.heuristic(ln)
    assert (config.row_cache, config.partials) == ("shared", "shared")
    assert dynamic_smem(ln, config) == 12288 * 2 * 2 + 12288 * 4 * 2  # dW and dB
    assert "gpb[j * VEC + e] = pb[j * VEC + e];" in BACKEND.render(ln, config).text
    # The sums start at the next 16-byte boundary after the row cache.
    odd = dataclasses.replace(ln, hidden=1002)
    assert partials_smem_offset(odd, config.replace(vec=2)) == 4016
    # Where the row and the sums overflow A100's shared memory, the heuristic adds into global partials.
    assert BACKEND.heuristic(dataclasses.replace(ln, hidden=16384)).partials == "global"
    # A cluster block sums its slice: bf16 RMSNorm over 8 blocks fits 231K elements a row.
    big = dataclasses.replace(rms, hidden=229376)
    cluster = CupyConfig(threads=1024, vec=8, rows=1, unroll=1, row_cache="cluster8", partials_per_sm=1,
                         partials="shared")
    assert CupyConfig.is_valid(big, cluster) is None
    assert dynamic_smem(big, cluster) == 229376 // 8 * 8
    assert "partials in registers" in CupyConfig.is_valid(big, cluster.replace(partials="registers"))
    over = CupyConfig.is_valid(dataclasses.replace(big, hidden=262144), cluster)
    assert "dW/dB sums" in over and str(SMEM_MAX) in over
    # The rules: beside a shared-memory row only, and only for a backward with a weight.
    small = dataclasses.replace(rms, hidden=4096)
    in_registers = BACKEND.heuristic(small)
    assert in_registers.row_cache == "registers"
    assert "row cached in registers" in CupyConfig.is_valid(small, in_registers.replace(partials="shared"))
    assert "row_cache=shared or clusterC" in CupyConfig.is_valid(rms, config.replace(row_cache="none"))
    assert "backward with dW/dB" in CupyConfig.is_valid(dataclasses.replace(rms, weight=False), config)


def test_shared_row_cache_heuristics_keep_half_occupancy():
    """A shared-memory row leaves room for few blocks an SM: the heuristic's blocks are large enough that those
    A100 holds add up to at least 1024 threads (bf16 backward at 12K took 128-thread blocks, 3 an SM)."""
    from autonorm.backends.cupy_config import dynamic_smem
    from autonorm.hardware import ARCHS

    a100, seen = ARCHS["sm_80"], 0
    for op in ("rmsnorm", "layernorm"):
        for direction in ("fwd", "bwd"):
            for dtype in ("float32", "bfloat16"):
                for n in (3072, 6144, 8192, 10240, 12288, 16384, 20480, 32768, 65536):
                    spec = NormSpec(op, direction, dtype, dtype, n, bias=op == "layernorm")
                    config = BACKEND.heuristic(spec)
                    if config.row_cache != "shared":
                        continue
                    seen += 1
                    blocks = min(a100.smem // (dynamic_smem(spec, config) + a100.smem_reserved), 2048 // config.threads)
                    assert blocks * config.threads >= 1024, (spec.short(), config.short())
    assert seen >= 8


@needs_nvcc
def test_backward_partials_in_shared_memory_compile(tmp_path):
    """The shared-memory sums compile for both architectures (clusters for sm_90), with and without a bias."""
    pairs = {"sm_80": [(NormSpec("layernorm", "bwd", "bfloat16", "float32", 12288, bias=True, residual=True),
                        CupyConfig(threads=1024, vec=8, rows=1, unroll=2, row_cache="shared", partials_per_sm=2,
                                   partials="shared")),
                       (NormSpec("rmsnorm", "bwd", "float16", "float16", 1002, residual=True),
                        CupyConfig(threads=128, vec=2, rows=2, unroll=1, row_cache="shared", partials_per_sm=1,
                                   partials="shared"))],
             "sm_90": [(NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 229376, offset=True),
                        CupyConfig(threads=1024, vec=8, rows=1, unroll=1, row_cache="cluster8", partials_per_sm=1,
                                   partials="shared"))]}
    for arch, arch_pairs in pairs.items():
        for spec, config in arch_pairs:
            assert CupyConfig.is_valid(spec, config) is None, config.short()
        path = str(tmp_path / f"partials_{arch}.cu")
        with open(path, "w") as f:
            f.write(translation_unit(arch_pairs))
        proc = _nvcc(path, arch)
        assert proc.returncode == 0, f"nvcc -arch={arch} failed on {path}:\n{proc.stderr[-6000:]}"


@needs_nvcc
def test_cluster_configs_are_not_compiled_for_sm_80():
    from autonorm.audit import space_jobs

    spec = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 65536)
    jobs = space_jobs(spec, ["cupy"], ["sm_80", "sm_90"])
    clusters = {j.arch for j in jobs if j.config.row_cache.startswith("cluster")}
    assert clusters == {"sm_90"}


def test_no_config_below_sm_80_emits_cp_async():
    """cp.async exists from sm_80 on: a config whose source uses it says so, so a device or audit below sm_80 never
    offers it (the backward's prefetch into shared memory; before, its minimum stayed 0 and it failed to build)."""
    spec = NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 4096)
    older = [c for c in CupyConfig.space(spec) if c.min_compute_capability() < 80]
    assert any(c.prefetch for c in older)  # the register prefetch needs no cp.async and stays
    assert all("cp.async" not in BACKEND.render(spec, c).text for c in older if c.row_cache == "shared")
    streaming = CupyConfig.heuristic(NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 16384)).replace(prefetch=1)
    assert streaming.row_cache == "shared" and streaming.min_compute_capability() == 80


@pytest.mark.parametrize("partials", ["registers", "global"])
def test_backward_without_a_row_cache_rereads_the_row_last_vector_first(partials):
    """row_cache=none: the second pass re-reads x and dy from global memory starting with the vector the first
    pass read last (the likeliest still in L2); rows cached in shared memory keep the forward walk."""
    spec = NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 8192, bias=True)
    config = CupyConfig(threads=1024, vec=8, rows=1, unroll=1, row_cache="none", partials_per_sm=1,
                        partials=partials)
    assert CupyConfig.is_valid(spec, config) is None
    text = BACKEND.render(spec, config).text
    walk = {"registers": "for (int k = ITEMS - 1; k >= 0; --k)", "global": "for (int j = jlast; j >= 0; j -= TPR)"}
    assert walk[partials] in text and "an_grad_in<ALIGNED>(xr, dyr, j, mu, rs, xh, dv);" in text
    shared = BACKEND.render(spec, config.replace(row_cache="shared")).text
    assert "jlast" not in shared and "k = ITEMS - 1" not in shared


@needs_nvcc
def test_backward_without_a_row_cache_compiles(tmp_path):
    spec = NormSpec("rmsnorm", "bwd", "bfloat16", "float32", 8200, residual=True)
    pairs = [(spec, CupyConfig(threads=512, vec=8, rows=1, unroll=2, row_cache="none", partials_per_sm=1,
                               partials=partials)) for partials in ("registers", "global")]
    for s, c in pairs:
        assert CupyConfig.is_valid(s, c) is None, c.short()
    path = str(tmp_path / "none_sm_80.cu")
    with open(path, "w") as f:
        f.write(translation_unit(pairs))
    proc = _nvcc(path, "sm_80")
    assert proc.returncode == 0, proc.stderr[-6000:]
