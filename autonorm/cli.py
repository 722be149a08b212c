"""The `autonorm` command. Each subcommand lives in its own module, listed here as data.

A subcommand module defines `add_arguments(parser)` and `main(args) -> int`
(its one-line help is in `COMMANDS`); it is imported only when that subcommand runs, so
`autonorm check` never pays for Optuna's import.

One convention for every subcommand, kept here:

- a list option takes commas, spaces or both (`--ops rmsnorm,layernorm` or
  `--ops rmsnorm layernorm`), parsed by `list_of`;
- a usage error (a bad value, an unknown name, a device this build cannot use)
  prints `autonorm <cmd>: error: ...` and exits 2, never a traceback: raise
  `UsageError`; a missing optional package names the extra that installs it;
- no option matches by prefix (`--dtype` is not `--dtypes`), and `--help`
  shows every default;
- `--device` defaults to CUDA when torch sees a GPU (`device_arg`).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "check": ("autonorm.check", "run every available backend against the reference"),
    "tune": ("autonorm.tuner", "tune kernels on this machine and write a tuning database"),
    "bench": ("autonorm.bench", "benchmark autonorm against torch eager, torch.compile and others"),
    "db": ("autonorm.db_cli", "show, validate, merge, diff or locate tuning databases"),
    "render": ("autonorm.render_cli", "print the generated source of a kernel"),
    "audit": ("autonorm.audit", "cross-compile kernels for sm_80/sm_90 (no GPU): registers, spills, occupancy"),
}

# Optional packages and the extra of pyproject.toml that installs each.
# The extra that installs each optional package (pyproject.toml); CuPy and numba-cuda: cuda12 on a CUDA 12 driver.
EXTRAS = {"optuna": "tune", "tqdm": "tune", "numba": "cpu", "triton": "triton", "cupy": "cuda13",
          "numba_cuda": "cuda13", "psycopg": "postgres", "matplotlib": "report"}


class UsageError(Exception):
    """A command-line value that cannot be used; `main` prints it as `autonorm <cmd>: error: ...`, exit 2."""


class _HelpFormatter(argparse.HelpFormatter):
    """Appends `(default: ...)` to options that have a real default (not None, not a False flag); lists
    are shown as they are typed, `a,b,c`."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or "default" in text:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"  # argparse %-formats help strings


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching and with defaults in --help; subparsers inherit it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def list_of(kind=str, choices=None):
    """An argparse `type` for one item of a list option: splits commas; use with nargs="+" and `flat`."""

    def parse(text: str) -> list:
        items = []
        for raw in text.split(","):
            raw = raw.strip()
            if not raw:
                continue
            if choices is not None and raw not in choices:
                raise argparse.ArgumentTypeError(f"{raw!r} is not one of {', '.join(choices)}")
            try:
                items.append(kind(raw))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{raw!r} is not {_KIND_NAMES.get(kind, 'valid')}") from None
        return items

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


_KIND_NAMES = {int: "an integer", float: "a number"}


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


_KIND_NAMES[positive_int] = "a positive integer"


def add_list(parser, *flags, kind=str, choices=None, default=None, help=None, **kwargs) -> None:
    """A list option: `--flag a,b`, `--flag a b` and `--flag a,b c` all give [a, b(, c)]."""
    if choices is not None:
        help = f"{help}; one or more of {', '.join(choices)}" if help else f"one or more of {', '.join(choices)}"
    parser.add_argument(*flags, nargs="+", type=list_of(kind, choices), default=default, help=help,
                        action=_FlatList, **kwargs)


class _FlatList(argparse.Action):
    """Joins the per-word lists of `list_of` into one flat list."""

    def __call__(self, parser, namespace, values, option_string=None):
        flat = [item for chunk in values for item in chunk]
        if not flat:
            parser.error(f"{option_string}: expected at least one value")
        setattr(namespace, self.dest, flat)


def add_device(parser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU)")


def device_arg(text: str | None):
    """The torch device for `--device` (CUDA when present by default); a UsageError when unusable here."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: this torch build has no CUDA or sees no GPU "
                             f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise UsageError(f"--device {text}: autonorm runs on cpu or cuda")
    return device


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
    from . import __version__
    return f"autonorm {__version__}"


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
    from .errors import AutonormError

    prog = sub.prog
    try:
        return int(module.main(args) or 0)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        print(f"{prog}: error: {missing_extra_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except AutonormError as exc:  # bad data (a corrupt database, a kernel that fails): exit 1, no traceback
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # `python -m autonorm.cli`: run the imported module's main, so that subcommands raise the same UsageError.
    from autonorm.cli import main as _main

    sys.exit(_main())
