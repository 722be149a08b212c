"""CPU tier of the CuPy backend: its CUDA C++ kernels run on the CPU (autonorm/cuda_host.py) and are checked
against the fp64 reference, as the Triton interpreter and the Numba simulator check the other backends.

Default run: the heuristic config of every standard-grid spec and one config of every variant group
(row_cache x partials x prefetch, clusters included), all built by one g++ call. The full sweep (every
group on odd, tiny, chunk-boundary and large rows, every dtype and feature) is marked slow. The self-tests
of the harness (deliberately broken kernels) are in test_cupy_host_selftest.py.
"""
from __future__ import annotations

import itertools
import random
import shutil

import pytest
import torch

from autonorm import cuda_host, cuda_host_build, grids, verify
from autonorm.backends.base import poisoned_outputs
from autonorm.backends.cupy import CupyBackend, CupyConfig, cluster_size
from autonorm.spec import NormSpec

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ builds the CUDA C++ for the CPU")

BACKEND = CupyBackend()
STANDARD = grids.get("standard").specs()


def group(spec: NormSpec, config: CupyConfig) -> tuple:
    """A config's variant group: what changes the kernel's structure (not its sizes)."""
    return (spec.direction, config.row_cache, config.partials, config.prefetch)


def group_id(g: tuple) -> str:
    direction, cache, partials, prefetch = g
    return f"{direction}-{cache}" + (f"-{partials}" if direction == "bwd" else "") + ("-prefetch" if prefetch else "")


def _group_specs(direction: str, hidden: int, dtypes: tuple) -> list[NormSpec]:
    """The specs the groups are spread over: both ops, every feature, with and without residual, fp32 weights
    under 16-bit inputs, cycling through `dtypes`."""
    dt = [dtypes[i % len(dtypes)] for i in range(4)]
    return [NormSpec("layernorm", direction, dt[0], dt[0], hidden, bias=True, residual=True),
            NormSpec("rmsnorm", direction, dt[1], "float32", hidden, offset=True, residual=True),
            NormSpec("layernorm", direction, dt[2], dt[2], hidden, weight=False),
            NormSpec("rmsnorm", direction, dt[3], dt[3], hidden, offset=True)]


def _candidates(spec: NormSpec) -> list[CupyConfig]:
    """Valid configs of a few geometries (the whole space takes seconds to enumerate)."""
    out = []
    for cache in ("registers", "shared", "none", "cluster2", "cluster4", "cluster8"):
        for partials in ("registers", "shared", "global", "columns"):
            for prefetch in (0, 1):
                for threads, vec, rows, unroll in itertools.product((64, 128, 256, 1024), (8, 4, 2, 1), (1, 2, 4),
                                                                    (1, 2)):
                    config = CupyConfig(threads=threads, vec=vec, rows=rows, unroll=unroll, row_cache=cache,
                                        partials_per_sm=1, partials=partials, prefetch=prefetch)
                    if CupyConfig.is_valid(spec, config) is None:
                        out.append(config)
    return out


