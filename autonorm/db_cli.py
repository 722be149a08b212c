"""`autonorm db show|validate|merge|diff|export`: inspect and combine tuning databases."""
from __future__ import annotations

import sys
from pathlib import Path

from .db import TuningDB
from .device import stale_compiler
from .errors import AutonormError, DatabaseError

HELP = "show, validate, merge or diff tuning databases"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print a database's device, versions and records")
    show.add_argument("path")
    validate = sub.add_parser("validate", help="check databases against the schema and every config's domain")
    validate.add_argument("paths", nargs="+")
    merge = sub.add_parser("merge", help="merge databases of one device (later files win on equal keys)")
    merge.add_argument("paths", nargs="+")
    merge.add_argument("-o", "--out", required=True, help="output file (may be one of the inputs)")
    export = sub.add_parser("export", help="write OUT/<device>.json from the finalized studies of an Optuna storage")
    export.add_argument("--storage", required=True, help="the fleet's storage URL (postgresql://..., sqlite:///...)")
    export.add_argument("--out", default="tuning_db", help="output folder (default tuning_db)")
    diff = sub.add_parser("diff", help="compare the records of two databases")
    diff.add_argument("old")
    diff.add_argument("new")


def _entry(e) -> str:
    pct = f", {e.pct_copy_bw:.0f}% copy bw" if e.pct_copy_bw is not None else ""
    return f"{e.backend}[{e.config.short()}] {e.median_us:.2f} us ({e.p20_us:.2f}-{e.p80_us:.2f}), {e.gbps:.1f} GB/s{pct}"


def show(db: TuningDB, out=None) -> None:
    out = out or sys.stdout
    d = db.device
    print(f"device: {d['name']} ({d['slug']}, {d['kind']}, cc {d['compute_capability']}, {d['sm_count']} SMs/cores, "
          f"L2 {d['l2_bytes']} B, copy {d['copy_gbps']} GB/s)", file=out)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in db.versions.items() if v is not None), file=out)
    print(f"records: {len(db.records)}", file=out)
    for key in sorted(db.records):
        rec = db.records[key]
        eager = rec.baselines["torch_eager"]["median_us"]
        comp = rec.baselines.get("torch_compile")
        vs = f"x{eager / rec.winner.median_us:.2f} vs eager" + (
            f", x{comp['median_us'] / rec.winner.median_us:.2f} vs compile" if comp else "")
        stale = stale_compiler(rec.winner.backend, db.versions)
        print(f"  {key.short()}: {_entry(rec.winner)}; {vs}; {rec.trials} trials, {rec.failed} failed, "
              f"{rec.date}" + (f" [STALE: tuned under another compiler, {stale}]" if stale else ""), file=out)


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


def main(args) -> int:
    try:
        if args.db_command == "show":
            show(TuningDB.load(args.path))
        elif args.db_command == "validate":
            bad = 0
            for path in args.paths:
                try:
                    db = TuningDB.load(path)
                    print(f"{path}: OK ({len(db.records)} records, device {db.device['slug']})")
                except DatabaseError as exc:
                    print(f"INVALID: {exc}", file=sys.stderr)
                    bad += 1
            return 1 if bad else 0
        elif args.db_command == "merge":
            dbs = [TuningDB.load(p) for p in args.paths]
            merged = dbs[0]
            for other in dbs[1:]:
                merged.merge(other)
            merged.save(args.out)
            print(f"wrote {args.out} ({len(merged.records)} records)")
        elif args.db_command == "export":
            from .storage import export_databases

            for slug, count in export_databases(args.storage, Path(args.out)).items():
                print(f"wrote {Path(args.out) / (slug + '.json')} ({count} records)")
        elif args.db_command == "diff":
            diff(TuningDB.load(args.old), TuningDB.load(args.new))
    except AutonormError as exc:  # DatabaseError included
        print(f"autonorm db: {exc}", file=sys.stderr)
        return 1
    return 0
