"""The numba-cpu backend: shared grid, bit-exact fp16/bf16 handling, thread independence, compile cache."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("numba")

from grid import check_case, params, public_api_3d  # noqa: E402

from autonorm import verify  # noqa: E402
from autonorm.backends import get_backend  # noqa: E402
from autonorm.spec import NormSpec  # noqa: E402

BACKEND = "numba-cpu"


@pytest.fixture(scope="module")
def backend():
    b = get_backend(BACKEND)
    if not b.is_available():
        pytest.skip(b.unavailable_reason())
    return b


# N is a runtime argument of the kernels, so the grid compiles one kernel per
# (op, direction, dtypes, features), not per hidden size: the full grid is affordable.
@pytest.mark.parametrize("spec,rows,strided", params())
def test_grid(backend, spec, rows, strided):
    check_case(backend, spec, rows, strided, "cpu")


def test_non_default_configs(backend):
    """Every knob value renders and computes correctly (fastmath included: it keeps NaN/Inf semantics)."""
    from autonorm.backends.numba_cpu import SERIAL_ROWS_PER_TASK, NumbaCpuConfig

    for direction in ("fwd", "bwd"):
        spec = NormSpec("layernorm", direction, "bfloat16", "float32", 1128, bias=True, residual=True)
        # one thread: a forward's rows_per_task is fixed (its tasks only group rows), a backward's is not
        serial_rpt = SERIAL_ROWS_PER_TASK if direction == "fwd" else 4
        for config in (NumbaCpuConfig(rows_per_task=serial_rpt, vector_width=16, threads=1, fastmath=True),
                       NumbaCpuConfig(rows_per_task=128, vector_width=1, threads=0, fastmath=False)):
            check_case(backend, spec, 37, True, "cpu", config)


def test_config_domain_and_validity(backend):
    from autonorm.backends.numba_cpu import NumbaCpuConfig
    from autonorm.errors import InvalidConfigError

    spec = NormSpec("rmsnorm", "bwd", "float32", "float32", 4)
    assert NumbaCpuConfig.is_valid(spec, NumbaCpuConfig(2, 8, 0, False)) is not None  # dW partial per 2 rows
    assert NumbaCpuConfig.is_valid(spec, NumbaCpuConfig(8, 16, 1, True)) is None  # 16 lanes > N=4 still runs
    assert all(c.rows_per_task >= 4 for c in backend.space(spec))
    with pytest.raises(InvalidConfigError):
        NumbaCpuConfig.from_dict({"rows_per_task": 3, "vector_width": 8, "threads": 0, "fastmath": False})
    for s in (spec, NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 65537, bias=True)):
        assert NumbaCpuConfig.is_valid(s, backend.heuristic(s)) is None


def test_the_space_holds_no_two_configs_that_launch_the_same_work(backend, monkeypatch):
    """threads equal to the whole pool is threads=0's launch, and a forward on one thread ignores rows_per_task:
    the space keeps one of each such set (a search timing both only measures noise between them)."""
    import autonorm.backends.numba_cpu as numba_cpu
    from autonorm.backends.numba_cpu import SERIAL_ROWS_PER_TASK, NumbaCpuConfig

    assert SERIAL_ROWS_PER_TASK == max(NumbaCpuConfig.domain()["rows_per_task"])
    monkeypatch.setattr(numba_cpu, "_max_threads", lambda: 4)
    fwd, bwd = (NormSpec("rmsnorm", d, "float32", "float32", 1024) for d in ("fwd", "bwd"))
    for spec in (fwd, bwd):
        assert {c.threads for c in backend.space(spec)} == {0, 1, 2}
    serial = [c for c in backend.space(fwd) if c.threads == 1]
    assert serial and {c.rows_per_task for c in serial} == {SERIAL_ROWS_PER_TASK}
    assert len({c.rows_per_task for c in backend.space(bwd) if c.threads == 1}) > 1  # the dW partials differ
    assert "whole Numba thread pool" in NumbaCpuConfig.is_valid(fwd, NumbaCpuConfig(16, 1, 4, True))
    monkeypatch.setattr(numba_cpu, "_max_threads", lambda: 1)  # one thread: the parallel and serial variants
    assert {c.threads for c in backend.space(fwd)} == {0, 1}


# --- bit handling -------------------------------------------------------------------------

def _special_values(dtype):
    info = torch.finfo(dtype)
    vals = [0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan"), info.max, -info.max,
            info.tiny, -info.tiny, info.tiny / 4, info.tiny * 0.75, info.smallest_normal * 1.5, 3.0e-3]
    return torch.tensor(vals, dtype=torch.float32).to(dtype)


def _all_bit_patterns(dtype):
    return torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.uint16).view(dtype)


def _njit_narrow(from32):
    """An njit wrapper narrowing an fp32 array with the generated helper `from32` (uint16 bits out)."""
    import numba
    import numpy as np

    @numba.njit
    def down(f):
        out = np.empty(f.size, np.uint16)
        for i in range(f.size):
            out[i] = from32(f[i])
        return out
    return down


def _njit_roundtrip(source_module, dtype_name):
    """Compile small njit wrappers around the generated conversion helpers."""
    import numba
    import numpy as np

    if dtype_name == "bfloat16":
        to32, from32 = source_module.bf16_to_f32, source_module.f32_to_bf16
    else:
        to32, from32 = source_module.f16_to_f32, source_module.f32_to_f16

    @numba.njit
    def up(u):
        out = np.empty(u.size, np.float32)
        for i in range(u.size):
            out[i] = to32(u[i])
        return out

    return up, _njit_narrow(from32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bit_conversions_exhaustive(backend, dtype):
    """Every 16-bit pattern widens exactly; fp32 values narrow with torch's round-to-nearest-even."""
    import sys as _sys

    spec = NormSpec("rmsnorm", "fwd", {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype],
                    "float32", 8, weight=False)
    backend.compile(spec, backend.heuristic(spec))
    source = backend.render(spec, backend.heuristic(spec))
    module = _sys.modules[f"autonorm_numba_cpu_{source.sha256[:24]}"]
    up, down = _njit_roundtrip(module, spec.x_dtype)

    half = _all_bit_patterns(dtype)
    wide = torch.from_numpy(up(half.view(torch.uint16).numpy()))
    expected = half.float()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(wide), nan)
    assert torch.equal(wide[~nan].view(torch.int32), expected[~nan].view(torch.int32))  # -0.0 kept too

    # Narrowing: random fp32 bit patterns (all exponents, incl. subnormals, ties) + specials.
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(1 << 31), (1 << 31) - 1, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    f = torch.cat([bits.view(torch.float32), _special_values(dtype).float(),
                   expected[~nan] + 0.0, (expected[~nan].double() * (1 + 2.0 ** -12)).float()])
    got = torch.from_numpy(down(f.numpy())).view(dtype)
    want = f.to(dtype)
    fnan = torch.isnan(f)
    assert torch.equal(torch.isnan(got), fnan)
    assert torch.equal(got[~fnan].view(torch.uint16), want[~fnan].view(torch.uint16))
    if dtype is torch.bfloat16:  # the bf16 contract: a NaN stays a quiet NaN with its sign
        nan_bits = f[fnan].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        assert torch.equal(got[fnan].view(torch.uint16).to(torch.int64), (nan_bits >> 16) | 0x40)
        # the store of rows known NaN-free: the same rounding for every other value, Inf included
        finite = _njit_narrow(module.finite_f32_to_bf16)(f[~fnan].numpy())
        assert torch.equal(torch.from_numpy(finite), want[~fnan].view(torch.uint16))


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_specials_through_forward(backend, dtype_name):
    """NaN/Inf stay in their row; subnormal and tiny inputs normalize like torch does in fp32."""
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    spec = NormSpec("rmsnorm", "fwd", dtype_name, dtype_name, 16)
    kernel = backend.compile(spec, backend.heuristic(spec))
    x = torch.randn(4, 16).to(dtype)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    info = torch.finfo(dtype)
    x[2] = torch.tensor([info.tiny / 4, -info.tiny / 2] * 8).to(dtype)  # subnormal row
    x[3, 0] = -0.0
    w = torch.ones(16, dtype=dtype)
    y, _, _, rstd = kernel(x, w, None, None, 1e-30, 0.0)
    ref = torch.nn.functional.rms_norm(x.float(), (16,), eps=1e-30).to(dtype)
    # A NaN poisons its row; an Inf makes rstd 0, so its row is 0 except Inf * 0 = NaN (as in torch).
    assert torch.isnan(y[0]).all()
    assert torch.equal(torch.isnan(y[:2]), torch.isnan(ref[:2]))
    assert torch.equal(y[1].nan_to_num(), ref[1].nan_to_num())
    assert torch.equal(y[2].view(torch.uint16), ref[2].view(torch.uint16))  # subnormal inputs are exact
    assert torch.allclose(y[3].float(), ref[3].float(), rtol=1e-2, atol=0)
    assert torch.isfinite(rstd[2:]).all()


