"""GPU tier of the CuPy backend: the shared correctness grid and the public API on hardware.

CuPy compiles with NVRTC and launches only on a CUDA device, so everything here is
skipped without one (conftest's `gpu` marker); tests/test_cupy_nvcc.py is the CPU tier.
"""
import pytest
import torch
from grid import check_case, params, public_api_3d

from autonorm.backends import get_backend
from autonorm.spec import NormSpec

pytestmark = pytest.mark.gpu


def _cupy():
    backend = get_backend("cupy")
    reason = backend.unavailable_reason()
    if reason is not None:
        pytest.skip(f"cupy backend unavailable: {reason}")
    return backend


@pytest.mark.parametrize("spec,rows,strided", params())
def test_cupy_grid(spec, rows, strided):
    check_case(_cupy(), spec, rows, strided, "cuda")


# Every row cache, the scalar (misaligned) path and multi-warp rows on a few specs.
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("spec", [
    NormSpec("rmsnorm", "fwd", "bfloat16", "float32", 4096, residual=True, offset=True),
    NormSpec("rmsnorm", "bwd", "bfloat16", "float32", 4096, residual=True, offset=True),
    NormSpec("layernorm", "fwd", "float16", "float16", 1128, bias=True, residual=True),
    NormSpec("layernorm", "bwd", "float16", "float16", 1128, bias=True, residual=True),
], ids=lambda s: s.short())
@pytest.mark.parametrize("row_cache", ["registers", "shared", "none"])
def test_cupy_row_caches(spec, strided, row_cache):
    backend = _cupy()
    configs = [c for c in backend.space(spec) if c.row_cache == row_cache]
    assert configs, f"no {row_cache} config for {spec.short()}"
    # extremes of the block shape plus the largest vector width
    picks = {min(configs, key=lambda c: (c.threads, -c.rows)), max(configs, key=lambda c: (c.threads, c.vec)),
             max(configs, key=lambda c: (c.rows, c.vec))}
    for config in picks:
        check_case(backend, spec, 37, strided, "cuda", config=config)


def test_cupy_huge_row_and_many_rows():
    """N = 262144 (chunked) and a backward whose row count exceeds its persistent grid."""
    backend = _cupy()
    for direction in ("fwd", "bwd"):
        wide = NormSpec("layernorm", direction, "bfloat16", "float32", 262144, bias=True)
        check_case(backend, wide, 3, False, "cuda")
        check_case(backend, NormSpec("rmsnorm", direction, "float32", "float32", 256), 20000, False, "cuda")


@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("direction, hidden", [("fwd", 65536), ("bwd", 32768)])
def test_cupy_shared_row_cache_over_48_kib(op, direction, hidden):
    """The heuristic caches these rows in 128 KiB of shared memory a block (the launcher's opt-in);
    with a residual the forward reduces the cached h as rounded to bf16."""
    backend = _cupy()
    spec = NormSpec(op, direction, "bfloat16", "bfloat16", hidden, bias=op == "layernorm", residual=True)
    config = backend.heuristic(spec)
    assert config.row_cache == "shared"
    check_case(backend, spec, 5, False, "cuda", config=config)
    check_case(backend, spec, 5, True, "cuda", config=config)


def test_cupy_backward_is_deterministic():
    backend = _cupy()
    spec = NormSpec("layernorm", "bwd", "bfloat16", "float32", 760, bias=True)
    kernel = backend.compile(spec, backend.heuristic(spec), "cuda")
    from autonorm import verify
    inputs = verify.make_inputs(spec, 3000, "cuda")
    first = kernel(*inputs.args(spec))
    second = kernel(*inputs.args(spec))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cupy_public_api(op, dtype, use_backend):
    _cupy()
    use_backend("cupy")
    from autonorm.reference import tolerance
    assert public_api_3d(op, dtype, "cuda") <= tolerance(dtype)


