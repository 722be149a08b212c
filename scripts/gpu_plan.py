"""The dry-run plan of `autonorm tune --budget` for the standard GPU grid on an H100 or H200, without a GPU.

    python scripts/gpu_plan.py > docs/benchmarks/gpu-plan.md                  # H100 and H200, 8 minutes
    python scripts/gpu_plan.py --profiles h100-sxm --budget 480 --compile-baseline --full
    python scripts/gpu_plan.py --hidden 4096 --dtypes bfloat16                # a slice of the grid

The real planner (`autonorm.tune.plan`) with scripted costs (`autonorm.tune.dry_run`): compile seconds
measured here (`docs/benchmarks/compile-times.json`), timing seconds from the cost model and CudaTimer's
windows as --budget picks them (short; `--before`: the full ones, and the full finish), the device machine's
cores compiling in parallel. Nothing is compiled for or run on a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

from autonorm.backends import get_backend
from autonorm.device import cpu_name
from autonorm.grids import STANDARD
from autonorm.tune import dry_run as dr
from autonorm.tune import plan as planner

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "compile-times.json"
GPU_BACKENDS = ("triton", "cupy", "numba", "torch")  # autonorm's native order on CUDA (backends.DEFAULT_ORDER)


def studies(hidden: list[int] | None, dtypes: list[str] | None) -> list[tuple]:
    """(spec, rows) of the standard grid's tuning studies, in grid order, optionally sliced."""
    return [(spec, rows) for spec in STANDARD.specs()
            if (not hidden or spec.hidden in hidden) and (not dtypes or spec.x_dtype in dtypes)
            for rows in STANDARD.tune_rows_for(spec.hidden)]


def counts(plan: planner.Plan, studies=None) -> dict:
    studies = plan.studies if studies is None else studies
    run = [p for p in studies if p.status == "run"]
    return {"searched": sum(p.planned > p.seeds for p in run), "seeds only": sum(p.planned <= p.seeds for p in run),
            "left out": sum(p.status == "left out" for p in studies)}


def coverage(plan: planner.Plan) -> list[str]:
    """Per problem (op, direction, dtype): how many anchors and neighbours are searched, seeds-only, left out."""
    groups: dict[tuple, dict] = {}
    for p in plan.studies:
        role = "anchors" if p.role == "anchor" else "neighbours"
        groups.setdefault((p.spec.op, p.spec.direction, p.spec.x_dtype), {}).setdefault(role, []).append(p)
    lines = ["| problem | anchors: searched / seeds only / left out | neighbours: same |", "|---|---|---|"]
    for (op, direction, dtype), roles in groups.items():
        cells = [" / ".join(str(v) for v in counts(plan, roles.get(r, [])).values()) for r in ("anchors", "neighbours")]
        lines.append(f"| {op} {direction} {dtype} | {cells[0]} | {cells[1]} |")
    return lines


