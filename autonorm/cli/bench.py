"""`autonorm bench`: time autonorm's dispatched kernels against torch eager, torch.compile, Liger and quack.

The measuring is `autonorm.bench` (providers as data, the tuner's timing protocol,
one JSON row per case and implementation); this module turns the command line into
cases, prints the rows as they come, and writes the JSON and the report.
`--grid standard|quick` takes its cases from autonorm/grids.py; `--resume` and
`--time-limit` make long grids resumable; `--report DIR` writes the markdown tables
and PNG plots (autonorm/bench/report.py).
"""
from __future__ import annotations

import os
import tempfile

from ..bench.options import DEFAULT_SHAPES, PROVIDER_NAMES, parse_shape
from .args import UsageError, add_device, add_list, backend_names, device_arg, dtype_names


def add_arguments(p) -> None:
    add_list(p, "--ops", default=["rmsnorm", "layernorm"], choices=["rmsnorm", "layernorm"])
    add_list(p, "--dtypes", default=["float32", "bfloat16"],
             help="input dtypes (float32, float16, bfloat16 or fp32 ...)")
    add_list(p, "--shapes", default=list(DEFAULT_SHAPES), help="ROWSxHIDDEN, e.g. 8192x4096")
    add_list(p, "--directions", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    p.add_argument("--grid", choices=["standard", "quick"],
                   help="take ops, directions, dtypes and shapes from autonorm/grids.py (overrides those options)")
    add_list(p, "--providers", default=list(PROVIDER_NAMES),
             help=f"what to compare (missing packages are skipped): {', '.join(PROVIDER_NAMES)}")
    add_list(p, "--backends", "--backend", dest="backends",
             help="force one autonorm backend (as AUTONORM_BACKEND; default: the dispatcher's choice)")
    add_device(p)
    p.add_argument("--reps", type=int, default=20, help="timed calls per implementation and case (CPU; "
                                                        "on CUDA repetitions are sized by time)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per implementation and case")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compile takes minutes)")
    p.add_argument("--copy-bw", type=float, metavar="GBPS",
                   help="copy bandwidth to divide by (e.g. from an earlier probe) instead of measuring it")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON (after every case)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --json and skip their cases")
    p.add_argument("--time-limit", type=float, metavar="S",
                   help="start no new case after S seconds; exit status 3 when cases are left")
    p.add_argument("--report", metavar="DIR", help="write DIR/<device-slug>.md and PNG plots from the rows")
    p.add_argument("--input", nargs="+", metavar="JSON",
                   help="with --report: make the report from these bench JSON files, measuring nothing")
    p.add_argument("--db", metavar="PATH", help="with --report: a tuning database to summarize too")


def cases_from_args(args):
    """[(spec, rows)] in run order."""
    from .. import grids
    from ..spec import NormSpec

    if args.grid:
        return grids.get(args.grid).bench_cases()
    try:
        shapes = [parse_shape(shape) for shape in args.shapes]
    except ValueError as exc:
        raise UsageError(f"--shapes: {exc}") from None
    out = []
    for op in args.ops:
        for direction in args.directions:
            for dname in dtype_names(args.dtypes):
                for rows, hidden in shapes:
                    try:
                        out.append((NormSpec(op, direction, dname, dname, hidden), rows))
                    except ValueError as exc:
                        raise UsageError(f"--shapes {rows}x{hidden}: {exc}") from None
    return out


def prepare_outputs(args) -> None:
    """Make the folders of --json and --report before anything is measured (a missing folder once cost a
    329 s run at its end), and refuse paths that cannot be written, as a usage error."""
    if args.json:
        if os.path.isdir(args.json):
            raise UsageError(f"--json {args.json}: is a folder; name a file, "
                             f"e.g. {os.path.join(args.json, 'bench.json')}")
        _make_folder("--json", args.json, os.path.dirname(args.json) or ".")
        try:  # the rows are written through this file after every case
            with open(f"{args.json}.tmp", "w"):
                pass
            os.remove(f"{args.json}.tmp")
        except OSError as exc:
            raise UsageError(f"--json {args.json}: cannot be written ({exc.strerror or exc})") from None
    if args.report:
        _make_folder("--report", args.report, args.report)


def _make_folder(option: str, value: str, folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{option} {value}: cannot make the folder {folder} ({exc.strerror or exc})") from None


def _make_report(args, json_paths: list[str]) -> None:
    from ..bench import report

    for path in report.write_report(json_paths, args.report, db_path=args.db):
        print(f"wrote {path}")


def main(args) -> int:
    import torch

    from .. import device as device_mod
    from .. import dispatch, measure
    from ..bench import run
    from ..bench.providers import check_providers
    from ..bench.rows import BenchFileError

    if args.input:
        if not args.report:
            raise UsageError("--input needs --report DIR")
        prepare_outputs(args)
        _make_report(args, args.input)
        return 0
    try:
        providers = check_providers(list(args.providers))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.no_compile and "torch.compile" in providers:
        providers.remove("torch.compile")
    if "torch" not in providers:
        providers.insert(0, "torch")  # every row's speedup_vs_torch divides by it
    if args.backends:
        if len(args.backends) > 1:
            raise UsageError(f"--backends: bench forces one autonorm backend at a time, got {', '.join(args.backends)}")
        os.environ["AUTONORM_BACKEND"] = backend_names(args.backends, None)[0]
        dispatch.reset()
    dev = device_arg(args.device)
    cases = cases_from_args(args)  # bad values fail here, before any probe
    prepare_outputs(args)
    ident = device_mod.identity(dev)
    bw = args.copy_bw or measure.copy_bandwidth(dev)
    timer = run.timer_for(dev, args.reps, args.warmup)
    rows_out, skipped = [], {}
    if args.resume and args.json and os.path.exists(args.json):
        try:
            rows_out, skipped = run.load_previous(args.json, ident["slug"])
        except BenchFileError:
            raise  # a file that is not bench rows: a data error (exit 1), printed in one line
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    doc = run.new_document(dev, timer, bw, providers, rows_out, skipped)
    done = {r["case"] for r in rows_out}
    print(f"# {ident['name']} ({ident['slug']}), copy bandwidth {bw:.1f} GB/s, torch threads "
          f"{torch.get_num_threads()}; {len(cases)} cases ({len(done & {run.case_name(s, r) for s, r in cases})} done)")
    print(run.HEADER)
    left = run.run_cases(cases, dev, timer, providers, doc, json_path=args.json, time_limit=args.time_limit,
                         on_row=lambda line: print(line, flush=True))
    if args.json:
        run.write_json(args.json, doc)
        print(f"wrote {len(doc['rows'])} rows to {args.json}")
    if args.report:
        if args.json:
            _make_report(args, [args.json])
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "bench.json")
                run.write_json(path, doc)
                _make_report(args, [path])
    if left:
        print(f"autonorm bench: time limit reached, {left} cases left (run again with --resume)")
        return 3
    return 0
