"""Hardware fit without a GPU: cross-compile kernels for a GPU architecture and report how they fit it.

Each backend's real compiler runs here with the specialization the runtime gives
it, for sm_80 and sm_90 (`compilers.py`). Per kernel (`profile.py`): registers,
spill bytes, stack, static + dynamic shared memory, threads per block, theoretical
occupancy (resident blocks and warps per SM from registers, shared memory and
threads), the 128-bit share of global loads and stores (from the SASS) and the
cp.async (LDGSTS) count. Results are cached by source hash and toolchain under
`<cache_dir>/audit`; compiles run two at a time (`run.py`).

    jobs.py       what to compile: heuristics of a grid, a spec's space, a database's records
    tools.py      ptxas / cuobjdump / nvcc, their versions, and parsing what they print
    report.py     the table, the hardware-fit page, and the saved report the CI gate reads

The `autonorm audit` command is `autonorm/cli/audit.py`; the tuner asks `unfit` about each
GPU candidate just before compiling it, and `prune_space` judges a whole space.
"""
from ..hardware import ARCHS, MAX_REGS_PER_THREAD, Arch, register_cap, resident_blocks
from .compilers import cupy_translation_unit, triton_signature
from .jobs import Job, database_jobs, heuristic_jobs, space_jobs
from .profile import Profile, gate_failures, occupancy
from .report import ReportError, compare, doc, load_report, save_report, saved_toolchain, table
from .run import WORKERS, audit, cached, prune_space, unfit, unfit_specs, winner_profile
from .tools import BACKENDS, AuditToolError, check_backends, parse_ptxas_log, sass_counts, tool, toolchain

__all__ = ["ARCHS", "Arch", "AuditToolError", "BACKENDS", "Job", "MAX_REGS_PER_THREAD", "Profile", "ReportError",
           "WORKERS", "audit", "cached", "check_backends", "compare", "cupy_translation_unit", "database_jobs",
           "doc", "gate_failures", "heuristic_jobs", "load_report", "occupancy", "parse_ptxas_log", "prune_space",
           "register_cap", "resident_blocks", "save_report", "saved_toolchain", "sass_counts", "space_jobs",
           "table", "tool", "toolchain", "triton_signature", "unfit", "unfit_specs", "winner_profile"]
