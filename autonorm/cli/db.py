"""`autonorm db show|validate|merge|diff|where|export`: inspect, combine and locate tuning databases.

Exit status: 0 when all is well; 1 for bad data: a database that is invalid or
unreadable (printed as `autonorm db: error: ...` or `INVALID: ...`), with
`validate --strict` one that holds stale records, and a `diff` that finds
differences; 2 for a usage error (a bad command line). Without a path, `show` and
`validate` act on the databases `autonorm db where` lists.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from ..db import MERGE_RULE, TuningDB
from ..device import stale_compiler
from ..errors import DatabaseError


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print a database's device, versions and records (default: every "
                                       "database `db where` lists)")
    show.add_argument("paths", nargs="*", metavar="path")
    validate = sub.add_parser("validate", help="check databases (files or folders) against the schema and every "
                                               "config's domain, and report stale records (default: every "
                                               "database `db where` lists)")
    validate.add_argument("paths", nargs="*", metavar="path")
    validate.add_argument("--strict", action="store_true",
                          help="also fail on stale records (tuned for kernels that have changed since)")
    merge = sub.add_parser("merge", help="merge databases of one device",
                           description="Merge tuning databases of one device into one file. " + MERGE_RULE
                           + " An existing output file is merged in too; one of another device is refused.")
    merge.add_argument("paths", nargs="+")
    merge.add_argument("-o", "--out", required=True, help="output file (may be one of the inputs)")
    export = sub.add_parser("export", help="write OUT/<device>.json from the finalized studies of an Optuna storage")
    export.add_argument("--storage", required=True, help="the fleet's storage URL (postgresql://..., sqlite:///...)")
    export.add_argument("--out", default="tuning_db", help="output folder (default tuning_db)")
    diff = sub.add_parser("diff", help="compare the records of two databases")
    diff.add_argument("old")
    diff.add_argument("new")
    sub.add_parser("where", help="list the databases the dispatcher loads here, in order (later ones win)")


def _entry(e) -> str:
    pct = "" if e.pct_copy_bw is None else (f", {e.pct_copy_bw:.0f}% copy bw" if e.pct_copy_bw <= 100 else
                                            ", cache-resident (faster than the DRAM copy probe)")
    return (f"{e.backend}[{e.config.short()}] {e.median_us:.2f} us ({e.p20_us:.2f}-{e.p80_us:.2f}), "
            f"{e.gbps:.1f} GB/s{pct}")


def _speedup(baseline_us: float, us: float) -> str:
    # The schema allows a zero time (a measurement below the timer's resolution): no ratio then.
    return f"x{baseline_us / us:.2f}" if us > 0 else "x? (zero time)"


def _printable(text: str) -> str:
    # The name is free text from an untrusted file: escape control characters (no terminal escape sequences).
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def show(db: TuningDB, out=None) -> None:
    out = out or sys.stdout
    d = db.device
    print(f"device: {_printable(d['name'])} ({d['slug']}, {d['kind']}, cc {d['compute_capability']}, "
          f"{d['sm_count']} SMs/cores, L2 {d['l2_bytes']} B, copy {d['copy_gbps']} GB/s)", file=out)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in db.versions.items() if v is not None), file=out)
    print(f"records: {len(db.records)}", file=out)
    for key in sorted(db.records):
        rec = db.records[key]
        comp = rec.baselines.get("torch_compile")
        vs = f"{_speedup(rec.baselines['torch_eager']['median_us'], rec.winner.median_us)} vs eager" + (
            f", {_speedup(comp['median_us'], rec.winner.median_us)} vs compile" if comp else "")
        stale = stale_compiler(rec.winner.backend, db.versions)
        fit = rec.profile
        fit = (f"; {fit['arch']}: {fit['registers']} regs, {fit['spill_bytes']} B spilled, "
               f"{fit['occupancy']:.0%} occupancy" if fit else "")
        low = (f" [LOW CONFIDENCE: noisy measurements, spread {rec.quality.get('spread', 0):.2f}"
               + (f", {_printable(str(rec.quality['load']))}" if rec.quality.get("load") else "") + "]"
               if (rec.quality or {}).get("confidence") == "low" else "")
        search = f" ({rec.completeness})" if rec.completeness else ""  # how complete the search was
        print(f"  {key.short()}: {_entry(rec.winner)}; {vs}; {rec.trials} trials{search}, {rec.failed} failed, "
              f"{rec.date}{fit}" + (f" [STALE: tuned under another compiler, {stale}]" if stale else "")
              + low, file=out)


def diff(old: TuningDB, new: TuningDB, out=None) -> int:
    """Print added, removed and changed records; returns how many differ."""
    out = out or sys.stdout
    changes = 0
    for key in sorted(set(old.records) | set(new.records)):
        a, b = old.records.get(key), new.records.get(key)
        if a is None:
            print(f"+ {key.short()}: {_entry(b.winner)}", file=out)
        elif b is None:
            print(f"- {key.short()}: {_entry(a.winner)}", file=out)
        elif (a.winner.backend, a.winner.config) != (b.winner.backend, b.winner.config) \
                or a.template_hash != b.template_hash:
            ratio = a.winner.median_us / b.winner.median_us if b.winner.median_us else float("inf")
            print(f"~ {key.short()}: {_entry(a.winner)} -> {_entry(b.winner)} (x{ratio:.2f})", file=out)
        else:
            continue
        changes += 1
    print(f"{changes} record(s) differ", file=out)
    return changes


def _database_files(paths: list[str]) -> list[Path]:
    """Files named, and every `*.json` in folders named (a folder's non-database JSON is skipped)."""
    from ..db_sources import not_a_database

    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for p in sorted(path.glob("*.json")):
                if not_a_database(p):
                    print(f"{p}: skipped: JSON that is not a tuning database (no schema_version)", file=sys.stderr)
                else:
                    files.append(p)
        else:
            files.append(path)
    return files


def stale_records(db: TuningDB) -> tuple[Counter, int]:
    """(why -> count) of records the dispatcher would skip here, and how many of those are stale.

    Stale: the record's backend runs here but its kernels changed since tuning (template hash).
    Records of backends unavailable here (a GPU database on a CPU machine) are counted, not stale."""
    from ..db_sources import why_unusable

    checks: dict = {}
    why = Counter(problem for problem in (why_unusable(r, checks) for r in db.records.values()) if problem)
    return why, sum(n for problem, n in why.items() if problem.startswith("stale"))


def validate(paths: list[str], strict: bool) -> int:
    files = _database_files(paths)
    if not files:
        print("autonorm db validate: no tuning database found", file=sys.stderr)
        return 1
    bad = 0
    for path in files:
        try:
            db = TuningDB.load(path)
        except DatabaseError as exc:
            print(f"INVALID: {exc}", file=sys.stderr)
            bad += 1
            continue
        skipped, stale = stale_records(db)
        notes = "".join(f"; {n} x {problem}" for problem, n in skipped.items())
        status = "STALE" if stale and strict else "OK"
        print(f"{path}: {status} ({len(db.records)} records, device {db.device['slug']}{notes})")
        bad += stale > 0 and strict
    return 1 if bad else 0


def where(out=None) -> None:
    from .. import db_sources, settings
    from ..device import identity

    out = out or sys.stdout
    print(f"this machine: {identity('cpu')['slug']} (cpu)" + "".join(
        f", {identity(f'cuda:{i}')['slug']} (cuda:{i})" for i in range(_cuda_count())), file=out)
    print(f"user folder (AUTONORM_USER_DB_DIR, where `autonorm tune` writes): {settings.user_db_dir()}", file=out)
    found = db_sources.sources()
    print("databases, in load order (a later one wins on equal device and key):" if found else
          "databases: none", file=out)
    for origin, path, _ in found:
        try:
            db = TuningDB.load(path)
            what = f"{db.device['slug']}, {len(db.records)} records"
        except DatabaseError as exc:
            what = f"unreadable: {exc}"
        print(f"  [{origin}] {path} ({what})", file=out)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def listed_databases() -> list[str]:
    """The files `autonorm db where` lists (what `show` and `validate` act on without a path)."""
    from .. import db_sources

    return [str(path) for _, path, _ in db_sources.sources(lenient=True)]


def main(args) -> int:
    # A DatabaseError (a corrupt or unreadable file) is printed by autonorm.cli.main: `autonorm db: error: ...`, exit 1.
    if args.db_command in ("show", "validate") and not args.paths:
        args.paths = listed_databases()
        if not args.paths:
            print(f"autonorm db {args.db_command}: no databases here (`autonorm db where` lists none); "
                  f"name a file or folder", file=sys.stderr)
            return 1
    if args.db_command == "show":
        files = _database_files(args.paths)
        for number, path in enumerate(files):
            if len(files) > 1:
                print(("\n" if number else "") + f"== {path}")
            show(TuningDB.load(path))
    elif args.db_command == "validate":
        return validate(args.paths, args.strict)
    elif args.db_command == "where":
        where()
    elif args.db_command == "merge":
        paths = list(args.paths)
        if Path(args.out).exists() and not any(Path(p).resolve() == Path(args.out).resolve() for p in paths):
            paths.insert(0, args.out)  # its records compete by the same rule, not silently by order
        dbs = [TuningDB.load(p) for p in paths]
        merged = dbs[0]
        for other in dbs[1:]:
            merged.merge(other)
        merged.save(args.out)
        print(f"wrote {args.out} ({len(merged.records)} records)")
    elif args.db_command == "export":
        from ..tune.fleet import export_databases

        for slug, count in export_databases(args.storage, Path(args.out)).items():
            print(f"wrote {Path(args.out) / (slug + '.json')} ({count} records)")
    elif args.db_command == "diff":
        return 1 if diff(TuningDB.load(args.old), TuningDB.load(args.new)) else 0
    return 0
