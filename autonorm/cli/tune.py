"""`autonorm tune`: tune this machine's kernels over a grid of specs and write a tuning database.

The search itself is `autonorm.tune` (one Optuna study per spec and rows bucket,
resumable; see its package docstring); this module turns the command line into
specs, prints the plan and the summary table, and says where the database went.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import TuneOptionError
from ..spec import NormSpec
from ..tune import fleet, quality
from ..tune.options import StudyOptions, budgeted, default_compile_workers
from ..tune.presets import DEFAULT_FEATURES, DEFAULTS, QUICK
from .args import UsageError, add_device, add_list, device_arg, dtype_names, positive_int

if TYPE_CHECKING:  # the tuner's modules import torch: only the summary's type is named here
    from ..tune.finalize import StudyResult

LONG_RUN_S = 300  # above this worst case, the run's size and estimate are printed before it starts


def add_arguments(p) -> None:
    def preset(name):
        def text(v):
            return ",".join(map(str, v)) if isinstance(v, list) else f"{v:g}"
        return f"default {text(DEFAULTS[name])}; --quick: {text(QUICK[name])}"

    add_list(p, "--ops", choices=("rmsnorm", "layernorm"), help=preset("ops"))
    add_list(p, "--directions", choices=("fwd", "bwd"), help=preset("directions") + " plus one backward")
    add_list(p, "--dtypes", help=f"input dtypes, float32, float16, bfloat16 or fp32... ({preset('dtypes')})")
    p.add_argument("--weight-dtype", choices=("same", "float32"), default="same",
                   help="weight dtype: the input's or float32")
    add_list(p, "--features", help="feature tags such as weight, weight+bias, weight+residual, weight+cast_llama, "
                                   "none (default: weight for rmsnorm and weight+bias for layernorm, as torch.nn's "
                                   "modules); a tag invalid for one op is skipped for it")
    add_list(p, "--hidden", kind=positive_int, help=f"hidden sizes N ({preset('hidden')})")
    add_list(p, "--rows", kind=positive_int,
             help=f"row counts, each recorded under its power-of-two bucket ({preset('rows')})")
    add_list(p, "--backends", help="candidate backends (default: those that run natively here)")
    p.add_argument("--trials", type=positive_int, help=f"trial budget per study ({preset('trials')})")
    p.add_argument("--time-budget", type=float, help=f"seconds per study ({preset('time_budget')})")
    p.add_argument("--budget", type=duration,
                   help="the whole run's time, e.g. 10m, 90s, 1h: a plan divides it across the studies (printed "
                        "first), the cost model's best candidates are timed first, and the run ends within it, "
                        "start-up and the bandwidth probe included; the same command resumes")
    p.add_argument("--patience", type=positive_int, help="stop a TPE study after this many trials without a 0.5%% gain")
    p.add_argument("--storage", help="Optuna storage URL (sqlite:///x.db, postgresql://...) or a journal file path "
                                     "(default: OUT/.autonorm-journal/<device-slug>.optuna.journal)")
    p.add_argument("--out", help="output folder, never a file; the database is OUT/<device-slug>.json (default: "
                                 "this user's database folder, read automatically by the dispatcher; see "
                                 "`autonorm db where`)")
    p.add_argument("--heartbeat", type=positive_int, default=fleet.HEARTBEAT_S,
                   help=f"seconds between a worker's heartbeats on a URL storage; a trial silent for "
                        f"{fleet.GRACE_BEATS} of them returns to the queue")
    add_device(p)
    p.add_argument("--quick", action="store_true",
                   help="a small grid that finishes in a few minutes on a 2-core CPU")
    p.add_argument("--strict", action="store_true",
                   help="refuse to record a study whose measurements stay noisy (default: record it flagged "
                        "low-confidence, with a warning)")
    p.add_argument("--no-compile-baseline", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--compile-baseline", action="store_true",
                   help="with --budget: time the torch.compile baseline too (left out by default: a reference "
                        "figure that costs about 10 s a study)")
    p.add_argument("--compile-workers", type=positive_int,
                   help=f"processes compiling candidates ahead of the serial timer, into the compilers' disk caches "
                        f"(threads for a backend without one; default {default_compile_workers()})")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are off when stderr is not a terminal)")


def duration(text: str) -> float:
    """Seconds from `90`, `90s`, `10m` or `1h` (argparse type for --budget)."""
    import argparse

    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text[-1:].lower() in units else (text, "s")
    try:
        seconds = float(number) * units[unit.lower()]
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is no duration: give seconds or a number with s, m or h (10m)")
    return seconds


def _feature_kwargs(tag: str) -> dict:
    try:
        return NormSpec.feature_kwargs(tag)
    except ValueError as exc:
        raise UsageError(f"--features: {exc}") from None


def specs_from_args(args) -> list[NormSpec]:
    """The specs to tune; every bad or useless value is a UsageError (a typo never tunes nothing quietly)."""
    from ..spec import MAX_HIDDEN

    preset = QUICK if args.quick else DEFAULTS
    ops = args.ops or preset["ops"]
    directions = args.directions or preset["directions"]
    hidden = args.hidden or preset["hidden"]
    too_big = [n for n in hidden if n > MAX_HIDDEN]
    if too_big:
        raise UsageError(f"--hidden {too_big[0]} is above the kernels' maximum {MAX_HIDDEN}")
    tags = args.features or None
    for tag in tags or ():
        _feature_kwargs(tag)
    studies = [(op, d, n) for op in ops for d in directions for n in hidden]
    if preset.get("quick_backward") and args.directions is None:
        studies.append((ops[0], "bwd", hidden[0]))  # --quick: the backward of one shape
    specs, used = [], set()
    for op, direction, n in studies:
        for x in dtype_names(args.dtypes or preset["dtypes"]):
            w = "float32" if args.weight_dtype == "float32" else x
            for tag in tags or [DEFAULT_FEATURES[op]]:
                features = _feature_kwargs(tag)
                try:
                    spec = NormSpec(op, direction, x, w if features["weight"] else x, n, **features)
                except ValueError:
                    continue  # e.g. bias on RMSNorm: that tag is for the other op
                used.add(tag)
                if spec not in specs:  # e.g. cast_llama in fp32 is the plain spec
                    specs.append(spec)
    unused = [t for t in tags or () if t not in used]
    if unused:
        raise UsageError(f"--features {', '.join(unused)}: valid for none of --ops {', '.join(ops)} "
                         f"(bias is a LayerNorm feature, offset an RMSNorm one)")
    return specs


def format_table(results: list[StudyResult]) -> str:
    """The summary: one row per study; `spread` is the winner's p80/p20, `(low)` marks a low-confidence record."""
    rows = [("spec", "rows", "winner", "config", "us", "spread", "GB/s", "%copy", "x eager", "x compile", "trials")]
    for r in results:
        rec = r.record
        if rec is None:
            why = ("(refused: noisy measurements)" if r.refused else f"(finalized by {r.finalized_by})"
                   if r.finalized_by else "(none: every candidate failed)" if r.failed
                   else "(none: the budget ran out before its first candidate)" if r.completeness == "budget"
                   else "(none: no candidate timed)")
            rows.append((r.spec.short(), str(r.rows), why, "", "", "", "", "", "", "", str(r.trials)))
            continue
        w = rec.winner
        eager = rec.baselines["torch_eager"]["median_us"] / w.median_us
        comp = rec.baselines.get("torch_compile")
        low = " (low)" if (rec.quality or {}).get("confidence") == "low" else ""
        rows.append((r.spec.short(), str(r.rows), w.backend, w.config.short(), f"{w.median_us:.1f}",
                     f"{quality.spread(w):.2f}{low}",
                     f"{w.gbps:.1f}", _pct_copy(w.pct_copy_bw),
                     f"{eager:.2f}", f"{comp['median_us'] / w.median_us:.2f}" if comp else "-",
                     f"{r.trials} ({len(r.failed)} failed)" + (f" {r.completeness}" if r.completeness else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(wd) for cell, wd in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


def _pct_copy(pct: float | None) -> str:
    """A winner's share of the copy bandwidth; `cache` above 100%: its inputs stayed in a cache, and a DRAM
    copy probe is no roofline for it (as in `autonorm bench`)."""
    return "-" if pct is None else "cache" if pct > 100 else f"{pct:.0f}"


def options_from_args(args, device_type: str = "cuda") -> StudyOptions:
    """How every study of this run searches on a `device_type` device; a value no study can use is a UsageError
    naming its flag."""
    given = {"trials": args.trials, "time_budget": args.time_budget, "patience": args.patience,
             "compile_workers": args.compile_workers}
    make = StudyOptions.quick if args.quick else StudyOptions  # a flag left out keeps its default there
    if args.compile_baseline and args.no_compile_baseline:
        raise UsageError("give --compile-baseline or --no-compile-baseline, not both")
    # Under --budget the baseline is asked for (docs/benchmarks/planner.md); otherwise it is left out on request.
    baseline = args.compile_baseline if args.budget is not None else not args.no_compile_baseline
    try:
        changes = budgeted(device_type) if args.budget is not None else {}
        return make(**{k: v for k, v in given.items() if v is not None},
                    compile_baseline=baseline, strict=args.strict, **changes)
    except TuneOptionError as exc:
        raise UsageError(f"--{exc.option.replace('_', '-')} {given.get(exc.option)}: must be {exc.meaning}") from None


def _estimate(studies: int, options: StudyOptions) -> str:
    worst = studies * options.time_budget
    return (f"{studies} studies of up to {options.trials} trials; at most {worst / 60:.0f} min "
            f"(each study stops within its {options.time_budget:.0f} s --time-budget)")


def _where_used(db_path: Path) -> str:
    """What the dispatcher does with a database written to `db_path` (for tune's last line)."""
    from .. import settings

    folder = db_path.parent.resolve()
    if folder == settings.user_db_dir().resolve():
        return "the next `import autonorm` on this machine uses it (`autonorm db where` lists what is loaded)"
    if any(folder == p.resolve() or db_path.resolve() == p.resolve() for p in settings.db_paths()):
        return "AUTONORM_DB_PATH names it, so the next `import autonorm` uses it"
    return (f"to use it, set AUTONORM_DB_PATH={folder} or call autonorm.load_db({str(db_path)!r}) "
            f"(without --out, tune writes where autonorm looks by default)")


def was_interrupted(exc: BaseException) -> bool:
    """Whether `exc` is a Ctrl-C or was raised while one was being handled. Optuna's journal lock releases
    itself when interrupted inside `acquire`, and that release can fail (FileNotFoundError on
    `*.optuna.journal.lock`), so the error that reaches us is not the KeyboardInterrupt but carries it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def out_folder(value: str) -> Path:
    """The folder --out names. It is always a folder (the database in it is named after the device, so one
    folder holds a fleet's several GPU kinds): an existing file, or a new name ending in `.json`, is refused
    before anything runs rather than ending in NotADirectoryError or a folder called `mydb.json`."""
    out = Path(value).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {value}: is a file; --out names a folder, and the database is "
                         f"OUT/<device-slug>.json (`autonorm db merge` combines files)")
    if not out.exists() and out.suffix == ".json":
        raise UsageError(f"--out {value}: --out names a folder, and the database is OUT/<device-slug>.json; "
                         f"give a folder, e.g. --out {out.with_suffix('')}")
    return out


def main(args) -> int:
    import optuna
    from tqdm import tqdm

    from .. import measure, settings
    from ..db_folder import side_folder
    from ..device import identity
    from ..errors import UnknownBackendError
    from ..tune import make_storage, native_backends, tune_grid
    from ..tune.journal import JournalError
    from ..tune.run import time_summary

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    preset = QUICK if args.quick else DEFAULTS
    device = device_arg(args.device)
    specs = specs_from_args(args)
    row_counts = args.rows or preset["rows"]
    options = options_from_args(args, device.type)
    if args.budget is not None and args.time_budget is not None:
        raise UsageError("--budget divides the run's time across the studies itself; give it or --time-budget")
    try:
        backends = native_backends(device, args.backends)
    except UnknownBackendError as exc:
        raise UsageError(f"--backends: {exc}") from None
    if not backends:
        raise UsageError(f"no candidate backend can run natively on {device}")

    ident = identity(device)
    out = out_folder(args.out) if args.out else settings.user_db_dir()
    db_path = out / f"{ident['slug']}.json"
    journal = side_folder(out) / f"{ident['slug']}.optuna.journal"
    try:  # a bad storage URL or a missing driver fails here, in one line, before the bandwidth probe
        storage = make_storage(args.storage, journal, heartbeat_s=args.heartbeat)
    except JournalError as exc:
        raise UsageError(str(exc)) from None
    except Exception as exc:  # drivers raise their own kinds (sqlalchemy, psycopg): all are a bad --storage
        raise UsageError(f"--storage {args.storage}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    studies = len(specs) * len(row_counts)
    estimate = _estimate(studies, options)
    if args.budget is None and studies * options.time_budget > LONG_RUN_S:
        print(f"autonorm tune: {estimate}; Ctrl-C stops it and the same command resumes", file=sys.stderr)
    timer = measure.timer_for(device, options.windows)
    copy_gbps = measure.copy_bandwidth(device)
    lock_path = None if fleet.is_url(args.storage) else Path(str(args.storage or journal) + ".autonorm-lock")
    print(f"autonorm tune: {studies} studies on {ident['name']} ({device}); backends: {', '.join(backends)}; "
          f"copy bandwidth {copy_gbps:.1f} GB/s; database {db_path}", file=sys.stderr)

    no_bars = args.no_progress or not sys.stderr.isatty()  # escape codes would fill a log file
    results: list[StudyResult] = []
    overall = tqdm(total=studies, desc="studies", position=0, disable=no_bars)

    def study_bar(total, desc):
        overall.update(len(results) - overall.n)  # the studies finished so far
        return tqdm(total=total, desc=desc, position=1, leave=False, disable=no_bars)

    try:
        db = tune_grid(specs, row_counts, backends, device, options, db_path=db_path, storage=storage,
                       lock_path=lock_path, results=results, copy_gbps=copy_gbps, timer=timer, progress=study_bar,
                       budget_s=args.budget, show_plan=lambda text: print(text, file=sys.stderr))
    except BaseException as exc:
        if not was_interrupted(exc):
            raise
        overall.close()
        print(format_table(results))
        saved = sum(r.record is not None for r in results)
        print(f"\nautonorm tune: interrupted after {len(results)} of {studies} studies; {saved} records "
              f"saved to {db_path}. Run the same command again to resume: finished studies are re-recorded "
              f"from {args.storage or journal} without timing their trials again.", file=sys.stderr)
        return 130
    overall.update(len(results) - overall.n)
    overall.close()
    if args.budget is not None and not results:
        print("autonorm tune: the budget left no study time to run (the plan above says what each needed); "
              "nothing was written. Give a larger --budget.", file=sys.stderr)
        return 1
    print(format_table(results))
    print(f"autonorm tune: {time_summary(results)}", file=sys.stderr)
    refused = [r for r in results if r.refused]
    if refused:
        print(f"\n{len(refused)} noisy studies not recorded (--strict); {quality.load_average()}", file=sys.stderr)
    print(f"\nwrote {db_path} ({len(db.records)} records this run); {_where_used(db_path)}")
    return 0 if all(r.record is not None or r.finalized_by for r in results) else 1