@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_bf16_forward_rounds_finite_rows_and_keeps_nan_bits(backend, op):
    """Rows with finite statistics and parameters take the store without a NaN test: their ties round to
    even and overflow gives a signed Inf; a NaN weight sends every row to the checked store."""
    feat = "weight+offset" if op == "rmsnorm" else "weight+bias"
    spec = NormSpec(op, "fwd", "bfloat16", "bfloat16", 4, **NormSpec.feature_kwargs(feat))
    kernel = backend.compile(spec, backend.heuristic(spec))
    big = torch.finfo(torch.bfloat16).max
    # rows whose x_hat is exact (eps 0); products and sums that are bf16 ties (1 + 2**-8 -> 1,
    # 1 + 3 * 2**-8 -> 1 + 2**-6) or overflow (big * 2, big + big)
    if op == "rmsnorm":  # the scale is w + offset, in fp32
        x = [[2.0, 2.0, -2.0, 2.0], [-0.5, 0.5, 0.5, -0.5], [0.0, 0.0, 0.0, -2.0]]
        w, b, offset = [2.0 ** -8, 3 * 2.0 ** -8, -3.0, big], None, 1.0
    else:  # mean 0, variance 1: x_hat = x
        x = [[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0], [1.0, 1.0, -1.0, -1.0]]
        w, b, offset = [1.0, 1.0, -1.0, big], [2.0 ** -8, 3 * 2.0 ** -8, 0.5, big], 0.0
    x, w = torch.tensor(x).to(torch.bfloat16), torch.tensor(w).to(torch.bfloat16)
    b = torch.tensor(b).to(torch.bfloat16) if b is not None else None
    y = kernel(x, w, b, None, 0.0, offset)[0]
    xf = x.float()
    x_hat = (xf - xf.mean(1, keepdim=True)) * (xf.var(1, unbiased=False, keepdim=True)).rsqrt() \
        if op == "layernorm" else xf * xf.pow(2).mean(1, keepdim=True).rsqrt()
    ref = x_hat * (w.float() + offset) + (b.float() if b is not None else 0.0)
    assert torch.equal(y.float(), ref.to(torch.bfloat16).float())  # a zero's sign is free (fastmath nsz)
    assert torch.isinf(y).any()  # the rows did overflow
    # a NaN weight: the checked store, whose NaN keeps its sign and is quiet
    w[1] = float("nan")
    y = kernel(x, w, b, None, 0.0, offset)[0]
    assert torch.isnan(y[:, 1]).all()
    assert ((y[:, 1].view(torch.uint16).to(torch.int64) & 0x7FC0) == 0x7FC0).all()


