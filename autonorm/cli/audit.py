"""`autonorm audit`: cross-compile kernels for sm_80/sm_90 (no GPU) and report how they fit the hardware.

What is compiled and how is `autonorm.audit`; this module picks the jobs (a grid's
heuristics, a spec's space, or a database's records), runs them, and prints a table,
JSON lines or the hardware-fit page, or holds them against a saved report made with
another compiler version (`--against`).
"""
from __future__ import annotations

import json
import sys

from ..audit import (
    ARCHS,
    BACKENDS,
    AuditToolError,
    audit,
    cached,
    check_backends,
    compare,
    database_jobs,
    doc,
    gate_failures,
    heuristic_jobs,
    load_report,
    save_report,
    saved_toolchain,
    space_jobs,
    table,
    toolchain,
)
from ..spec import NormSpec


def add_arguments(parser) -> None:
    parser.add_argument("--arch", default="sm_80,sm_90", help=f"comma-separated, of {', '.join(ARCHS)}")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, of triton, cupy, numba")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--grid", default=None, help="heuristics of every spec of a grid, standard or quick "
                                                    "(default: quick, when neither --db nor --hidden is given)")
    what.add_argument("--db", default=None, metavar="PATH", help="every record of a tuning database")
    what.add_argument("--hidden", type=int, default=None, help="one spec (with --op/--direction/--dtype)")
    parser.add_argument("--dtypes", default=None, help="with --grid: only these dtypes (comma-separated)")
    parser.add_argument("--op", default="rmsnorm", choices=("rmsnorm", "layernorm"), help="with --hidden: the norm")
    parser.add_argument("--direction", default="fwd", choices=("fwd", "bwd"),
                        help="with --hidden: forward or backward kernel")
    parser.add_argument("--dtype", default="bfloat16", help="with --hidden: the input dtype")
    parser.add_argument("--space", action="store_true", help="with --hidden: the spec's whole search space")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel instead of a table")
    parser.add_argument("--markdown", action="store_true", help="the table as Markdown")
    parser.add_argument("--cached-only", action="store_true",
                        help="report only kernels already in the audit cache (compile nothing)")
    parser.add_argument("--doc", action="store_true",
                        help="a Markdown page: toolchain, then one table per backend (docs/benchmarks/hardware-fit.md)")
    parser.add_argument("--save", default=None, metavar="PATH",
                        help="also write every profile, keyed by what was compiled, as JSON "
                             "(docs/benchmarks/hardware-fit.json: the CI gate reads it)")
    parser.add_argument("--against", default=None, metavar="PATH",
                        help="compare with a saved report (e.g. docs/benchmarks/hardware-fit.json, made with "
                             "another compiler version): the kernels whose fit, occupancy or spills changed; "
                             "exit status 1 if one that fits there does not fit here")


def _requested_jobs(args, archs: list[str], backends: list[str]) -> list:
    """The kernels the command line asks for: a database's records, one spec (heuristic or whole space), or a
    grid's heuristics. A bad value raises ValueError."""
    from ..grids import get
    from ..spec import dtype_name

    for a in archs:
        if a not in ARCHS:
            raise ValueError(f"unknown --arch {a!r}: expected some of {', '.join(ARCHS)}")
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"backend {b!r} has no GPU compiler to audit: expected some of {', '.join(BACKENDS)}")
    if args.db:
        return database_jobs(args.db, archs, backends)
    if args.hidden is not None:
        dt = dtype_name(args.dtype)
        spec = NormSpec(args.op, args.direction, dt, dt, args.hidden)
        return space_jobs(spec, backends, archs) if args.space else heuristic_jobs([spec], backends, archs)
    specs = get(args.grid or "quick").specs()
    if args.dtypes:
        wanted = {dtype_name(d.strip()) for d in args.dtypes.split(",")}
        specs = [s for s in specs if s.x_dtype in wanted]
    return heuristic_jobs(specs, backends, archs)


def main(args) -> int:
    try:
        archs = [a.strip() for a in args.arch.split(",") if a.strip()]
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        jobs = _requested_jobs(args, archs, backends)
        saved = load_report(args.against) if args.against else None
        check_backends(sorted({j.backend for j in jobs}))
    except AuditToolError as exc:  # a compiler is missing: exit 1, as for bad data
        print(f"autonorm audit: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:  # a bad value, an unreadable database or report (a ReportError)
        print(f"autonorm audit: error: {exc}", file=sys.stderr)
        return 2
    print(f"autonorm audit: {len(jobs)} kernels ({', '.join(backends)} x {', '.join(archs)})", file=sys.stderr)
    if args.cached_only:
        requested = len(jobs)
        # Whole specs only (every arch present), so the page's rows are complete.
        found = {(j.backend, j.spec, j.arch): (j, p) for j, p in cached(jobs)}
        complete = {(j.backend, j.spec) for j in jobs if all((j.backend, j.spec, a) in found for a in archs)}
        pairs = [found[(j.backend, j.spec, j.arch)] for j in jobs if (j.backend, j.spec) in complete]
        jobs, profiles = [j for j, _ in pairs], [p for _, p in pairs]
        print(f"autonorm audit: {len(jobs)} of {requested} kernels are cached; the others are left out",
              file=sys.stderr)
    else:
        profiles = audit(jobs)
    if args.save:
        save_report(args.save, jobs, profiles, toolchain(backends), " ".join(["autonorm audit", *sys.argv[2:]]))
        print(f"autonorm audit: {len(jobs)} profiles written to {args.save}", file=sys.stderr)
    if saved is not None:
        text, lost = compare(jobs, profiles, saved)
        print(f"against {args.against} ({_versions(saved_toolchain(args.against))}); "
              f"here: {_versions(toolchain(backends))}")
        print(text)
        return 1 if lost else 0
    bad = 0
    for job, p in zip(jobs, profiles):
        bad += bool(gate_failures(p, job.spec))
    if args.doc:
        print(doc(jobs, profiles, toolchain(backends), " ".join(["autonorm audit", *sys.argv[2:]])))
        if args.cached_only and len(jobs) < requested:
            print(f"\nThis page holds {len(jobs)} of the {requested} kernels requested (those compiled so far);"
                  " rerun without --cached-only for the rest.")
    elif args.json:
        for job, p in zip(jobs, profiles):
            print(json.dumps({**p.to_json(), "problems": gate_failures(p, job.spec)}))
    else:
        print(table(profiles, markdown=args.markdown))
        print(f"\n{len(profiles) - bad} of {len(profiles)} fit (no spill, resident, 128-bit loads of aligned x); "
              f"toolchain {json.dumps(toolchain(backends))}", file=sys.stderr)
    return 0


def _versions(versions: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items()) or "toolchain not recorded"