def variant_cases(hidden=(4096,), dtypes=("bfloat16", "float16", "float32"), per_group=1) -> list:
    """(spec, config) pairs: for each variant group, `per_group` specs taken in turn from _group_specs, each
    with a config of the group drawn at random (fixed seed) among those whose rows span several warps where
    the group has any."""
    rng = random.Random(0)
    found: dict[tuple, dict] = {}
    for direction in ("fwd", "bwd"):
        for n in hidden:
            for spec in _group_specs(direction, n, dtypes):
                for config in _candidates(spec):
                    found.setdefault(group(spec, config), {}).setdefault(spec, []).append(config)
    out = []
    for i, g in enumerate(sorted(found)):
        specs = list(found[g])
        for k in range(min(per_group, len(specs))):
            spec = specs[(i + k) % len(specs)]
            configs = found[g][spec]
            out.append((spec, rng.choice([c for c in configs if c.threads // c.rows > 32] or configs)))
    return out


def _check(kernel, spec, config, rows, strided=False, seeds=(0,)):
    with poisoned_outputs(), cuda_host.schedules(*seeds):  # an element a kernel forgets to write is NaN
        result = verify.check_kernel(spec, kernel, rows, strided=strided)
    assert result.ok, f"{spec.short()} {config.short()} rows={rows}: errors {result.errors} > {result.tolerance}"


STANDARD_PAIRS = [(s, CupyConfig.heuristic(s)) for s in STANDARD]
GROUP_PAIRS = variant_cases()


@pytest.fixture(scope="module")
def default_kernels():
    """Every kernel of the default run, from one g++ call (cached on disk by source)."""
    pairs = STANDARD_PAIRS + GROUP_PAIRS
    return dict(zip(pairs, cuda_host.compile_kernels(pairs)))


@pytest.mark.parametrize("spec", STANDARD, ids=lambda s: s.short())
def test_standard_grid_heuristic(default_kernels, spec):
    """The config the dispatcher's heuristic rung runs, on 5 rows (2 past 10K elements): with the persistent
    backward's H100 grid, every row count here leaves blocks or row groups without a row."""
    pair = (spec, CupyConfig.heuristic(spec))
    _check(default_kernels[pair], *pair, rows=2 if spec.hidden > 10_000 else 5)


@pytest.mark.parametrize("spec,config", GROUP_PAIRS, ids=[group_id(group(*p)) for p in GROUP_PAIRS])
def test_variant_group(default_kernels, spec, config):
    """One config of each variant group on 7 strided rows (the scalar entry point where VEC > 1: an odd
    row stride rules out packed accesses) and on 5 contiguous ones (the vector entry point), each in two
    schedules that must give the same bits."""
    kernel = default_kernels[(spec, config)]
    _check(kernel, spec, config, rows=7, strided=True, seeds=(0, 1))
    _check(kernel, spec, config, rows=5, seeds=(0, 2))


def test_standard_grid_plans_with_the_compilers_numbers(default_kernels):
    """The launch rules and the persistent backward's grid use each kernel's registers and static shared memory
    on sm_90 as the audit's saved report has them (stale: `autonorm audit --grid standard --save
    docs/benchmarks/hardware-fit.json`); the arrays the harness allocates hold at least what nvcc does."""
    found = cuda_host_build.profiles(STANDARD_PAIRS, "sm_90")
    missing = [s.short() for (s, _), p in zip(STANDARD_PAIRS, found) if p is None]
    assert not missing, f"{len(missing)} kernels are not in the saved report, first {missing[0]}"
    for pair, p in zip(STANDARD_PAIRS, found):
        fn = default_kernels[pair].__self__.vec_fn
        assert (fn.num_regs, fn.shared_size_bytes) == (p.registers, p.smem_static)
        assert cuda_host_build.static_bytes(fn.lib, int(fn.name.rsplit("_", 1)[1])) >= p.smem_static


def test_variant_groups_cover_every_structure():
    """Every row cache, partials strategy, prefetch and cluster size the spaces hold is in the default run."""
    groups = {group(*p) for p in GROUP_PAIRS}
    assert {g[1] for g in groups} == {"registers", "shared", "none", "cluster2", "cluster4", "cluster8"}
    assert {g[2] for g in groups if g[0] == "bwd"} == {"registers", "shared", "global", "columns"}
    assert {(g[0], g[1]) for g in groups if g[3]} == {("bwd", "registers"), ("bwd", "shared")}
    assert len(groups) >= 20


def test_layernorm_forward_merges_counts(default_kernels):
    """Chan's merge of a row's statistics across threads keeps the merged count: a LayerNorm forward whose row
    spans several warps and is not cached in registers (mean 0 and rstd 1/sqrt(eps) when the count stayed)."""
    pairs = [p for p in STANDARD_PAIRS + GROUP_PAIRS
             if p[0].is_layernorm and p[0].direction == "fwd" and p[1].row_cache != "registers"]
    assert {p[1].row_cache for p in pairs} >= {"shared", "none", "cluster2"}
    for spec, config in pairs[:4]:
        _check(default_kernels[(spec, config)], spec, config, rows=3)


def test_shared_memory_opt_in_counts_static_memory(default_kernels):
    """A launch may use 48 KiB of static + dynamic shared memory without the opt-in: the heuristic RMSNorm
    backward at N=12288 in 16 bits asks for exactly 48 KiB of dynamic memory beside its static reduction slots."""
    spec = NormSpec("rmsnorm", "bwd", "float16", "float16", 12288)
    kernel = default_kernels[(spec, CupyConfig.heuristic(spec))]
    fn = kernel.__self__.vec_fn
    assert fn.shared_size_bytes > 0 and fn.max_dynamic_shared_size_bytes == 49152
    _check(kernel, spec, CupyConfig.heuristic(spec), rows=3)


def _harness_outputs(spec, x):
    """The kernel's outputs in harness memory (forward_outputs / backward_outputs allocate them in torch's)."""
    m, n = x.shape
    if spec.direction == "bwd":  # no weight: no dW partials, which would span every row
        return cuda_host.host_empty((m, n), x.dtype), None, None
    stats = (cuda_host.host_empty((m,), torch.float32) if spec.is_layernorm else None,
             cuda_host.host_empty((m,), torch.float32))
    return (cuda_host.host_empty((m, n), x.dtype), None, *stats)


@pytest.mark.parametrize("spec", [NormSpec("layernorm", "fwd", "bfloat16", "bfloat16", 65536, bias=True),
                                  NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 65536, weight=False)],
                         ids=lambda s: s.short())
def test_rows_times_hidden_over_2_31(monkeypatch, spec):
    """Row offsets in 64 bits: M x N > 2^31 elements, running only the last blocks of the grid on the last rows
    (the tensors live in harness memory, materialized only where the kernel touches them). The backward's
    persistent grid gets a block a row from a device of M SMs, so that its last blocks take only the last rows."""
    from autonorm.backends import cupy as cupy_backend

    n, m, last = spec.hidden, (1 << 31) // spec.hidden + 3, 2
    monkeypatch.setattr(cupy_backend, f"{'forward' if spec.direction == 'fwd' else 'backward'}_outputs",
                        _harness_outputs)
    config = CupyConfig.heuristic(spec)
    assert config.rows == 1 and cluster_size(config) == 1  # a block a row: the last blocks take the last rows
    kernel = cuda_host.compile_kernel(spec, config, cuda_host.HostDevice(sm_count=m, first_block=m - last))
    small = verify.make_inputs(spec, last)
    x = cuda_host.host_empty((m, n), torch.bfloat16)
    x[-last:] = small.x
    if spec.direction == "fwd":
        y, _, mean, rstd = kernel(x, small.weight, small.bias, None, small.eps, small.offset)
        got = verify.compare(spec, small, (y[-last:], None, mean[-last:], rstd[-last:]))
    else:
        dy, rstd = cuda_host.host_empty((m, n), torch.bfloat16), cuda_host.host_empty((m,), torch.float32)
        dy[-last:], rstd[-last:] = small.dy, small.rstd
        dx, _, _ = kernel(dy, x, None, None, rstd, None, small.offset)
        got = verify.compare(spec, small, (dx[-last:], None, None))
    assert got.ok, got.errors


def test_check_command_runs_cupy_on_the_cpu(capsys):
    """`autonorm check --cupy-on-cpu`: a contributor without a GPU runs the CuPy kernels as the tests do."""
    from autonorm import cli

    rc = cli.main(["check", "--cupy-on-cpu", "--hidden", "7", "--dtypes", "bf16", "--rows", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "(cupy: its CUDA C++ on the CPU)" in out and "4 passed, 0 failed" in out
    assert out.count("cupy ") == 4 and "skipped" not in out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("hidden", [1, 7, 1023, 1025, 12288, 65536])
def test_variant_groups_full_sweep(dtype, hidden):
    """Every variant group on every feature set, both ops, three dtypes: N = 1, odd N, a 1024-element chunk
    +- 1 (the scalar loops' tails), 12288 and 65536; rows that do not divide the grid, contiguous and strided."""
    pairs = variant_cases(hidden=(hidden,), dtypes=(dtype,), per_group=4)
    for (spec, config), kernel in zip(pairs, cuda_host.compile_kernels(pairs)):
        rows = 3 if hidden > 10_000 else 7
        _check(kernel, spec, config, rows=rows, strided=True)
        _check(kernel, spec, config, rows=rows - 2)