@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_bf16_backward_row_with_a_nan_keeps_the_nan_contract(backend, op):
    """A NaN in dy makes its row's dx NaN (quiet, from the checked store); the other rows, stored
    without the NaN test, match the fp64 reference."""
    from autonorm import reference

    spec = NormSpec(op, "bwd", "bfloat16", "bfloat16", 64, **NormSpec.feature_kwargs("weight"))
    kernel = backend.compile(spec, backend.heuristic(spec))
    inputs = verify.make_inputs(spec, 3, "cpu", seed=0)
    dy = inputs.dy.clone()
    dy[0, 5] = float("nan")
    dx = kernel(dy, inputs.x, inputs.weight, inputs.mean, inputs.rstd, None, 0.0)[0]
    assert torch.isnan(dx[0]).all()
    assert ((dx[0].view(torch.uint16).to(torch.int64) & 0x7FC0) == 0x7FC0).all()
    want = reference.backward(op, dy[1:], inputs.x[1:], inputs.weight, eps=verify.EPS)[0]
    assert reference.rel_l2(dx[1:], want) <= reference.TOLERANCES[torch.bfloat16]


# --- threads, determinism ------------------------------------------------------------------

def _recording_set_num_threads(monkeypatch):
    """Record every numba.set_num_threads call (the launcher's way to apply `threads`)."""
    import numba

    calls, real = [], numba.set_num_threads

    def record(n):
        calls.append(n)
        real(n)
    monkeypatch.setattr(numba, "set_num_threads", record)
    return calls


