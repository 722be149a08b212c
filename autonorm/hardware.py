"""What the GPU hardware allows a block: per-SM limits per architecture, the per-thread register cap
and how many blocks of a kernel stay resident. Plain arithmetic with no imports from the rest of
autonorm, so the backends (their register rules, persistent grids) and `autonorm audit` share it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """Per-SM limits of a compute capability (CUDA C Programming Guide, compute capabilities table)."""

    name: str
    cc: int
    regs: int = 65536
    smem: int = 164 * 1024          # shared memory per SM
    smem_block: int = 163 * 1024    # largest opt-in shared memory of one block
    threads: int = 2048
    blocks: int = 32
    reg_unit: int = 256             # registers are allocated per warp in units of 256
    smem_reserved: int = 1024       # shared memory the system reserves per block


ARCHS = {
    "sm_80": Arch("sm_80", 80),
    "sm_90": Arch("sm_90", 90, smem=228 * 1024, smem_block=227 * 1024),
}
MAX_REGS_PER_THREAD = 255


def register_cap(threads: int) -> int:
    """Registers one thread may use when a block of `threads` must be resident on a
    64K-register SM: min(255, 65536 / threads), in the allocation unit of 8 (the backends'
    register rules use it)."""
    return min(MAX_REGS_PER_THREAD, (65536 // threads) // 8 * 8)


def resident_blocks(registers: int, threads: int, smem: int, arch: Arch) -> tuple[int, str]:
    """(blocks of this kernel resident on one SM, the limit that sets it); 0 blocks: it cannot launch."""
    warps = -(-threads // 32)
    regs_per_warp = -(-registers * 32 // arch.reg_unit) * arch.reg_unit
    limits = {
        "threads": arch.threads // (warps * 32) if threads <= 1024 else 0,
        "registers": 0 if registers > MAX_REGS_PER_THREAD
        else (arch.regs // regs_per_warp) // warps if regs_per_warp else arch.blocks,
        "smem": arch.smem // (smem + arch.smem_reserved) if smem <= arch.smem_block else 0,
        "blocks": arch.blocks,
    }
    limiter = min(limits, key=lambda k: limits[k])
    return limits[limiter], limiter


def device_arch(props) -> Arch:
    """The limits of a device from torch.cuda.get_device_properties (known values where torch lacks one)."""
    base = ARCHS.get(f"sm_{props.major}{props.minor}", ARCHS["sm_80"])
    return dataclasses.replace(
        base, name=f"sm_{props.major}{props.minor}", cc=props.major * 10 + props.minor,
        regs=getattr(props, "regs_per_multiprocessor", base.regs),
        smem=getattr(props, "shared_memory_per_multiprocessor", base.smem),
        threads=getattr(props, "max_threads_per_multi_processor", base.threads))
