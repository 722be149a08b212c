"""The `autonorm` command. Each subcommand is a module of this package, listed here as data.

A subcommand module defines `add_arguments(parser)` and `main(args) -> int`
(its one-line help is in `COMMANDS`); it is imported only when that subcommand runs, so
`autonorm check` never pays for Optuna's import. Argument parsing lives only in this
package; the conventions every subcommand follows are in `autonorm/cli/args.py`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .args import (
    Parser,
    UsageError,
    add_device,
    add_list,
    backend_names,
    device_arg,
    dtype_names,
    list_of,
    positive_int,
)

COMMANDS = {
    "check": ("autonorm.cli.check", "run every available backend against the reference"),
    "tune": ("autonorm.cli.tune", "tune kernels on this machine and write a tuning database"),
    "bench": ("autonorm.cli.bench", "benchmark autonorm against torch eager, torch.compile and others"),
    "db": ("autonorm.cli.db", "show, validate, merge, diff or locate tuning databases"),
    "render": ("autonorm.cli.render", "print the generated source of a kernel"),
    "grids": ("autonorm.cli.grids", "print the standard or quick grid as data: tune batches, bench cases, size"),
    "audit": ("autonorm.cli.audit", "cross-compile kernels for sm_80/sm_90 (no GPU): registers, spills, occupancy"),
}

# The extra that installs each optional package (pyproject.toml); CuPy and numba-cuda: cuda12 on a CUDA 12 driver.
EXTRAS = {"optuna": "tune", "tqdm": "tune", "numba": "cpu", "triton": "triton", "cupy": "cuda13",
          "numba_cuda": "cuda13", "psycopg": "postgres", "matplotlib": "report"}


def _parser(argv) -> tuple[argparse.ArgumentParser, object | None, argparse.ArgumentParser | None]:
    parser = Parser(prog="autonorm", description="Autotuned RMSNorm and LayerNorm kernels.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv else None
    module = chosen_parser = None
    for name, (module_name, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module, chosen_parser = importlib.import_module(module_name), sp
            module.add_arguments(sp)
    return parser, module, chosen_parser


def _version() -> str:
    from .. import __version__
    return f"autonorm {__version__}"


def _ours(exc: ModuleNotFoundError) -> bool:
    """A module of autonorm itself is missing: a bug to show with its traceback, not an extra to install."""
    return (exc.name or "").split(".")[0] == "autonorm"


def missing_extra_message(exc: ModuleNotFoundError) -> str:
    top = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    hint = f'; install it with: pip install "autonorm[{extra}]"' if extra else ""
    return f"the optional package {top!r} is not installed{hint}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, module, sub = _parser(argv)
    except ModuleNotFoundError as exc:
        if _ours(exc):
            raise
        print(f"autonorm {argv[0]}: error: {missing_extra_message(exc)}", file=sys.stderr)
        return 2
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported by the subcommand's parser, so the message starts `autonorm <cmd>: error:`
            (sub or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # argparse printed usage and `autonorm <cmd>: error: ...` (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    if module is None:
        parser.print_help()
        return 2
    from ..errors import AutonormError

    prog = sub.prog
    try:
        return int(module.main(args) or 0)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if _ours(exc):
            raise
        print(f"{prog}: error: {missing_extra_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except AutonormError as exc:  # bad data (a corrupt database, a kernel that fails): exit 1, no traceback
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1



__all__ = ["COMMANDS", "EXTRAS", "Parser", "UsageError", "add_device", "add_list", "backend_names", "device_arg",
           "dtype_names", "list_of", "main", "missing_extra_message", "positive_int"]