def _on_numbas_pool(monkeypatch):
    """Parallel kernels compiled after this run on Numba's pool, as where torch runs on no OpenMP."""
    from autonorm.backends.numba_cpu import _TorchTeam

    monkeypatch.setattr(_TorchTeam, "looked", True)
    monkeypatch.setattr(_TorchTeam, "parallel", None)


def _torch_team():
    """GOMP_parallel of torch's OpenMP runtime; skips where torch runs on another thread pool."""
    from autonorm.backends.numba_cpu import _TorchTeam

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch does not run on OpenMP here")
    entry = _TorchTeam.entry()
    assert entry is not None, "torch runs on OpenMP, but its GNU OpenMP runtime was not found"
    return entry


def test_the_team_is_the_openmp_runtime_torch_runs_on():
    """The runtime found is the one torch set its thread count in, not a second copy of libgomp (whose
    threads would compete with torch's as Numba's pool did)."""
    import ctypes

    from autonorm.backends.numba_cpu import _loaded_libgomp

    _torch_team()
    runtime = ctypes.CDLL(_loaded_libgomp())
    before = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            assert runtime.omp_get_max_threads() == n
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("spec", [
    NormSpec("layernorm", "fwd", "float32", "float32", 700, bias=True, residual=True),
    NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 520),
    NormSpec("layernorm", "bwd", "bfloat16", "float32", 1100, bias=True, residual=True),
    NormSpec("rmsnorm", "bwd", "float16", "float16", 600, weight=False),
], ids=lambda s: s.short())
def test_the_parallel_variant_runs_on_torchs_team_and_matches_the_serial_one_bit_for_bit(backend, spec,
                                                                                         monkeypatch):
    """Each GOMP_parallel call of a launch (a forward's rows; a backward's tasks, then its dW/dB column blocks
    where it has a weight) runs the serial kernel's own code on claimed tasks: without fastmath the values are
    the serial variant's, bit for bit, for rows that are not a multiple of rows_per_task and strided inputs.
    (With fastmath each compile may contract and reassociate its own way: a team worker loaded from Numba's
    cache gave one LayerNorm row's mean one ulp off the serial kernel's; the grid's tolerances cover that.)"""
    from autonorm.backends.numba_cpu import _TorchTeam

    entry = _torch_team()
    teams = []

    def recording(worker, words, team, flags):
        teams.append(team)
        entry(worker, words, team, flags)
    monkeypatch.setattr(_TorchTeam, "parallel", recording)
    kernel = backend.compile(spec, backend.heuristic(spec).replace(rows_per_task=4, fastmath=False))
    parallel, serial = kernel.variants
    inputs = verify.make_inputs(spec, 37, strided=True)
    got, want = parallel(*inputs.args(spec)), serial(*inputs.args(spec))
    assert teams == [torch.get_num_threads()] * (2 if spec.direction == "bwd" and spec.weight else 1)
    for a, b in zip(got, want):
        if b is not None:
            assert torch.equal(a, b)
    assert verify.check_kernel(spec, kernel, 37).ok


