"""The traffic counter (autonorm/traffic.py) and the traffic of the generated kernels against the ideal."""
import numpy as np
import pytest
import torch

from autonorm import traffic
from autonorm.backends import get_backend
from autonorm.spec import NormSpec

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _copy(src, dst, n, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + cols, tl.load(src + cols, mask=cols < n), mask=cols < n)


@triton.jit
def _copy_rows(src, dst, stride, BLOCK: tl.constexpr):
    rows, cols = tl.arange(0, 2)[:, None], tl.arange(0, BLOCK)[None, :]
    tl.store(dst + rows * stride + cols, tl.load(src + rows * stride + cols))


try:
    from numba import cuda
except ImportError:
    cuda = None


def _add_one(a, out):  # a module-level function: the simulator swaps `cuda` in its globals
    i = cuda.grid(1)
    if i < a.size:  # 16 threads, 6 of them touch nothing
        out[i] = a[i] + 1


@pytest.fixture
def interpreted():
    if torch.cuda.is_available():
        pytest.skip("counts the Triton interpreter's accesses (CPU only)")


def test_counter_counts_active_lanes_only(interpreted):
    src, dst = torch.arange(100, dtype=torch.float16), torch.zeros(100, dtype=torch.float16)
    with traffic.count("triton") as counted:
        _copy[(2,)](src, dst, 100, BLOCK=64)  # 128 lanes, 28 masked off
    assert torch.equal(src, dst)
    assert (counted.read, counted.written) == (200, 200)
    by_tensor = counted.by_tensor({"src": src, "dst": dst})
    assert by_tensor == {"src": 200, "dst": 200, "scratch": 0}


def test_a_tile_over_two_rows_is_one_access_per_row(interpreted):
    src, dst = torch.arange(24, dtype=torch.float32).reshape(2, 12), torch.zeros(2, 12)
    with traffic.count("triton") as counted:
        _copy_rows[(1,)](src, dst, 12, BLOCK=8)
    base = src.data_ptr()
    assert [(a - base, n) for a, n, store in counted.accesses if not store] == [(0, 32), (48, 32)]
    assert counted.reread_start(src) is None  # 8 of row 0's 12 elements, once


def test_counter_passes_any_cache_arguments_through(monkeypatch):
    """Triton releases differ in what follows (ptrs, mask) in the interpreter's masked load and store:
    3.6 passes a cache modifier and an eviction policy, 3.9 one cache policy. The counter passes them on."""
    from types import SimpleNamespace

    from triton.runtime.interpreter import InterpreterBuilder

    def load_3_6(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        return ("load", cache_modifier, eviction_policy, is_volatile)

    def store_3_6(self, ptrs, value, mask, cache_modifier, eviction_policy):
        return ("store", cache_modifier, eviction_policy)

    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", load_3_6)
    monkeypatch.setattr(InterpreterBuilder, "create_masked_store", store_3_6)
    fp32 = SimpleNamespace(primitive_bitwidth=32)
    ptrs = SimpleNamespace(data=np.array([4096, 4100, 4104]), get_element_ty=lambda: fp32)
    mask = SimpleNamespace(data=np.array([True, True, False]))
    with traffic.count("triton") as counted:
        builder = object.__new__(InterpreterBuilder)
        assert builder.create_masked_load(ptrs, mask, None, ".ca", "evict_last", False) == (
            "load", ".ca", "evict_last", False)
        assert builder.create_masked_store(ptrs, None, mask, ".cg", "evict_first") == ("store", ".cg", "evict_first")
    assert counted.accesses == [(4096, 8, False), (4096, 8, True)]


def test_counter_is_removed_after_the_block(interpreted):
    src, dst = torch.ones(8), torch.zeros(8)
    with traffic.count("triton") as counted:
        pass
    _copy[(1,)](src, dst, 8, BLOCK=8)
    assert counted.total == 0


def test_numba_counter_maps_accesses_to_the_callers_arrays():
    if cuda is None or torch.cuda.is_available():
        pytest.skip("counts the Numba CUDA simulator's accesses (CPU only)")
    add_one = cuda.jit(_add_one)
    a, out = np.arange(10, dtype=np.float32), np.zeros(10, dtype=np.float32)
    with traffic.count("numba") as counted:
        add_one[1, 16](a, out)
    assert np.array_equal(out, a + 1)
    by_tensor = counted.by_tensor({"a": torch.from_numpy(a), "out": torch.from_numpy(out)})
    assert by_tensor == {"a": 40, "out": 40, "scratch": 0}
    # each element at its own address (the order: the simulator's threads interleave)
    base = a.__array_interface__["data"][0]
    assert sorted(address - base for address, _, store in counted.accesses if not store) == list(range(0, 40, 4))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="traffic is counted for"):
        with traffic.count("cupy"):
            pass


