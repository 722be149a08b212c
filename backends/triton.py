"""Triton backend: kernels rendered from templates/triton/*.j2, run on CUDA or in Triton's interpreter.

The rendered source is a small Python module (the @triton.jit kernel plus a
`launch` function implementing the calling convention of backends/base.py). It
is written to the cache folder and imported from there, because @triton.jit
reads its function's source with `inspect.getsource`, which needs a file.

`triton` itself is imported lazily: this module imports without it, and the
backend then reports itself unavailable with an install hint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from autonorm import settings
from autonorm.config import Config, knob
from autonorm.hardware import register_cap
from autonorm.spec import NormSpec

from .base import Backend, import_generated

_POW2 = tuple(1 << i for i in range(17))  # 1 .. 65536

# Largest row tile (BLOCK_N * ROWS_PER_PROGRAM, fp32 elements) one program keeps on chip.
# Beyond it the row is processed in chunks of BLOCK_N. Liger caps its fused size at 65536
# for the forward; the backward holds x, dy and their products, so half that.
MAX_TILE = {"fwd": 65536, "bwd": 32768}
# fp32 elements of the tile per thread: at most MAX_PER_THREAD, and at most the thread's
# register cap (see register_cap) divided by REGS_PER_ELEM, since the forward keeps h and
# its square, the backward x, dy and their products live; more spills (measured with
# `autonorm audit`: 32 fp32 per thread at 1024 threads spill in the fp32 forward on sm_80,
# 32 at 512 threads in the backward).
MAX_PER_THREAD = {"fwd": 64, "bwd": 32}
# The same with DW_COLUMN_OUTER=1, whose dW/dB accumulators and weight chunk stay in registers
# beside the tile: ptxas for sm_90 spills at 16 (LayerNorm, 8192 columns, 16 warps), not at 8.
COLUMN_OUTER_PER_THREAD = 8
REGS_PER_ELEM = {"fwd": 3, "bwd": 6}
# Chunks smaller than this make the chunked loop pointlessly long.
MIN_CHUNK = 1024
# Several rows per program only while the whole tile stays small (small N).
MAX_MULTI_ROW_TILE = 16384
# The chunk of the chunked loop: 16 fp32 per thread with 16 warps.
CHUNK_BLOCK_N, CHUNK_WARPS = 8192, 16


def max_per_thread(direction: str, num_warps: int) -> int:
    """fp32 tile elements a thread of a `num_warps` program may hold without spilling."""
    return min(MAX_PER_THREAD[direction], register_cap(32 * num_warps) // REGS_PER_ELEM[direction])


def prefetch_per_thread(num_warps: int) -> int:
    """The backward's per-thread tile budget with BWD_PREFETCH=1: two more fp32 registers an element
    (the next group's x and dy)."""
    return min(MAX_PER_THREAD["bwd"], register_cap(32 * num_warps) // (REGS_PER_ELEM["bwd"] + 2))


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_flags(spec: NormSpec, config: TritonConfig) -> dict[str, tuple[bool, str]]:
    """The kernel's tl.constexpr switches for this spec and config: name -> (value, what it turns on).

    The templates pass them to the kernel as compile-time arguments, so each variant is one kernel
    text whose `if FLAG:` branches Triton keeps or drops when it compiles."""
    chunked = config.BLOCK_N < next_pow2(spec.hidden)
    flags = {
        "CHUNKED": (chunked, "loop over the row in chunks of BLOCK_N (else the whole row on chip)"),
        "LAYERNORM": (spec.is_layernorm, "subtract the row mean (else RMSNorm)"),
        "HAS_RESIDUAL": (spec.residual, "fused residual add: h = x + residual is normalized"),
        "HAS_WEIGHT": (spec.weight, "scale by the weight"),
        "HAS_BIAS": (spec.bias, "add the bias"),
        "HAS_OFFSET": (spec.offset, "scale by offset + weight (Gemma)"),
    }
    if spec.direction == "fwd":
        flags["CAST_X_HAT"] = (spec.casting_mode != "gemma", "round x_hat to the input dtype before the weight")
        flags["CAST_SCALE"] = (spec.casting_mode == "none", "round the scale to the input dtype too")
    else:
        flags["COLUMN_OUTER"] = (chunked and bool(config.DW_COLUMN_OUTER),
                                 "column chunks outside the rows, dW/dB partials on chip (DW_COLUMN_OUTER)")
        flags["PREFETCH"] = (bool(config.BWD_PREFETCH), "load the next row group before this one's reductions")
    return {name: (bool(value), meaning) for name, (value, meaning) in flags.items()}


@dataclass(frozen=True)
class TritonConfig(Config):
    """Launch parameters of the Triton kernels (every value a literal of its domain)."""

    backend: ClassVar[str] = "triton"

    BLOCK_N: int = knob(_POW2, "columns per block; < next_pow2(N) selects the chunked loop over the row")
    num_warps: int = knob((1, 2, 4, 8, 16, 32), "warps per program")
    ROWS_PER_PROGRAM: int = knob((1, 2, 4, 8, 16, 32), "rows each program normalizes (as one 2-D tile)")
    DW_PARTIALS: int = knob((32, 64, 128, 256, 512), "backward: fp32 dW/dB partial rows (programs)")
    # A knob with a default (knob() has none), so that configs written before it still construct.
    DW_COLUMN_OUTER: int = field(default=0, metadata={"domain": (0, 1), "doc": (
        "chunked backward with a weight: 1 walks column chunks outside the program's rows, keeping "
        "dW/dB partials on chip and writing them once; 0 walks rows outside, read-modify-writing them per row")})
    BWD_PREFETCH: int = field(default=0, metadata={"domain": (0, 1), "doc": (
        "whole-row backward: 1 issues the next row group's x and dy loads before this group's reductions "
        "(a second register set for the two tiles)")})

    @classmethod
    def is_valid(cls, spec: NormSpec, config: TritonConfig) -> str | None:
        padded = next_pow2(spec.hidden)
        block, rows, warps = config.BLOCK_N, config.ROWS_PER_PROGRAM, config.num_warps
        chunked = block < padded
        tile = block * rows
        if block > padded:
            return f"BLOCK_N={block} exceeds the padded row {padded}"
        if chunked and block < MIN_CHUNK:
            return f"chunked loop with BLOCK_N={block} < {MIN_CHUNK}: too many tiny chunks"
        if rows > 1 and (chunked or tile > MAX_MULTI_ROW_TILE):
            return f"ROWS_PER_PROGRAM={rows} needs a whole row per block and a tile <= {MAX_MULTI_ROW_TILE}"
        if tile > MAX_TILE[spec.direction]:
            return f"tile BLOCK_N*ROWS_PER_PROGRAM={tile} exceeds {MAX_TILE[spec.direction]} (register budget)"
        if tile > max_per_thread(spec.direction, warps) * 32 * warps:
            return (f"{tile // (32 * warps)} elements per thread with num_warps={warps} "
                    f"(register cap {register_cap(32 * warps)}): registers would spill")
        if warps > 1 and tile < 32 * warps:
            return f"num_warps={warps} leaves threads idle on a tile of {tile} elements"
        # Knobs that change nothing for this spec are pinned, so the space holds no duplicates.
        if spec.direction == "fwd" and config.DW_PARTIALS != cls.domain()["DW_PARTIALS"][0]:
            return "DW_PARTIALS is a backward knob"
        if spec.direction == "bwd" and not spec.weight and config.DW_PARTIALS != 256:
            return "DW_PARTIALS only matters with a weight"
        if config.DW_COLUMN_OUTER and not (spec.direction == "bwd" and chunked and spec.weight):
            return "DW_COLUMN_OUTER only matters for a chunked backward with a weight"
        if config.BWD_PREFETCH and (spec.direction != "bwd" or chunked):
            return "BWD_PREFETCH applies to the whole-row backward"
        if config.BWD_PREFETCH and tile > prefetch_per_thread(warps) * 32 * warps:
            return (f"{tile // (32 * warps)} elements per thread with the next row group's tiles in registers "
                    f"(BWD_PREFETCH=1, num_warps={warps}): registers would spill")
        if config.DW_COLUMN_OUTER and tile > COLUMN_OUTER_PER_THREAD * 32 * warps:
            return (f"{tile // (32 * warps)} elements per thread with dW/dB accumulators on chip "
                    f"(DW_COLUMN_OUTER=1, num_warps={warps}): registers would spill")
        return None

    @classmethod
    def heuristic(cls, spec: NormSpec) -> TritonConfig:
        # Liger (ops/utils.py calculate_settings): BLOCK = next_pow2(N), num_warps 4/8/16/32
        # from BLOCK >= 0/2K/8K/32K, one row on chip up to its 65536 fused-size cap.
        # A row that does not fit one program's registers (the per-thread budget shrinks as
        # warps grow: register_cap) is looped over in 8K chunks with 16 warps (16 fp32 per thread).
        padded = next_pow2(spec.hidden)
        block, rows, warps = CHUNK_BLOCK_N, 1, CHUNK_WARPS
        if padded <= MAX_TILE[spec.direction]:
            # Small rows: several rows per program so a program still moves ~2K elements
            # (quack's rmsnorm_config does the same for N < 1K: rows per CTA > 1).
            whole_rows = max(1, min(32, 2048 // padded))
            tile = padded * whole_rows
            w = 32 if tile >= 32768 else 16 if tile >= 8192 else 8 if tile >= 2048 else 4
            w = min(w, max(1, tile // 32))
            while w < 32 and tile > max_per_thread(spec.direction, w) * 32 * w:
                w *= 2
            if tile <= max_per_thread(spec.direction, w) * 32 * w:
                block, rows, warps = padded, whole_rows, w
        # Backward: 256 partial rows ~ 2 programs per SM on H100 (132 SMs), as Liger launches
        # sm_count programs; the partial sum it costs is tiny next to dx.
        # A chunked backward keeps its dW/dB partials on chip (4K chunks, so they fit in registers):
        # beyond MAX_TILE the rows hundreds of programs have in flight fill L2, so its column-major
        # re-read costs little more than the row-major one, while the per-row read-modify-write of
        # fp32 partials adds 8 bytes per element and row. Not yet measured on a GPU: the tuner decides.
        column_outer = int(spec.direction == "bwd" and spec.weight and block < padded)
        if column_outer:
            block = COLUMN_OUTER_PER_THREAD * 32 * warps
        return cls(BLOCK_N=block, num_warps=warps, ROWS_PER_PROGRAM=rows,
                   DW_PARTIALS=256 if spec.direction == "bwd" else cls.domain()["DW_PARTIALS"][0],
                   DW_COLUMN_OUTER=column_outer)


class TritonBackend(Backend):
    name = "triton"
    config_cls = TritonConfig
    template_dir = "triton"

    def unavailable_reason(self) -> str | None:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install autonorm[triton])"
        if not torch.cuda.is_available() and not interpreting():
            return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on CPU in Triton's interpreter)"
        return None

    def version(self) -> str:
        import triton

        return triton.__version__ + ("+interp" if interpreting() else "")

    def supports_device(self, device: torch.device) -> bool:
        if device.type == "cuda":
            return torch.cuda.is_available() and not interpreting()
        return device.type == "cpu" and interpreting()

    def template_name(self, spec: NormSpec) -> str:
        return f"triton/{spec.direction}.py.j2"

    def render_context(self, spec: NormSpec, config: Config) -> dict:
        flags = kernel_flags(spec, config)
        chunks = -(-spec.hidden // config.BLOCK_N)
        path = f"chunked loop over the row ({chunks} chunks)" if flags["CHUNKED"][0] else "whole row on chip"
        return {"flags": flags, "path": path}

    def build(self, source, spec, config, device):
        settings.pin_triton_fp_fusion()  # before the first launch, where Triton compiles
        module = import_generated(source, self.template_dir)
        return module.launch