@pytest.mark.slow  # a determinism property over thread counts, not a kernel variant: ~27 s of compiles
@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_threads_do_not_change_results(backend, op, monkeypatch):
    """Each `threads` value gets its own launcher, which applies it, restores the caller's count
    afterwards. The parallel variant computes bitwise the same values on any number of threads (tasks
    are split by rows_per_task only); threads=1 runs the serial variant, which may differ from it in
    the last bit: fastmath lets the compiler order each variant's row sums its own way (Numba 0.61.2:
    2 of 301,000 bf16 dx elements one ulp apart; Numba 0.68.1: none)."""
    import numba

    pool = numba.config.NUMBA_NUM_THREADS
    if pool < 2:
        pytest.skip("needs a Numba thread pool of 2 or more")
    _on_numbas_pool(monkeypatch)
    spec = NormSpec(op, "bwd", "bfloat16", "float32", 1000, bias=op == "layernorm", residual=True)
    inputs = verify.make_inputs(spec, 301, strided=True)  # 301 x 1000: the parallel variant runs
    # threads equal to the whole pool is threads=0's launch, so the space leaves it out; on a pool larger than 2,
    # threads=2 is a part of it, which this test needs (the launch runs on 2 threads of the 2 or more here)
    import autonorm.backends.numba_cpu as numba_cpu

    monkeypatch.setattr(numba_cpu, "_max_threads", lambda: pool + 1)
    base = backend.heuristic(spec).replace(rows_per_task=8)
    kernels = {t: backend.compile(spec, base.replace(threads=t)) for t in (0, 1, 2)}
    assert len({id(k) for k in kernels.values()}) == 3, "configs differing in threads share a launcher"

    calls = _recording_set_num_threads(monkeypatch)
    numba.set_num_threads(1)  # the caller's count, which a threads=2 launch must give back
    calls.clear()
    results = {t: k(*inputs.args(spec)) for t, k in kernels.items()}
    assert calls == [2, 1], "threads=2 must run on 2 threads and then restore the caller's 1"
    assert numba.get_num_threads() == 1
    numba.set_num_threads(pool)
    for got, want in zip(results[2], results[0]):
        if want is not None:
            assert torch.equal(got, want)
    for got, want in zip(results[1], results[0]):
        if want is not None:
            torch.testing.assert_close(got, want)

    fspec = spec.with_direction("fwd")
    finputs = verify.make_inputs(fspec, 301, strided=True)
    serial = backend.heuristic(fspec).replace(threads=1, rows_per_task=numba_cpu.SERIAL_ROWS_PER_TASK)
    fkernels = [backend.compile(fspec, serial), backend.compile(fspec, backend.heuristic(fspec))]
    assert fkernels[0] is not fkernels[1]
    outs = [k(*finputs.args(fspec)) for k in fkernels]
    for a, b in zip(outs[0], outs[1]):
        if a is not None:
            torch.testing.assert_close(a, b)


def test_rows_per_task_reaches_the_launch(backend):
    """rows_per_task is a runtime argument, not in the source: two values must still run as two.

    The dW partial rows are per task, so 4 vs 256 rows per task sums in a different order:
    close, and (for these fixed inputs) not bitwise equal."""
    spec = NormSpec("rmsnorm", "bwd", "float32", "float32", 1000)
    inputs = verify.make_inputs(spec, 301)
    small, large = (backend.compile(spec, backend.heuristic(spec).replace(rows_per_task=r)) for r in (4, 256))
    assert small is not large
    dw_small, dw_large = small(*inputs.args(spec))[1], large(*inputs.args(spec))[1]
    torch.testing.assert_close(dw_small, dw_large, rtol=1e-4, atol=1e-4)
    assert not torch.equal(dw_small, dw_large)


# --- compile cache across processes --------------------------------------------------------

@pytest.mark.slow  # a second interpreter importing torch and numba (~8 s)
def test_second_process_reuses_compile_cache(backend, tmp_path):
    script = textwrap.dedent("""
        import json, sys
        from autonorm.backends import get_backend
        from autonorm.spec import NormSpec
        from autonorm import verify
        b = get_backend("numba-cpu")
        spec = NormSpec("rmsnorm", "fwd", "bfloat16", "float32", 64, offset=True)
        kernel = b.compile(spec, b.heuristic(spec))
        assert verify.check_kernel(spec, kernel, 9).ok
        # 9 rows: the serial variant runs; the team's worker (a cfunc) compiles when its module is imported
        hits = misses = 0
        for d in kernel.dispatchers:
            if hasattr(d, "stats"):
                hits += sum(d.stats.cache_hits.values())
                misses += sum(d.stats.cache_misses.values())
            else:
                hits += d.cache_hits
        print(json.dumps({"hits": hits, "misses": misses}))
    """)
    env = dict(os.environ, AUTONORM_CACHE_DIR=str(tmp_path))

    def run():
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run()
    assert first["misses"] >= 1 and first["hits"] == 0
    index_files = list((tmp_path / "numba_cpu").rglob("*.nbi"))
    assert index_files, "Numba wrote no cache index next to the generated source"
    second = run()
    assert second["hits"] >= 1 and second["misses"] == 0