# --- the kernels -------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_forward_on_chip_reads_and_writes_each_tensor_once(interpreted, op):
    backend = get_backend("triton")
    spec = NormSpec(op, "fwd", "bfloat16", "bfloat16", 4096, residual=True, bias=op == "layernorm")
    m = traffic.measure(backend, spec, backend.heuristic(spec), 3)
    assert m.row_ratio <= 1.05, m.per_tensor
    assert m.per_tensor["x"] == m.sizes["x"] and m.per_tensor["y"] == m.sizes["y"]


@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_chunked_forward_reads_the_inputs_once_and_rereads_h(interpreted, op):
    """Two passes: x and the residual read once, h written once and read back once."""
    from autonorm.backends.triton import TritonConfig

    backend = get_backend("triton")
    spec = NormSpec(op, "fwd", "bfloat16", "bfloat16", 4000, residual=True, bias=op == "layernorm")
    config = TritonConfig(BLOCK_N=1024, num_warps=8, ROWS_PER_PROGRAM=1, DW_PARTIALS=32)
    m = traffic.measure(backend, spec, config, 3)
    for name in ("x", "residual", "y"):
        assert m.per_tensor[name] == m.sizes[name], name
    assert m.per_tensor["h"] == 2 * m.sizes["h"]
    assert m.row_ratio <= 1.26


@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_chunked_backward_writes_its_partials_once(interpreted, op):
    """Partials on chip: each program writes its fp32 dW (and dB) row once, instead of a
    read-modify-write of it for every row."""
    from autonorm.backends.triton import TritonConfig

    backend = get_backend("triton")
    n, rows, programs = 2000, 64, 32  # two rows per program
    spec = NormSpec(op, "bwd", "bfloat16", "bfloat16", n, bias=op == "layernorm")
    params = 2 if op == "layernorm" else 1
    config = TritonConfig(BLOCK_N=1024, num_warps=8, ROWS_PER_PROGRAM=1, DW_PARTIALS=programs)
    per_row = traffic.measure(backend, spec, config, rows)
    on_chip = traffic.measure(backend, spec, config.replace(DW_COLUMN_OUTER=1), rows)
    assert per_row.scratch == 2 * rows * n * 4 * params  # a load and a store per row
    # one store per program and partial row, plus the per-row dx coefficients (8 bytes, read per chunk)
    assert on_chip.scratch <= programs * n * 4 * params + rows * 8 * 3
    # the row tensors are touched the same way: x and dy read twice (stats, then dx), dx written once
    for m in (per_row, on_chip):
        assert m.per_tensor["x"] == 2 * m.sizes["x"] and m.per_tensor["dx"] == m.sizes["dx"]


def test_numba_chunked_forward_reads_the_residual_once():
    """Chunked rows: pass 1 reads x and the residual, writes h and reduces (Welford, Chan); pass 2 reads h."""
    if cuda is None or torch.cuda.is_available():
        pytest.skip("counts the Numba CUDA simulator's accesses (CPU only)")
    from autonorm.backends.numba_cuda import NumbaCudaConfig

    backend = get_backend("numba")
    spec = NormSpec("layernorm", "fwd", "bfloat16", "float32", 300, residual=True, bias=True)
    config = NumbaCudaConfig(threads=32, items=2, rows=1, vec=2)  # 5 chunks of 64
    m = traffic.measure(backend, spec, config, 2)
    assert m.per_tensor["x"] == m.sizes["x"] and m.per_tensor["residual"] == m.sizes["residual"]
    assert m.per_tensor["h"] == 2 * m.sizes["h"]  # written, then read back once to normalize


@pytest.mark.parametrize("residual", [False, True])
def test_numba_chunked_forward_with_the_row_in_shared_memory_reads_it_once(residual):
    """row_cache=shared: pass 2 reads pass 1's copy of the row in shared memory, so x (and the residual) are
    read once and h is only written: every row tensor once, the ideal."""
    if cuda is None or torch.cuda.is_available():
        pytest.skip("counts the Numba CUDA simulator's accesses (CPU only)")
    from autonorm.backends.numba_cuda import NumbaCudaConfig

    backend = get_backend("numba")
    spec = NormSpec("layernorm", "fwd", "bfloat16", "float32", 300, residual=residual, bias=True)
    config = NumbaCudaConfig(threads=32, items=2, rows=1, vec=2, row_cache="shared")  # 5 chunks of 64
    m = traffic.measure(backend, spec, config, 2)
    for name in ("x", "y") + (("residual", "h") if residual else ()):
        assert m.per_tensor[name] == m.sizes[name], name
    assert m.row_ratio == 1.0