@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("row_cache", ["cluster2", "cluster4", "cluster8"])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_cupy_cluster_split(op, row_cache, direction):
    """A row split over a thread-block cluster (sm_90+): each block caches its slice, the statistics (the
    backward's two sums) merge through distributed shared memory; with and without a residual, aligned and
    strided; the backward's dW/dB summed in registers where a thread's slice fits, else per row in global
    memory, over more rows than clusters (each cluster takes several)."""
    backend = _cupy()
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    for residual in (False, True):
        spec = NormSpec(op, direction, "bfloat16", "bfloat16", 65536, bias=op == "layernorm", residual=residual)
        config = backend.heuristic(spec).replace(row_cache=row_cache, threads=1024, rows=1, unroll=1, prefetch=0)
        if direction == "bwd":
            registers = config.replace(partials="registers")
            valid = backend.config_cls.is_valid(spec, registers) is None
            config = registers if valid else config.replace(partials="global")
        check_case(backend, spec, 7 if direction == "fwd" else 1031, residual, "cuda", config=config)


def test_cupy_cluster_config_is_refused_before_sm_90():
    backend = _cupy()
    if torch.cuda.get_device_capability()[0] >= 9:
        pytest.skip("the refusal is for GPUs without thread-block clusters")
    spec = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 65536)
    config = backend.heuristic(spec).replace(row_cache="cluster4", threads=1024, rows=1, unroll=1)
    with pytest.raises(ValueError, match="thread-block clusters"):
        backend.compile(spec, config, "cuda")


@pytest.mark.parametrize("spec", [
    NormSpec("rmsnorm", "bwd", "bfloat16", "float32", 4096, residual=True, offset=True),
    NormSpec("layernorm", "bwd", "float16", "float16", 1128, bias=True, residual=True),
    NormSpec("layernorm", "bwd", "float32", "float32", 7, weight=False),
], ids=lambda s: s.short())
@pytest.mark.parametrize("row_cache", ["registers", "shared"])
def test_cupy_backward_prefetch(spec, row_cache):
    """prefetch=1: the next row's loads one iteration ahead (registers: the weight read once; shared memory: the
    next row copied by cp.async into a second buffer, or through registers on the unaligned entry point). Row
    counts below, at and past the persistent grid (each block's last fetch falls past M), aligned and strided."""
    backend = _cupy()
    config = backend.heuristic(spec).replace(prefetch=1, row_cache=row_cache, unroll=1)
    assert backend.config_cls.is_valid(spec, config) is None, config.short()
    for rows, strided in ((1, False), (37, True), (20000, False)):
        check_case(backend, spec, rows, strided, "cuda", config=config)


@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_cupy_backward_partials_by_columns(op):
    """partials="columns": dx and dW/dB from the column-outer second pass, against the per-row read-modify-write,
    with more rows than the persistent grid holds."""
    backend = _cupy()
    spec = NormSpec(op, "bwd", "bfloat16", "float32", 65536, bias=op == "layernorm", residual=True)
    config = backend.heuristic(spec)
    assert config.partials == "columns"
    for rows, strided in ((3, True), (700, False)):
        check_case(backend, spec, rows, strided, "cuda", config=config)
        check_case(backend, spec, rows, strided, "cuda", config=config.replace(partials="global"))


@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("row_cache", ["shared", "cluster8"])
def test_cupy_backward_partials_in_shared_memory(op, row_cache):
    """partials="shared": each block sums its columns' dW/dB in shared memory beside its row cache (one block's
    whole row, or a cluster block's slice) and writes them once, over more rows than the persistent grid holds;
    aligned and strided, with the residual's gradient."""
    backend = _cupy()
    if row_cache.startswith("cluster") and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    hidden = 12288 if row_cache == "shared" else 131072
    spec = NormSpec(op, "bwd", "bfloat16", "bfloat16", hidden, bias=op == "layernorm", residual=True)
    config = backend.heuristic(spec).replace(row_cache=row_cache, threads=1024, rows=1, unroll=1, prefetch=0,
                                             partials="shared")
    assert backend.config_cls.is_valid(spec, config) is None, config.short()
    for rows, strided in ((3, True), (1031, False)):
        check_case(backend, spec, rows, strided, "cuda", config=config)