# --- public API ----------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_public_api(use_backend, op):
    import autonorm

    use_backend(BACKEND)
    assert public_api_3d(op, torch.float32, "cpu") < 1e-5
    x = torch.randn(3, 40)
    fn = "rms_norm" if op == "rmsnorm" else "layer_norm"
    choice = autonorm.explain(fn, x, (40,), torch.ones(40))
    assert choice.backend == BACKEND


# --- unusual inputs through the public API -------------------------------------------------

@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_overlapping_rows_match_torch(use_backend, op):
    """Rows that overlap in memory (unfold: strides (1, 1)) give torch's values and gradients."""
    import torch.nn.functional as F

    import autonorm

    use_backend(BACKEND)
    base = torch.randn(70, requires_grad=True)
    weight = torch.randn(64, requires_grad=True)
    ours, theirs = (autonorm.rms_norm, F.rms_norm) if op == "rmsnorm" else (autonorm.layer_norm, F.layer_norm)
    grads = []
    for fn in (ours, theirs):
        x = base.unfold(0, 64, 1)  # 7 rows of 64, each starting one element after the previous
        y = fn(x, (64,), weight)
        assert y.shape == (7, 64)
        (y * torch.linspace(-1, 1, 64)).sum().backward()
        grads.append((y.detach(), base.grad.clone(), weight.grad.clone()))
        base.grad, weight.grad = None, None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_zero_eps_on_a_zero_row_matches_torch(use_backend, op):
    """eps=0 on a constant row divides by a zero variance: NaN as in torch, not an exception."""
    import torch.nn.functional as F

    import autonorm

    use_backend(BACKEND)
    x = torch.randn(3, 32)
    x[1] = 0.0 if op == "rmsnorm" else 2.0
    fn, ref = (autonorm.rms_norm, F.rms_norm) if op == "rmsnorm" else (autonorm.layer_norm, F.layer_norm)
    for rows in (x, x.repeat(1100, 1)):  # the serial and the parallel variant
        y, expected = fn(rows, (32,), eps=0.0), ref(rows, (32,), eps=0.0)
        torch.testing.assert_close(y, expected, equal_nan=True)
        assert torch.isnan(y[1]).all()


# --- processes and threads -----------------------------------------------------------------

def _norm_in_child(queue):
    import autonorm

    # As DataLoader workers do: torch's own GNU OpenMP pool, started by the parent, hangs in a
    # forked child (torch's limitation, whatever autonorm does).
    torch.set_num_threads(1)
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(1))  # 256K elements: parallel-sized
    y = autonorm.rms_norm(x, (1024,))
    queue.put(float((y - torch.nn.functional.rms_norm(x, (1024,))).abs().max()))


def test_forked_child_runs_after_the_parent_used_the_pool(use_backend):
    """A DataLoader-style forked worker calls autonorm after the parent started Numba's pool."""
    import multiprocessing

    import autonorm

    use_backend(BACKEND)
    x = torch.randn(256, 1024)
    torch.testing.assert_close(autonorm.rms_norm(x, (1024,)), torch.nn.functional.rms_norm(x, (1024,)))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_norm_in_child, args=(queue,))
    child.start()
    child.join(120)
    assert child.exitcode == 0, f"forked child died (exit code {child.exitcode})"
    assert queue.get(timeout=5) < 1e-5


def test_where_torch_has_no_openmp_team_the_parallel_variant_runs_on_numbas_pool(backend, monkeypatch):
    """torch built on its native thread pool (or any runtime not found): the prange kernel, checked like any."""
    _on_numbas_pool(monkeypatch)
    spec = NormSpec("layernorm", "bwd", "float32", "float32", 300, bias=True)
    kernel = backend.compile(spec, backend.heuristic(spec).replace(rows_per_task=4))
    assert kernel.dispatchers[0].py_func.__name__ == "kernel"  # the prange kernel, not a team worker
    assert verify.check_kernel(spec, kernel, 37).ok


