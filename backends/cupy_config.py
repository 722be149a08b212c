"""The CuPy kernels' launch geometry: `CupyConfig` (its domain, validity rules, heuristic and tuning menu) and the
sizes the launcher derives from it (dynamic shared memory, the constants rendered into the source). No CUDA here:
the audit, the CPU harness and the tuner's planning use it without a GPU."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import ClassVar

from autonorm.config import Config, knob
from autonorm.hardware import ARCHS, register_cap
from autonorm.spec import NormSpec

# Per-thread fp32 elements a row cached in registers may take. The forward keeps h
# (1 array); the backward keeps xhat, dy and the dW/dB accumulators (4 arrays), so its
# budget per array is a quarter of the forward's. 64 fp32 registers of row data leaves
# room for addresses and temporaries below the 255-register cap without spilling.
MAX_REG_ELEMS = {"fwd": 64, "bwd": 16}
# Registers each cached element costs with its temporaries (`autonorm audit` on sm_80/sm_90:
# the forward uses ~1.5 per element, the backward ~5 per element of each array).
REGS_PER_ELEM = {"fwd": 2, "bwd": 5}
PREFETCH_REGS_PER_ELEM = 11
# The shared-memory row cache holds the row in the input dtype (x, or h with a residual; the backward
# keeps x and dy). Its bytes a block may ask for, less 1 KiB for the static reduction slots beside it:
# the space goes up to Hopper's per-block maximum with the opt-in (227 KiB; the tuner's audit prunes
# what a device cannot hold), the heuristic up to A100's (163 KiB), the smaller of the two
# architectures the audit gates. A GPU that allows less (consumer Ampere and Ada: 99 KiB) refuses such
# a config when it is built, and the dispatcher's ladder moves on. Over 48 KiB the launcher opts in.
SMEM_MAX = 226 * 1024
SMEM_HEURISTIC = 162 * 1024
SMEM_WITHOUT_OPT_IN = 48 * 1024
C_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}


def cdiv(a: int, b: int) -> int:
    """a / b rounded up (blocks for a rows, items per thread...)."""
    return -(-a // b)


def max_partial_elems(threads: int) -> int:
    """dW (+ dB) elements a thread of a `threads` block may sum in registers across its rows when the
    row itself lives in shared or global memory: a quarter of its register cap, at most 64. The rest
    holds one vector's temporaries, the addresses and the unrolled loop's state: at 1024 threads
    (64 registers) 16 elements fit in 53-64 registers and 32 spilled 144 bytes (ptxas 13.4, sm_90)."""
    return min(64, register_cap(threads) // 4)


def max_reg_elems(direction: str, threads: int) -> int:
    """Row elements a thread of a `threads` block may cache in registers without spilling."""
    return min(MAX_REG_ELEMS[direction], register_cap(threads) // REGS_PER_ELEM[direction])


def max_prefetch_elems(threads: int) -> int:
    """The backward's row elements a thread may cache in registers with prefetch=1, which also holds the
    next row's x and dy and the weight: 11 registers an element (LayerNorm with bias and residual in
    bf16, ptxas 13 for sm_90: 180 registers at 16 elements; at 8 elements it spilled 200 bytes under the
    64-register cap of 1024 threads)."""
    return min(MAX_REG_ELEMS["bwd"], register_cap(threads) // PREFETCH_REGS_PER_ELEM)


@dataclass(frozen=True)
class CupyConfig(Config):
    """Launch geometry of the raw CUDA kernels."""

    backend: ClassVar[str] = "cupy"

    threads: int = knob((32, 64, 128, 256, 512, 1024), "threads per block")
    vec: int = knob((1, 2, 4, 8), "elements per vector access (16 bytes = 4 fp32 / 8 bf16)")
    rows: int = knob((1, 2, 4, 8, 16), "rows per block (threads / rows threads per row)")
    unroll: int = knob((1, 2, 4), "unroll of the chunk loops (shared / none row cache)")
    row_cache: str = knob(("registers", "shared", "none", "cluster2", "cluster4", "cluster8"),
                          "where the row lives between passes; clusterC (sm_90+): split over the C blocks "
                          "of a thread-block cluster, each caching its slice in shared memory (x, and dy in the "
                          "backward)")
    partials_per_sm: int = knob((1, 2, 4, 8, 16), "bwd: persistent blocks (dW partial groups) per SM")
    partials: str = knob(("registers", "shared", "global", "columns"),
                         "bwd: where a thread sums its columns' dW/dB over its rows (registers: written once; shared, "
                         "beside a row cached in shared memory: fp32 sums there, written once; global: "
                         "read-modify-written per row; columns, row_cache=none: a second pass walks each column "
                         "vector down the rows, summing in registers, written once)")
    # A knob with a default (knob() has none), so that configs written before it still construct.
    prefetch: int = field(default=0, metadata={"domain": (0, 1), "doc": (
        "bwd with the row in registers: 1 reads the weight once for all rows and loads the next row's x and dy "
        "before this row's reductions (a second register set for them); with the row in shared memory: 1 copies "
        "the next row's x and dy into a second buffer by cp.async while this row is computed")})

    def min_compute_capability(self) -> int:
        return required_feature(self)[0]

    @classmethod
    def is_valid(cls, spec: NormSpec, c: CupyConfig) -> str | None:
        for rule in (_geometry_rule, _row_cache_rule, _partials_rule, _prefetch_rule):
            problem = rule(spec, c)
            if problem is not None:
                return problem
        return None

    @classmethod
    def menu(cls, spec: NormSpec) -> list[CupyConfig]:
        """What the tuner times for `spec`: a few dozen to a few hundred of the valid configs (`space`, up to
        ~10,000, most differing only in knobs that cannot matter), every structural variant (row cache x partials
        x prefetch x cluster) that moves no more bytes than one that fits. `is_valid` still judges any config a
        database names; the menu only cuts what is not worth timing, by the traffic model and the heuristic:
        - the widest vector the spec allows (16-byte accesses move the same bytes in the fewest instructions;
          a misaligned tensor takes the scalar entry point at run time whatever the width);
        - threads per row from half to four times the heuristic's (quack's table by N), any width the register
          cache or a cluster needs; several rows a block only in 128- or 256-thread blocks;
        - unroll 1 or 2, and the heuristic's persistent blocks per SM with their neighbours;
        - `_least_traffic`: no variant that moves more bytes where a leaner one fits;
        - the heuristic itself, always.
        On a GPU the audit then drops what spills or cannot be resident (`autonorm.audit.prune_space`)."""
        heuristic = cls.heuristic(spec)
        tpr = heuristic.threads // heuristic.rows
        steps = cls.domain()["partials_per_sm"]
        at = steps.index(heuristic.partials_per_sm)
        per_sm = steps[max(0, at - 1):at + 2] if spec.direction == "bwd" and spec.weight else steps[at:at + 1]
        widths = [v for v in sorted(cls.domain()["vec"], reverse=True)
                  if v * spec.x_itemsize <= 16 and spec.hidden % v == 0]
        menu = []
        for cache in cls.domain()["row_cache"]:
            blocks = int(cache[len("cluster"):]) if cache.startswith("cluster") else 1
            vec = next((v for v in widths if spec.hidden % (v * blocks) == 0), None)
            any_width = cache == "registers" or blocks > 1
            for threads, rows, unroll, pps, partials, prefetch in itertools.product(
                    cls.domain()["threads"], cls.domain()["rows"], (1, 2), per_sm, cls.domain()["partials"], (0, 1)):
                if vec is None or (rows > 1 and threads not in (128, 256)):
                    continue
                if not any_width and not tpr // 2 <= threads // rows <= 4 * tpr:
                    continue
                config = cls(threads=threads, vec=vec, rows=rows, unroll=unroll, row_cache=cache,
                             partials_per_sm=pps, partials=partials, prefetch=prefetch)
                if cls.is_valid(spec, config) is None:
                    menu.append(config)
        menu = _least_traffic(spec, menu)
        return menu if heuristic in menu else [heuristic, *menu]

    @classmethod
    def heuristic(cls, spec: NormSpec) -> CupyConfig:
        n = spec.hidden
        # quack: vecsize = gcd(N, 128 / bits).
        vec = max(v for v in (1, 2, 4, 8) if v * spec.x_itemsize <= 16 and n % v == 0)
        # quack's threads per row by N, capped so that no thread idles.
        tpr = 8 if n <= 64 else 32 if n <= 3072 else 64 if n <= 6144 else 128 if n <= 16384 else 256
        tpr = max(2, min(tpr, 1 << (cdiv(n, vec) - 1).bit_length()))
        # Persistent bwd: quack uses SMs x 16 blocks for N <= 256 down to SMs / 2 at 16K.
        pps = 1
        if spec.direction == "bwd":
            pps = 16 if n <= 256 else 8 if n <= 1024 else 4 if n <= 4096 else 2 if n <= 16384 else 1
        # Registers first (quack keeps the row in registers): widen the row's
        # thread group until the row fits the register budget; then the shared-memory cache,
        # then chunked re-reads from global memory, which fit any N.
        reg_tpr = tpr
        while cdiv(n, reg_tpr * vec) * vec > max_reg_elems(spec.direction, reg_tpr) and reg_tpr < 1024:
            reg_tpr *= 2
        # A shared row cache leaves room for few blocks an SM: where A100's 164 KiB hold too few blocks of
        # `tpr` threads for half occupancy (12K bf16 in the backward, 48 KiB a block: 3 of 128 threads),
        # 1024-thread blocks keep enough loads in flight.
        cache_bytes = n * spec.x_itemsize * (2 if spec.direction == "bwd" else 1)
        per_sm = ARCHS["sm_80"].smem // (cache_bytes + ARCHS["sm_80"].smem_reserved)
        shared_threads = tpr if min(per_sm, 2048 // tpr) * tpr >= 1024 else 1024
        # Several rows per block for small N: 128-thread blocks.
        # dW/dB partials: summed in registers where a thread's columns fit; else, with the row in shared memory,
        # in shared memory beside it where both fit, else per row in global memory, and with no row cache in a
        # column-outer second pass (rows that long are read twice either way; a per-row read-modify-write
        # would add 8 bytes an element and parameter).
        candidates = [(reg_tpr, min(16, max(1, 128 // reg_tpr)), "registers", 1, "registers"),
                      (shared_threads, 1, "shared", 2, "registers"),
                      (1024, 1, "shared", 2, "shared"),  # row and sums: past 48 KiB wherever chosen
                      (shared_threads, 1, "shared", 2, "global"),
                      (tpr, 1, "none", 2, "registers"), (tpr, 1, "none", 2, "columns")]
        for t, r, cache, unroll, partials in candidates:
            config = cls(threads=t * r, vec=vec, rows=r, unroll=unroll, row_cache=cache, partials_per_sm=pps,
                         partials=partials)
            if cls.is_valid(spec, config) is None and dynamic_smem(spec, config) <= SMEM_HEURISTIC:
                return config
        raise AssertionError(f"no valid heuristic cupy config for {spec.short()}")  # 'none' is always valid


def _items(spec: NormSpec, c: CupyConfig) -> int:
    """Vectors of its block's part of a row (the whole row, or a cluster's slice) each thread owns."""
    return cdiv(spec.hidden // cluster_size(c), (c.threads // c.rows) * c.vec)


def _geometry_rule(spec: NormSpec, c: CupyConfig) -> str | None:
    n, isz = spec.hidden, spec.x_itemsize
    if c.vec * isz > 16:
        return f"vec={c.vec} x {spec.x_dtype} exceeds a 16-byte access"
    if n % c.vec:
        return f"vec={c.vec} does not divide N={n}"
    if c.rows > c.threads // 2:
        return f"rows={c.rows} leaves fewer than 2 threads per row of a {c.threads}-thread block"
    blocks = cluster_size(c)
    if blocks > 1:
        if c.rows != 1 or c.unroll != 1:
            return f"row_cache={c.row_cache} takes one row a cluster (rows=1) and unroll=1"
        if n % (blocks * c.vec):
            return f"row_cache={c.row_cache}: N={n} does not split into {blocks} slices of whole vectors"
        n //= blocks  # each block of the cluster owns a slice of the row
    tpr = c.threads // c.rows
    if tpr > 2 and (tpr // 2) * c.vec >= n:
        return f"{tpr} threads per row: half of them would have no element of an N={n} row"
    return None


def _row_cache_rule(spec: NormSpec, c: CupyConfig) -> str | None:
    if c.row_cache == "registers":
        need, budget = _items(spec, c) * c.vec, max_reg_elems(spec.direction, c.threads)
        if need > budget:
            return f"registers row cache needs {need} elements per thread (max {budget} with {c.threads} threads)"
        if c.unroll != 1:
            return "unroll applies to the chunk loops; the registers cache is fully unrolled"
    elif c.row_cache != "none" and dynamic_smem(spec, c) > SMEM_MAX:
        what = " and dW/dB sums" if c.partials == "shared" and spec.weight and spec.direction == "bwd" else ""
        return f"{c.row_cache} row cache{what} need {dynamic_smem(spec, c)} bytes a block > {SMEM_MAX}"
    return None


def _partials_rule(spec: NormSpec, c: CupyConfig) -> str | None:
    if spec.direction == "fwd" or not spec.weight:
        if c.partials_per_sm != 1 and spec.direction == "fwd":
            return "partials_per_sm is a backward knob (fwd takes 1)"
        if c.partials != "registers":
            return "partials applies to a backward with dW/dB (this spec takes 'registers')"
    elif c.partials == "registers" and c.row_cache != "registers":
        budget = max_partial_elems(c.threads)
        need = _items(spec, c) * c.vec * (2 if spec.bias else 1)
        if need > budget:
            return (f"dW/dB partials in registers need {need} elements per thread "
                    f"(max {budget} with {c.threads} threads)")
    elif c.partials in ("global", "shared") and c.row_cache == "registers":
        return "a row cached in registers sums its partials in registers"
    elif c.partials == "shared" and c.row_cache == "none":
        return "partials=shared sums dW/dB beside a row cached in shared memory (row_cache=shared or clusterC)"
    elif c.partials == "columns" and c.row_cache != "none":
        return "partials=columns re-reads the rows column by column: it takes row_cache=none"
    return None


def _prefetch_rule(spec: NormSpec, c: CupyConfig) -> str | None:
    if not c.prefetch:
        return None
    if spec.direction != "bwd" or c.row_cache not in ("registers", "shared"):
        return "prefetch applies to the backward with its row cached in registers or shared memory"
    if c.row_cache == "shared" and c.vec * spec.x_itemsize < 4:
        return f"prefetch into shared memory copies {c.vec * spec.x_itemsize}-byte vectors; cp.async moves 4, 8 or 16"
    if c.row_cache == "registers" and _items(spec, c) * c.vec > max_prefetch_elems(c.threads):
        return (f"prefetch keeps {_items(spec, c) * c.vec} elements per thread twice in registers "
                f"(max {max_prefetch_elems(c.threads)} with {c.threads} threads)")
    return None


def _least_traffic(spec: NormSpec, configs: list[CupyConfig]) -> list[CupyConfig]:
    """`configs` less the variants that move more bytes where a leaner one is among them: the row re-read from
    global memory (row_cache=none) where a register or shared-memory row cache fits, and, per row cache, the dW/dB
    sums read-modify-written every row (partials=global) or summed by a second pass (columns) where they fit in
    registers or shared memory. Clusters (sm_90 only) do not count as a fit: elsewhere `none` is what is left."""
    if any(c.row_cache in ("registers", "shared") for c in configs):
        configs = [c for c in configs if c.row_cache != "none"]
    if spec.direction == "bwd" and spec.weight:
        lean = {c.row_cache for c in configs if c.partials in ("registers", "shared")}
        configs = [c for c in configs if c.partials in ("registers", "shared") or c.row_cache not in lean]
    return configs


def required_feature(config: CupyConfig) -> tuple[int, str]:
    """The oldest compute capability a config's source compiles for, and the feature that sets it."""
    if cluster_size(config) > 1:
        return 90, "thread-block clusters"
    if config.prefetch and config.row_cache == "shared":
        return 80, "cp.async"  # the backward's prefetch copies the next row into shared memory with it
    return 0, ""


