#!/usr/bin/env python3
"""One GPU session: the most valuable hardware evidence from a single call of a few minutes.

    python scripts/gpu_session.py --out OUT [--budget 510]     # on a GPU machine (autonorm installed)
    python scripts/gpu_session.py --out OUT --dry-run          # anywhere: CPU, Triton interpreter, Numba simulator
    python scripts/gpu_session.py import OUT                   # afterwards: database, report, search table

The phases and what they measure: autonorm/session/__init__.py and docs/GPU_RUNBOOK.md. Each phase
runs in a process of its own, started as `gpu_session.py phase NAME ...` (this file, so that the
process imports the installed autonorm, never the source folder of the working directory).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from autonorm.session.driver import DEFAULT_BUDGET, PHASE_NAMES, Session, unknown_phases
from autonorm.session.records import env_facts


def phase(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gpu_session.py phase")
    p.add_argument("name", choices=PHASE_NAMES)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--until", type=float, required=True, help="epoch seconds: start no case that ends later")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    from autonorm.session.phases import run_phase_process  # torch and the backends: in the phase process only

    return run_phase_process(a.name, a.out, a.until, a.dry_run)


def import_(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gpu_session.py import",
                                description="turn a session's files into the database, report and search table")
    p.add_argument("folder", type=Path)
    p.add_argument("--db-dir", type=Path, help="default: tuning_db")
    p.add_argument("--docs-dir", type=Path, help="default: docs/benchmarks")
    a = p.parse_args(argv)
    if env_facts(a.folder).get("identity", {}).get("dry_run") and (a.db_dir is None or a.docs_dir is None):
        p.error("these files come from a dry run, which measures nothing: give --db-dir and --docs-dir outside "
                "the repository's tuning_db/ and docs/")
    from autonorm.session.importer import import_session

    try:
        written = import_session(a.folder, a.db_dir or Path("tuning_db"), a.docs_dir or Path("docs/benchmarks"))
    except ValueError as exc:
        sys.exit(f"gpu_session import: {exc}")
    for path in written:
        print(f"wrote {path}")
    return 0


def session(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-session")),
                   help="output folder (default: $OUT, else ./gpu-session)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="total seconds (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="CPU: Triton interpreter, Numba simulator, small sizes")
    p.add_argument("--phases", default=",".join(PHASE_NAMES), help="comma list (default: all, in order)")
    a = p.parse_args(argv)
    phases = [x for x in a.phases.split(",") if x]
    if unknown_phases(phases):
        p.error(f"unknown phase(s) {unknown_phases(phases)}; phases: {', '.join(PHASE_NAMES)}")
    phase_command = [sys.executable, os.path.abspath(__file__), "phase"]
    return Session(a.out, a.budget, a.dry_run, phases, phase_command).run()


def main(argv: list[str]) -> int:
    commands = {"phase": phase, "import": import_}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return session(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
