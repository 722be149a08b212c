"""How much smaller the GPU search spaces are for the audit: dead knobs removed, CuPy's menu, configs that do not fit.

    python scripts/pruned_spaces.py > docs/benchmarks/pruned-spaces.md

1. The standard grid (fp32/fp16/bf16 x RMS/LN x fwd/bwd x N = 256..262,144), per backend: the
   space as the tuner sees it today, and before Triton's `num_stages` knob was removed (it took
   1, 2 or 3 wherever a loop ran, and its cubins were identical).
2. A sample of specs (bf16, both ops and directions, N in SAMPLE_N), audited for ARCH: how many
   configs of each space `prune_space` drops (they spill or a block cannot be resident). Triton's
   and Numba's whole spaces are compiled; CuPy's spaces (up to ~3,000 configs) are sampled at
   CUPY_SAMPLE random configs each, so its share is an estimate.

Cross-compiled with the toolchain the audit uses (no GPU); profiles are cached, so a rerun is quick.
"""
from __future__ import annotations

import datetime
import random
import sys

from autonorm.audit import Job, audit, check_backends, toolchain
from autonorm.backends import get_backend
from autonorm.grids import STANDARD
from autonorm.spec import NormSpec

ARCH = "sm_90"
SAMPLE_N = (4096, 65536)
CUPY_SAMPLE = 60
BACKENDS = ("triton", "cupy", "numba")


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def stages_before(spec: NormSpec, config) -> int:
    """How many `num_stages` values (1, 2, 3) the Triton space held for this config before the knob went:
    all three wherever a loop ran (a chunked row, or any backward), one for the single-block forward."""
    chunked = config.BLOCK_N < _pow2_at_least(spec.hidden)
    return 1 if spec.direction == "fwd" and not chunked else 3


def grid_sizes() -> list[str]:
    lines = ["| backend | specs | configs before | configs now | factor |", "|---|---|---|---|---|"]
    for name in BACKENDS:
        backend = get_backend(name)
        before = now = 0
        for spec in STANDARD.specs():
            space = backend.space(spec)
            now += len(space)
            before += sum(stages_before(spec, c) for c in space) if name == "triton" else len(space)
        lines.append(f"| {name} | {len(STANDARD.specs())} | {before:,} | {now:,} | {before / now:.2f} |")
    return lines


def sampled_pruning() -> list[str]:
    specs = [NormSpec(op, d, "bfloat16", "bfloat16", n) for op in ("rmsnorm", "layernorm") for d in ("fwd", "bwd")
             for n in SAMPLE_N]
    lines = ["| backend | spec | configs audited | pruned | share pruned |", "|---|---|---|---|---|"]
    totals = {}
    for name in BACKENDS:
        backend = get_backend(name)
        for spec in specs:
            space = backend.space(spec)
            if name == "cupy" and len(space) > CUPY_SAMPLE:
                space = random.Random(spec.hidden).sample(space, CUPY_SAMPLE)
            profiles = audit([Job(name, spec, c, ARCH) for c in space])
            pruned = sum(not p.fits() for p in profiles)
            done, dropped = totals.get(name, (0, 0))
            totals[name] = (done + len(space), dropped + pruned)
            lines.append(f"| {name} | {spec.short()} | {len(space)} | {pruned} | {pruned / len(space):.0%} |")
            print(f"  {name} {spec.short()}: {pruned} of {len(space)} pruned", file=sys.stderr)
    lines += ["", "| backend | configs audited | pruned | share pruned |", "|---|---|---|---|"]
    lines += [f"| {name} | {done} | {dropped} | {dropped / done:.0%} |" for name, (done, dropped) in totals.items()]
    return lines


def cupy_menu() -> list[str]:
    """CuPy's tuning menu (`CupyConfig.menu`, what `CupyBackend.space` gives the tuner) against its valid space, on
    the sampled specs, and the menu's size over the standard grid. No compiler needed."""
    from autonorm.backends.cupy import CupyConfig

    def variants(configs):
        return len({(c.row_cache, c.partials, c.prefetch) for c in configs})

    lines = ["| spec | valid configs | variants | menu | variants on the menu |", "|---|---|---|---|---|"]
    for spec in [NormSpec(op, d, "bfloat16", "bfloat16", n) for op in ("rmsnorm", "layernorm")
                 for d in ("fwd", "bwd") for n in SAMPLE_N]:
        full, menu = CupyConfig.space(spec), CupyConfig.menu(spec)
        lines.append(f"| {spec.short()} | {len(full):,} | {variants(full)} | {len(menu)} | {variants(menu)} |")
    sizes = [len(CupyConfig.menu(spec)) for spec in STANDARD.specs()]
    lines += ["", f"Over the standard grid ({len(sizes)} specs) the menu holds {sum(sizes):,} configs: "
                  f"{min(sizes)} to {max(sizes)} a spec, median {sorted(sizes)[len(sizes) // 2]}."]
    return lines


def main() -> int:
    if sys.argv[1:] == ["--menu"]:  # the CuPy menu section alone (no compiler needed)
        print("\n".join(cupy_menu()))
        return 0
    check_backends(list(BACKENDS))
    versions = toolchain(list(BACKENDS))
    grid = grid_sizes()
    pruning = sampled_pruning()
    print("\n".join([
        "# Search spaces before and after the audit", "",
        f"Made by `python scripts/pruned_spaces.py` on {datetime.date.today().isoformat()}, cross-compiled "
        f"for {ARCH} (no GPU). Toolchain: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", "",
        "## Dead knobs: the standard grid", "",
        "Triton's `num_stages` took 1, 2 or 3 wherever a loop ran. Compiled, every value gave the same",
        "PTX and no `cp.async` (loads without a dot are not pipelined; `tests/test_audit.py` checks it), so",
        "the knob was removed: the Triton space is that much smaller at no loss. CuPy and Numba had no",
        "dead knob.", "", *grid, "",
        "## CuPy: the menu the tuner times", "",
        "CuPy's valid space is thousands of configs a spec, most differing in knobs that cannot matter (a narrower",
        "vector, a fourfold unroll). The tuner times a menu instead (`CupyConfig.menu`): the widest vector, threads",
        "per row near the heuristic's, and no variant that moves more bytes where a leaner one fits; the valid",
        "domain still judges any config a database names. `python scripts/pruned_spaces.py --menu` prints this",
        "section alone.", "", *cupy_menu(), "",
        "## Configs that do not fit: a sample of specs", "",
        f"Each config compiled for {ARCH}; `prune_space` drops the ones that spill or whose block cannot be",
        "resident before the tuner times anything. Whole spaces for Triton and Numba; CuPy's are sampled",
        f"({CUPY_SAMPLE} random configs a spec), so its share is an estimate.", "", *pruning, "",
        "Whether a pruned config could have been the fastest is a GPU question: the prepared GPU session",
        "sweeps every Triton config of one spec, and its import audits the swept configs and says whether",
        "a pruned one beat every kept one (`pruning` in the search table; docs/GPU_RUNBOOK.md).", ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
