"""What the compiler says about one kernel on one architecture, and whether that fits the hardware."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..hardware import ARCHS, Arch, resident_blocks
from ..spec import ITEMSIZE, NormSpec

# Bumped when what a cached profile holds changes.
PROFILE_VERSION = 2


@dataclass
class Profile:
    """What the compiler says about one kernel on one architecture."""

    backend: str
    spec: str
    config: str
    arch: str
    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem_static: int
    smem_dynamic: int
    threads: int
    global_loads: int
    global_loads_128: int
    global_loads_64: int  # exactly 64-bit: Numba's widest (one word of 4 16-bit or 2 fp32 elements)
    global_stores: int
    global_stores_128: int
    cp_async: int
    sass_sha256: str
    blocks_per_sm: int = 0
    warps_per_sm: int = 0
    occupancy: float = 0.0
    limiter: str = ""

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def launchable(self) -> bool:
        return self.blocks_per_sm > 0

    @property
    def load_share_128(self) -> float:
        return self.global_loads_128 / self.global_loads if self.global_loads else 0.0

    @property
    def store_share_128(self) -> float:
        return self.global_stores_128 / self.global_stores if self.global_stores else 0.0

    def fits(self) -> bool:
        """No spill and the block can be resident on an SM."""
        return self.spill_bytes == 0 and self.launchable

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(spill_bytes=self.spill_bytes, launchable=self.launchable,
                 load_share_128=round(self.load_share_128, 3), store_share_128=round(self.store_share_128, 3))
        return d

    def summary(self) -> dict:
        """The few numbers a database record keeps of its winner."""
        return {"arch": self.arch, "registers": self.registers, "spill_bytes": self.spill_bytes,
                "smem": self.smem_static + self.smem_dynamic, "threads": self.threads,
                "blocks_per_sm": self.blocks_per_sm, "occupancy": round(self.occupancy, 3),
                "load_share_128": round(self.load_share_128, 3)}


def occupancy(p: Profile, arch: Arch) -> Profile:
    """Fill in resident blocks / warps per SM and what limits them."""
    p.blocks_per_sm, p.limiter = resident_blocks(p.registers, p.threads, p.smem_static + p.smem_dynamic, arch)
    p.warps_per_sm = p.blocks_per_sm * -(-p.threads // 32)
    p.occupancy = p.warps_per_sm / (arch.threads // 32)
    return p


def gate_failures(p: Profile, spec: NormSpec) -> list[str]:
    """Why a kernel does not fit: spills, a block that cannot be resident, unvectorized loads of x."""
    problems = []
    if p.spill_bytes:
        problems.append(f"spills {p.spill_bytes} bytes")
    if p.registers * p.threads > ARCHS[p.arch].regs or not p.launchable:
        problems.append(f"{p.registers} registers x {p.threads} threads cannot be resident ({p.limiter})")
    # Triton and CuPy load x 16 bytes at a time on aligned rows; Numba, without a 128-bit type, 8.
    row_bytes = spec.hidden * ITEMSIZE[spec.x_dtype]
    if p.backend != "numba" and row_bytes % 16 == 0 and not p.global_loads_128:
        problems.append("no 128-bit global load although rows are 16-byte aligned")
    if p.backend == "numba" and row_bytes % 8 == 0 and not p.global_loads_64:
        problems.append("no 64-bit global load although rows are 8-byte aligned")
    return problems