@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_numba_backward_keeps_its_partials_in_registers(op):
    """A row held in registers: each row slot reads the weight once and writes its fp32 dW (and dB) partial
    row once, instead of reading the weight twice and read-modify-writing the partials for every row;
    chunked rows do both per row, unless their partials are summed column-outer (written once)."""
    if cuda is None or torch.cuda.is_available():
        pytest.skip("counts the Numba CUDA simulator's accesses (CPU only)")
    from autonorm.backends.numba_cuda import NumbaCudaConfig

    backend = get_backend("numba")
    n, rows = 64, 6  # the simulator launches 2 blocks: 3 rows per row slot
    spec = NormSpec(op, "bwd", "bfloat16", "bfloat16", n, bias=op == "layernorm")
    params = 2 if op == "layernorm" else 1
    slots = 2  # blocks x 1 row slot
    in_registers = traffic.measure(backend, spec, NumbaCudaConfig(threads=32, items=2, rows=1, vec=2), rows)
    chunked = traffic.measure(backend, spec, NumbaCudaConfig(threads=32, items=1, rows=1, vec=1), rows)
    assert in_registers.scratch == slots * n * 4 * params  # one store per slot and element
    assert chunked.scratch == 2 * rows * n * 4 * params  # a load and a store per row and element
    assert in_registers.param_reads == slots
    assert chunked.param_reads == 2 * rows  # the reductions' pass, then the dx pass
    # Column-outer (chunked): each partial written once; the scratch adds each row's means (c12), stored once by
    # a row's thread 0 and read by the column pass for every word of the row (a warp broadcast on a GPU).
    columns = traffic.measure(backend, spec, NumbaCudaConfig(threads=32, items=1, rows=1, vec=1, partials="columns"),
                              rows)
    means = 2 if op == "layernorm" else 1
    assert columns.scratch == slots * n * 4 * params + rows * means * 4 + rows * n * means * 4
    assert columns.param_reads == rows + slots  # per row in the reductions' pass, once per slot after
    assert columns.per_tensor["dx"] == columns.sizes["dx"]
    for m in (in_registers, chunked):
        assert m.per_tensor["dx"] == m.sizes["dx"]
    # Fetching each slot's next row one iteration ahead moves the same bytes: no row past the last, none twice.
    prefetched = traffic.measure(backend, spec, NumbaCudaConfig(threads=32, items=2, rows=1, vec=2, prefetch=1), rows)
    assert prefetched.per_tensor == in_registers.per_tensor
    assert (prefetched.scratch, prefetched.param_reads) == (in_registers.scratch, in_registers.param_reads)


# --- the order of a chunked row's second pass ------------------------------------------------------
# Where the second pass over a row begins: starting with the chunk the first pass ended on (near 1.0) finds
# it in L2; starting at the row's first element (0.0) meets what the first pass touched longest ago.

@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_triton_chunked_second_pass_starts_with_the_last_chunk(interpreted, op):
    from autonorm.backends.triton import TritonConfig

    backend = get_backend("triton")
    config = TritonConfig(BLOCK_N=1024, num_warps=4, ROWS_PER_PROGRAM=1, DW_PARTIALS=32)  # 4 chunks of 4000
    fwd = NormSpec(op, "fwd", "bfloat16", "bfloat16", 4000, residual=True, bias=op == "layernorm")
    assert traffic.measure(backend, fwd, config, 2).reread_start["h"] >= 0.75  # h read back
    bwd = NormSpec(op, "bwd", "bfloat16", "bfloat16", 4000, bias=op == "layernorm")
    m = traffic.measure(backend, bwd, config, 2)
    assert m.reread_start["x"] >= 0.75 and m.reread_start["dy"] >= 0.75


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_numba_chunked_second_pass_starts_with_the_last_chunk(direction):
    if cuda is None or torch.cuda.is_available():
        pytest.skip("counts the Numba CUDA simulator's accesses (CPU only)")
    from autonorm.backends.numba_cuda import NumbaCudaConfig

    backend = get_backend("numba")
    spec = NormSpec("layernorm", direction, "bfloat16", "bfloat16", 512, bias=True)
    # 4 chunks of 32 words; every thread starts its second pass in the last chunk (each has a word there)
    m = traffic.measure(backend, spec, NumbaCudaConfig(threads=32, items=4, rows=1, vec=4), 2)
    assert m.reread_start["x"] >= 0.75
    if direction == "bwd":
        assert m.reread_start["dy"] >= 0.75


def test_reread_start_of_a_row_read_once_is_none(interpreted):
    backend = get_backend("triton")
    spec = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 1024)
    m = traffic.measure(backend, spec, backend.heuristic(spec), 2)
    assert m.reread_start["x"] is None and m.reread_start["y"] is None


def test_reread_start_counts_a_write_then_a_read_back():
    row = torch.zeros(2, 8, dtype=torch.float32)
    counted = traffic.Traffic()
    base = row.data_ptr()
    for i in range(8):  # written front to back, then read back from the 7th element
        counted.record(base + 4 * i, 4, True)
    counted.record(base + 4 * 8, 4, False)  # the next row: not the first row's
    counted.record(base + 4 * 6, 8, False)
    assert counted.reread_start(row) == 0.75