def section(run: dr.DryRun, title: str, made: str, full: bool) -> list[str]:
    plan = run.plan
    n = counts(plan)
    lines = [f"### {title}", "", made, "",
             f"{len(plan.studies)} studies; {n['searched']} searched beyond their seeds, {n['seeds only']} with "
             f"their seeds only, {n['left out']} left out.", "",
             "Spent before the plan (counted in the budget):", "", "| what | seconds |", "|---|---|"]
    lines += [f"| {what} | {s:,.0f} |" for what, s in run.spent.items()]
    lines += [f"| **total** | **{plan.spent_s:,.0f}** of {plan.budget_s:,.0f} |", ""]
    floors = sum(p.floor_s for p in plan.studies)
    finish = sum(p.finish_s for p in plan.studies)
    lines += [f"Every study's floor (seeds compiled and timed, then the finish) sums to {floors:,.0f} s, "
              f"{finish:,.0f} s of it the finishes:", "", "| part of the floors | seconds |", "|---|---|"]
    lines += [f"| {what} | {s:,.0f} |" for what, s in run.floor_parts().items()]
    lines += [f"| **total** | **{floors:,.0f}** |", ""]
    shown, which = (plan, "the studies it runs") if plan.running() else (run.unburdened, "the studies it would "
                                                                         "run with only the start-up spent")
    if shown.running():
        lines += [f"What the plan expects of {which} (compile seconds over {run.cores} cores; timing on the "
                  "one GPU):", "", "| backend | compile s | timing s |", "|---|---|---|"]
        lines += [f"| {b} | {c:,.1f} | {t:,.1f} |" for b, (c, t) in sorted(run.by_backend(shown).items())]
        running = shown.running()
        lines += [f"| finishes | | {sum(p.finish_s for p in running):,.1f} |",
                  f"| **planned total** | | **{shown.spent_s + sum(p.search_s + p.finish_s for p in running):,.1f}** "
                  f"of {shown.budget_s:,.0f} (start-up included) |", ""]
    u = counts(run.unburdened)
    lines += [f"With only the start-up spent before the plan (nothing compiled or built ahead of it), the same "
              f"studies would be planned as: {u['searched']} searched, {u['seeds only']} with their seeds only, "
              f"{u['left out']} left out:", "", *coverage(run.unburdened), ""]
    left = [p for p in plan.studies if p.status == "left out"]
    if left:
        lines += [f"First left out: {left[0].spec.short()} rows={left[0].rows}: {left[0].why}.", ""]
    text = planner.format_plan(plan, run.compile_baseline).splitlines()
    tail = 1 if run.compile_baseline else 2  # the expected seconds, and the line saying the baseline is left out
    if not full and len(text) > 42 + tail:
        text = text[:42] + [f"... ({len(text) - 42 - tail} more studies: --full prints them)", *text[-tail:]]
    return lines + ["The plan as `autonorm tune --budget` prints it:", "", "```", *text, "```", ""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="h100-sxm,h200", help=f"of {', '.join(dr.PROFILES)}")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds (default 480: 8 minutes)")
    parser.add_argument("--cores", type=int, default=16, help="the device machine's cores compiling in parallel")
    parser.add_argument("--trials", type=int, default=60, help="`autonorm tune`'s default trial budget")
    parser.add_argument("--compile-baseline", action="store_true",
                        help="as `tune --budget --compile-baseline`: every study's finish times torch.compile")
    parser.add_argument("--audit-cached", action="store_true",
                        help="what if the audit's cache already held every config (no audit compile per candidate)")
    parser.add_argument("--before", action="store_true",
                        help="as --budget ran before its short timer windows, light finish, the compile "
                             "workers' reference checks, one warm-up per spec of row-free backends, the "
                             "seeds audited together, a neighbour's lean seeds, each tier's seeds audited "
                             "together, shared check verdicts, Triton warmed per specialization class and the "
                             "spaces built over the workers")
    parser.add_argument("--hidden", type=lambda s: [int(x) for x in s.split(",")], help="slice: hidden sizes")
    parser.add_argument("--dtypes", type=lambda s: s.split(","), help="slice: dtypes")
    parser.add_argument("--compile-times", type=Path, default=FIGURES)
    parser.add_argument("--full", action="store_true", help="print every study's plan line")
    args = parser.parse_args(argv)
    names = [p for p in args.profiles.split(",") if p]
    unknown = [p for p in names if p not in dr.PROFILES]
    if unknown:
        parser.error(f"unknown profile {unknown[0]!r}; known: {', '.join(dr.PROFILES)}")
    if args.budget <= 0 or args.cores < 1 or args.trials < 1:
        parser.error("--budget must be > 0, --cores and --trials >= 1")
    try:
        figures = dr.CompileFigures.load(args.compile_times)
    except ValueError as exc:
        parser.error(str(exc))
    grid = studies(args.hidden, args.dtypes)
    if not grid:
        parser.error("the slice holds no study of the standard grid")
    backends = {name: get_backend(name) for name in GPU_BACKENDS}
    built = {}  # the spaces, built once for every profile
    worker_start_s = None if args.before else dr.measure_worker_start()  # once for every profile
    load = os.getloadavg()[0]
    what = [label for flag, label in ((args.compile_baseline, "with the torch.compile baseline"),
                                      (args.audit_cached, "audit cache warm"),
                                      (args.before,
                                       "before: full windows and finish, checks, warm-ups and audits per study"),
                                      (args.hidden or args.dtypes, f"{len(grid)} studies of the grid")) if flag]
    command = " ".join(["python scripts/gpu_plan.py", *(argv if argv is not None else sys.argv[1:])])
    made = (f"Made by `{command}` on "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} ({cpu_name()}, "
            f"{os.cpu_count()} cores, load {load:.1f}); compile figures from {figures.source}; "
            f"{args.cores} cores compiling, --trials {args.trials}.")
    out = []
    for name in names:
        profile = dr.PROFILES[name]
        run = dr.dry_run(grid, backends, profile, figures, args.budget, cores=args.cores, n_trials=args.trials,
                         compile_baseline=args.compile_baseline, audit_cached=args.audit_cached,
                         windows="full" if args.before else "short", light_finish=not args.before,
                         worker_checks=not args.before, shape_free=not args.before, audit_ahead=not args.before,
                         lean_neighbours=not args.before, audit_tiers=not args.before,
                         shared_checks=not args.before, triton_classes=not args.before,
                         parallel_spaces=not args.before, worker_start_s=worker_start_s,
                         built=built)
        out += section(run, f"{profile.name}, {args.budget:.0f} s" + "".join(f", {w}" for w in what), made, args.full)
        out += [f"Device profile: {profile.sm_count} SMs, {profile.copy_gbps / 1e3:.2f} TB/s, "
                f"{profile.l2_bytes >> 20} MiB L2, {profile.smem_per_sm >> 10} KiB shared memory per SM, "
                f"{profile.memory_bytes / 1e9:.0f} GB. Sources: {profile.sources}.", ""]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
