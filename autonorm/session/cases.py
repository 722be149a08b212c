"""What the session runs: the smoke cases, the bench cases and the kernel variants, most valuable first.
A dry run keeps every case, at a small size, under the name of its GPU size."""
from __future__ import annotations

from dataclasses import dataclass

from ..spec import NormSpec


@dataclass(frozen=True)
class SmokeCase:
    name: str
    spec: NormSpec
    rows: int
    strided: bool = False


def smoke_cases(dry_run: bool) -> list[SmokeCase]:
    """The smoke list, most valuable first. The dry run keeps every case at a small size."""
    out = []

    def add(op, direction, x, w, n, rows, strided=False, **features):
        # Named by the GPU size in the dry run too, where it runs small (odd sizes stay odd).
        name = f"{op}.{direction} {x}" + (f" w={w}" if w != x else "") + f" {rows}x{n}"
        name += "".join(f" +{f}" for f, on in features.items() if on) + (" strided" if strided else "")
        if dry_run:
            n, rows = min(n, 32) + n % 2, min(rows, 2)
        out.append(SmokeCase(name, NormSpec(op, direction, x, w, n, **features), rows, strided))

    both = [(op, d) for op in ("rmsnorm", "layernorm") for d in ("fwd", "bwd")]
    for op, d in both:  # the usual LLM case
        add(op, d, "bfloat16", "bfloat16", 4096, 4096)
    for op, d in both:
        add(op, d, "float32", "float32", 5120, 2048)
    for op, d in both:  # an N that is no power of two and not a multiple of 16 bytes
        add(op, d, "float16", "float16", 1128, 4096)
    for op, d in both:  # mixed precision, strided rows, every feature of the op
        add(op, d, "bfloat16", "float32", 4096, 1024, strided=True, residual=True,
            **({"offset": True} if op == "rmsnorm" else {"bias": True}))
    for n, rows in ((65537, 64), (262144, 16)):  # rows beyond any on-chip tile: the chunked loops
        for op, d in both:
            add(op, d, "bfloat16", "bfloat16", n, rows)
    for op in ("rmsnorm", "layernorm"):  # backward with rows far above the number of programs
        add(op, "bwd", "bfloat16", "bfloat16", 256, 20000)
    # Heuristics a static check of the compiled kernels (registers, spills) predicts to fail on sm_90.
    for op in ("rmsnorm", "layernorm"):
        add(op, "fwd", "bfloat16", "bfloat16", 65536, 256)
        add(op, "bwd", "bfloat16", "bfloat16", 16384, 1024)
    add("rmsnorm", "bwd", "float32", "float32", 4096, 2048)
    add("layernorm", "bwd", "float32", "float32", 8192, 1024)
    # rows * N > 2^31: offsets need 64 bits; a fifth of the rows lie past 2^31 elements.
    for d in ("fwd", "bwd"):
        add("rmsnorm", d, "bfloat16", "bfloat16", 4096, (1 << 19) + (1 << 17))
    return out


def bench_cases(dry_run: bool) -> list[tuple[NormSpec, int]]:
    """(spec, rows): bf16 RMS/LN fwd/bwd, M*N = 2^27, N outermost so that a cut run has every op at small N."""
    hidden, elements = ((32,), 1 << 7) if dry_run else ((4096, 8192, 16384, 65536, 262144), 1 << 27)
    return [(NormSpec(op, d, "bfloat16", "bfloat16", n), elements // n)
            for n in hidden for op in ("rmsnorm", "layernorm") for d in ("fwd", "bwd")]


@dataclass(frozen=True)
class VariantCase:
    name: str
    backend: str
    spec: NormSpec
    rows: int
    changes: tuple  # (knob, value) pairs applied to the backend's heuristic


def variant_cases(dry_run: bool) -> list[VariantCase]:
    """Kernel variants the heuristic does not choose (or chose without a GPU), each to be timed against it."""
    out = []

    def add(name, backend, op, direction, n, m, dry=None, **changes):
        # Named by the GPU size (m rows of n); the dry run runs every case at 2 x 64 (interpreter, simulator),
        # with `dry` changes too where the variant would otherwise be the heuristic's kernel at that size.
        name = f"{op} {direction} {m}x{n} {backend} {name}"
        if dry_run:
            n, m = 64, 2
            changes.update(dry or {})
        spec = NormSpec(op, direction, "bfloat16", "bfloat16", n, bias=op == "layernorm", residual=direction == "fwd")
        out.append(VariantCase(name, backend, spec, m, tuple(changes.items())))

    for op in ("rmsnorm", "layernorm"):
        # The row on chip across a cluster, against the heuristic's two passes (256K) or its one block (64K).
        for n, m, sizes in ((262144, 512, (4, 8)), (65536, 2048, (2, 4, 8))):
            for c in sizes:
                add(f"cluster{c}", "cupy", op, "fwd", n, m, row_cache=f"cluster{c}", threads=1024, rows=1, unroll=1)
        # The backward's row on chip across a cluster (dW/dB in registers: a slice of <= 8 or 16 elements a
        # thread), against the heuristic's two passes over global memory with column-outer partials.
        add("cluster8", "cupy", op, "bwd", 65536, 2048, row_cache="cluster8", threads=1024, rows=1, unroll=1,
            partials="registers")
        # Past the registers' dW/dB budget (C x 16K RMS, C x 8K LN with a bias): the sums in shared memory beside
        # the slice, against the heuristic's two passes over global memory with column-outer partials.
        add("cluster8 shared partials", "cupy", op, "bwd", 131072, 1024, row_cache="cluster8", threads=1024, rows=1,
            unroll=1, partials="shared")
        add("prefetch", "triton", op, "bwd", 4096, 16384, BWD_PREFETCH=1)
        add("prefetch", "cupy", op, "bwd", 4096, 16384, prefetch=1)
        add("prefetch", "numba", op, "bwd", 4096, 16384, prefetch=1)
        add("scalar accesses", "numba", op, "fwd", 4096, 16384, vec=1)
        # The heuristic's chunked Numba forward keeps the row in shared memory; the variant reads it back from L2.
        add("row read back", "numba", op, "fwd", 16384, 8192, row_cache="global",
            dry=dict(threads=32, items=1, rows=1, vec=1))
    # The heuristic sums these dW partials in registers; the variant read-modify-writes them per row.
    add("partials per row", "cupy", "rmsnorm", "bwd", 16384, 8192, partials="global")
    # Rows re-read from global memory: the heuristic's column-outer second pass against per-row partials.
    add("partials per row", "cupy", "layernorm", "bwd", 65536, 2048, partials="global")
    # The heuristic sums these dW/dB in shared memory beside the row; the variant read-modify-writes them per row.
    add("partials per row", "cupy", "layernorm", "bwd", 12288, 8192, partials="global")
    # The heuristic's shared-memory row (LN bwd 16K): the next row copied in by cp.async during this one.
    add("prefetch", "cupy", "layernorm", "bwd", 16384, 8192, prefetch=1)
    return out