def cluster_size(config: CupyConfig) -> int:
    """Blocks of the thread-block cluster that shares one row (1: no cluster)."""
    return int(config.row_cache[len("cluster"):]) if config.row_cache.startswith("cluster") else 1


def dynamic_smem(spec: NormSpec, config: CupyConfig) -> int:
    """Bytes of dynamic shared memory the launcher asks for: the row cache, ROWS rows of N input-dtype
    elements with row_cache="shared" (two rows a group with prefetch: one computed, one arriving), a 1/C
    slice of the row with "clusterC", twice in the backward (x and dy); then, with partials="shared", from
    the next 16-byte boundary, each row group's fp32 dW (and dB) sums over its N (or slice) columns."""
    return partials_smem_offset(spec, config) + partials_smem_bytes(spec, config) if _smem_partials(spec, config) \
        else _row_cache_bytes(spec, config)


def _row_cache_bytes(spec: NormSpec, config: CupyConfig) -> int:
    tensors = 2 if spec.direction == "bwd" else 1
    if config.row_cache.startswith("cluster"):
        return spec.hidden // cluster_size(config) * spec.x_itemsize * tensors
    cache_rows = config.rows * (2 if config.prefetch else 1) if config.row_cache == "shared" else 0
    return cache_rows * spec.hidden * spec.x_itemsize * tensors


def _smem_partials(spec: NormSpec, config: CupyConfig) -> bool:
    return spec.direction == "bwd" and spec.weight and config.partials == "shared"


def partials_smem_offset(spec: NormSpec, config: CupyConfig) -> int:
    """Where partials="shared" puts its fp32 sums in dynamic shared memory: after the row cache, 16-byte aligned."""
    return cdiv(_row_cache_bytes(spec, config), 16) * 16


def partials_smem_bytes(spec: NormSpec, config: CupyConfig) -> int:
    """The fp32 dW (+ dB) sums of partials="shared": ROWS groups of a row's (or a cluster slice's) columns."""
    return config.rows * spec.hidden // cluster_size(config) * 4 * (2 if spec.bias else 1)


def geometry(spec: NormSpec, config: CupyConfig) -> dict:
    """Constants rendered into the kernels (templates read them as `geo.*`)."""
    tpr = config.threads // config.rows
    owned = spec.hidden // cluster_size(config)  # a block's slice of the row under a cluster split
    return {"threads": config.threads, "rows": config.rows, "vec": config.vec,
            "items_per_thread": cdiv(owned, tpr * config.vec), "cluster": cluster_size(config)}
