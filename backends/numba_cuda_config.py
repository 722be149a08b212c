"""The Numba CUDA kernels' block shape: `NumbaCudaConfig` (its domain, validity rules and heuristic) and the
sizes derived from it (the persistent backward's blocks an SM, static shared memory, weight words). It imports
no Numba: a config is judged and chosen where numba-cuda is not installed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from autonorm.config import Config, knob
from autonorm.spec import NormSpec

THREADS = (32, 64, 128, 256, 512, 1024)
MAX_BLOCK = 1024  # CUDA's limit on threads per block
MAX_SM_THREADS = 2048  # threads an SM holds at once (A100, H100)
# Numba has no 128-bit integer: the widest access a kernel can ask for is one 64-bit word.
WORD_BYTES = 8
# Numba declares shared memory statically (`cuda.shared.array` of a constant shape), and a static
# allocation is capped at 48 KiB a block on every architecture (more needs dynamic shared memory
# and a per-kernel opt-in, which numba-cuda's launcher does not make).
STATIC_SMEM_BYTES = 48 * 1024


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class NumbaCudaConfig(Config):
    """Block shape of the Numba kernels: THREADS x ROWS threads, ITEMS elements per thread per chunk."""

    backend: ClassVar[str] = "numba"

    threads: int = knob(THREADS, "threads cooperating on one row (a power of two: tree reduction)")
    items: int = knob((1, 2, 4, 8), "elements per thread per chunk; the row stays in registers when N <= threads*items")
    rows: int = knob((1, 2, 4, 8), "rows per block, for small N")
    vec: int = knob((1, 2, 4), "elements per memory access of the row tensors (at most 8 bytes: a 64-bit word)")
    # A knob with a default (knob() has none), so that configs written before it still construct.
    partials: str = field(default="rows", metadata={"domain": ("rows", "columns"), "doc": (
        "bwd with a weight, rows in chunks: rows = the dx pass follows each row's reductions and read-modify-writes "
        "the slot's dW/dB partial row; columns = a second pass walks each column word down the slot's rows, "
        "summing dW/dB in registers, and writes each partial once")})
    row_cache: str = field(default="global", metadata={"domain": ("global", "shared"), "doc": (
        "fwd, rows in chunks: pass 2 reads the row (h with a residual) back from global memory (L2 at best), "
        "or from the copy pass 1 left in shared memory, in the input dtype (static shared memory: at most "
        "48 KiB a block)")})
    prefetch: int = field(default=0, metadata={"domain": (0, 1), "doc": (
        "bwd with the row in registers: 1 loads the next row's x, dy and statistics (kept packed, as loaded) "
        "before this row's block reductions, so their latency overlaps the reductions' barriers (a few more "
        "registers: the audit drops it where that spills, e.g. LayerNorm with a bias at 1024 threads)")})

    @classmethod
    def is_valid(cls, spec: NormSpec, config: "NumbaCudaConfig") -> str | None:
        if config.threads * config.rows > MAX_BLOCK:
            return f"threads*rows = {config.threads * config.rows} exceeds {MAX_BLOCK} threads per block"
        if config.threads > 32 and (config.threads // 2) * config.items >= spec.hidden:
            return f"half of {config.threads} threads would already cover N={spec.hidden}"
        if config.rows > 1 and config.threads * config.items < spec.hidden:
            return "several rows per block only pay when one chunk covers the row"
        if config.vec * spec.x_itemsize > WORD_BYTES:
            return f"vec={config.vec} x {spec.x_dtype} exceeds a {WORD_BYTES}-byte word"
        if spec.hidden % config.vec or config.items % config.vec:
            return f"vec={config.vec} must divide N={spec.hidden} and items={config.items}"
        if config.partials == "columns":
            if spec.direction == "fwd" or not spec.weight:
                return "partials=columns applies to a backward with dW/dB"
            if config.threads * config.items >= spec.hidden:
                return "a row in registers sums its partials in registers: partials=columns is for chunked rows"
        if config.prefetch and (spec.direction == "fwd" or not row_in_registers(spec, config)):
            return "prefetch applies to the backward with the row in registers (one chunk)"
        if config.row_cache == "shared":
            if spec.direction == "bwd":
                # x and dy cached would still leave per-row dW/dB partials in global memory (8 bytes per element
                # and parameter per row, more than the re-read they save) or need fp32 sums in shared memory too.
                return "row_cache=shared applies to the forward"
            if row_in_registers(spec, config):
                return "the row already stays in registers (one chunk): row_cache=shared is for chunked rows"
            need = forward_smem_bytes(spec, config)
            if need > STATIC_SMEM_BYTES:
                return (f"row_cache=shared needs {need} bytes of shared memory (N={spec.hidden} x "
                        f"{spec.x_itemsize}-byte {spec.x_dtype} + reduction buffers), over Numba's static "
                        f"{STATIC_SMEM_BYTES}")
        return None

    @classmethod
    def heuristic(cls, spec: NormSpec) -> "NumbaCudaConfig":
        # Keep the whole row in registers (one chunk) with 4 fp32 or 8 16-bit
        # elements per thread up to 1024 threads; beyond that, chunk. Small rows
        # share a block so that a block still has >= 128 threads.
        # The backward holds twice the forward's registers per element (x_hat, dy, partials):
        # 8 elements per thread halves its block, so the row stays in registers with 512
        # threads (<= 128 registers each) instead of 1024 threads capped at 64 (spills).
        items = 4 if spec.x_dtype == "float32" and spec.direction == "fwd" else 8
        threads = min(MAX_BLOCK, max(32, _pow2_at_least(-(-spec.hidden // items))))
        while threads > 32 and (threads // 2) * items >= spec.hidden:
            threads //= 2
        if threads * items < spec.hidden:
            # Chunked rows: 512 threads x 8 elements per chunk. 1024 threads would cap registers
            # at 64 per thread (launch bounds), where the bf16 forward spills on sm_80.
            threads, items = 512, 8
        rows = max(1, min(8, 128 // threads)) if threads * items >= spec.hidden else 1
        # The widest word that divides the row: 4 16-bit or 2 fp32 elements an access.
        vec = max(v for v in (1, 2, 4) if v * spec.x_itemsize <= WORD_BYTES and spec.hidden % v == 0 and items % v == 0)
        # Chunked backward with dW/dB: column-outer partials, so no partial row is read-modify-written per row
        # (8 bytes per element and parameter per row, more than re-reading x and dy).
        chunked_grads = spec.direction == "bwd" and spec.weight and threads * items < spec.hidden
        config = cls(threads=threads, items=items, rows=rows, vec=vec, partials="columns" if chunked_grads else "rows")
        # A chunked forward whose row fits in shared memory reads it once (bf16 up to ~22K elements, fp32 ~11K);
        # at 512 threads and <= 48 KiB a block, shared memory still leaves 4 blocks an SM on A100 and Hopper.
        shared = config.replace(row_cache="shared")
        return shared if cls.is_valid(spec, shared) is None else config


def persistent_blocks_per_sm(config: NumbaCudaConfig) -> int:
    """Blocks an SM of the persistent backward's grid: enough for half of an SM's threads (8 of 128 threads,
    2 of 512, 1 of 1024), as CuPy's heuristic launches. More resident threads hide more latency, but each
    block adds partial rows to write and sum, which at a few rows per block cost as much as the rows."""
    return max(1, min(16, MAX_SM_THREADS // 2 // (config.threads * config.rows)))


def row_in_registers(spec: NormSpec, config: NumbaCudaConfig) -> bool:
    """One chunk covers the row: each thread keeps its elements in registers between the passes."""
    return config.threads * config.items >= spec.hidden


def forward_smem_bytes(spec: NormSpec, config: NumbaCudaConfig) -> int:
    """Static shared memory of the forward: the block reduction's fp32 buffer (three for the chunked
    LayerNorm's Welford merge: count, mean and M2), plus the row in the input dtype with row_cache=shared."""
    buffers = 3 if spec.is_layernorm and not row_in_registers(spec, config) else 1
    row = spec.hidden * spec.x_itemsize if config.row_cache == "shared" else 0
    return row + buffers * config.threads * config.rows * 4


def weight_word_elements(spec: NormSpec, vec: int) -> int:
    """Weight (and bias) elements per access: the row's VEC, or as many as a 64-bit word holds (an fp32
    weight under 4 16-bit elements of x moves as 2 words)."""
    return min(vec, WORD_BYTES // spec.w_itemsize)
