"""The `autonorm` command. Each subcommand lives in its own module, listed here as data.

A subcommand module defines `HELP` (one line), `add_arguments(parser)` and
`main(args) -> int`; it is imported only when that subcommand runs, so
`autonorm check` never pays for Optuna's import.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "check": ("autonorm.check", "run every available backend against the reference"),
    "tune": ("autonorm.tuner", "tune kernels on this machine and write a tuning database"),
    "bench": ("autonorm.bench", "benchmark autonorm against torch eager, torch.compile and others"),
    "db": ("autonorm.db_cli", "show, validate, merge or diff tuning databases"),
    "render": ("autonorm.render_cli", "print the generated source of a kernel"),
    "audit": ("autonorm.audit", "cross-compile kernels for sm_80/sm_90 (no GPU): registers, spills, occupancy"),
}


def _parser(argv) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog="autonorm", description="Autotuned RMSNorm and LayerNorm kernels.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv else None
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
    return parser, module


def _version() -> str:
    from . import __version__
    return f"autonorm {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = _parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