def _team_kernel_in_child(queue, kernel, x, expected):
    # torch's thread count as the parent left it (2 or more): only the serial variant finishes here. No parallel
    # torch op at all (the tests' NaN-filled outputs included): torch's own hang in this child.
    from autonorm.backends.base import poison_outputs

    poison_outputs(False)
    y = kernel(x, None, None, None, 1e-6, 0.0)[0]
    queue.put(bool((y.numpy() == expected.numpy()).all()))


def test_a_forked_child_runs_serial_after_the_parent_launched_on_torchs_team(backend):
    """A parallel region in a forked child waits forever for the parent's team threads; a launch there must
    take the serial variant (same values, bit for bit)."""
    import multiprocessing

    _torch_team()
    if torch.get_num_threads() < 2:
        pytest.skip("needs torch on 2 or more threads")
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 1024, weight=False)
    kernel = backend.compile(spec, backend.heuristic(spec))
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(1))  # 256K elements: parallel-sized
    expected = kernel.variants[1](x, None, None, None, 1e-6, 0.0)[0]
    kernel(x, None, None, None, 1e-6, 0.0)  # the parent's team starts
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_team_kernel_in_child, args=(queue, kernel, x, expected))
    child.start()
    child.join(60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0, f"forked child hung or died (exit code {child.exitcode})"
    assert queue.get(timeout=5)


def test_tbb_is_looked_for_in_the_environment_prefix(tmp_path, monkeypatch):
    """pip's `tbb` wheel puts libtbb.so.12 in <prefix>/lib, off the loader's path: the backend loads it
    from there by full path; a missing or broken file there means `workqueue`, never a crash."""
    from autonorm.backends import numba_cpu

    if os.path.isfile(os.path.join(sys.prefix, "lib", "libtbb.so.12")):  # TBB in this environment
        assert numba_cpu._tbb_pool_loads()
        return
    tried = []

    def broken_library(path, mode=0):
        tried.append(path)
        raise OSError(f"{path}: invalid ELF header")
    monkeypatch.setattr(numba_cpu.ctypes, "CDLL", broken_library)
    monkeypatch.setattr(numba_cpu.sys, "prefix", str(tmp_path))
    assert not numba_cpu._tbb_pool_loads() and tried == []  # no library there: not even tried
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libtbb.so.12").write_bytes(b"not a library")
    assert not numba_cpu._tbb_pool_loads()
    assert tried == [str(tmp_path / "lib" / "libtbb.so.12")]


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["torch team", "workqueue", "default"])
def test_concurrent_calls_under_each_threading_layer(tmp_path, layer):
    """Threads calling parallel-sized norms at once: correct on torch's OpenMP team (each calling thread
    leads a team of its own), and no abort under Numba's `workqueue`."""
    script = textwrap.dedent("""
        import threading, numba, torch, autonorm
        import torch.nn.functional as F
        from autonorm.backends import numba_cpu
        if NUMBAS_POOL:
            numba_cpu._TorchTeam.looked = True  # as where torch runs on no OpenMP: Numba's pool
        x = torch.randn(64, 4096)
        expected = F.rms_norm(x, (4096,))
        errors = []
        def work():
            for _ in range(20):
                errors.append(float((autonorm.rms_norm(x, (4096,)) - expected).abs().max()))
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert len(errors) == 80 and max(errors) < 1e-5, max(errors)
        print(numba_cpu.parallel_pool())
    """).replace("NUMBAS_POOL", str(layer != "torch team"))
    env = dict(os.environ, AUTONORM_BACKEND=BACKEND)
    if layer == "torch team" and "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch does not run on OpenMP here")
    if layer in ("workqueue", "tbb"):
        env["NUMBA_THREADING_LAYER"] = layer
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    # left to autonorm, Numba's layer is never GNU OpenMP (it makes forked children abort or hang)
    expected = {"default": {"numba tbb", "numba workqueue"}, "workqueue": {"numba workqueue"},
                "torch team": {"torch OpenMP team"}}[layer]
    assert out.stdout.strip().splitlines()[-1] in expected
