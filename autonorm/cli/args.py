"""What every subcommand shares: the usage error, the parser class and the typed options.

- a list option takes commas, spaces or both (`--ops rmsnorm,layernorm` or
  `--ops rmsnorm layernorm`), parsed by `list_of`;
- a usage error (a bad value, an unknown name, a device this build cannot use)
  is raised as `UsageError`, which `autonorm.cli.main` prints as
  `autonorm <cmd>: error: ...` with exit status 2;
- no option matches by prefix (`--dtype` is not `--dtypes`), and `--help`
  shows every default;
- `--device` defaults to CUDA when torch sees a GPU (`device_arg`).
"""
from __future__ import annotations

import argparse
import copy


class UsageError(Exception):
    """A command-line value that cannot be used; `main` prints it as `autonorm <cmd>: error: ...`, exit 2."""


def shown_default(action: argparse.Action) -> str | None:
    """An option's default as `--help` shows it (lists as they are typed, `a,b,c`), or None when it has
    no real default (None, a False flag, --help's own)."""
    default = action.default
    if default is None or default is False or default is argparse.SUPPRESS:
        return None
    return ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)


class _HelpFormatter(argparse.HelpFormatter):
    """Appends `(default: ...)` to options that have a real default, those without a help text included
    (argparse leaves their help line out)."""

    def _format_action(self, action):
        if not action.help and shown_default(action) is not None:
            action = copy.copy(action)
            action.help = f"(default: {shown_default(action).replace('%', '%%')})"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        shown = shown_default(action)
        if shown is None or "default" in text:
            return text
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


def backend_names(requested: list[str] | None, device) -> list[str]:
    """The backends a `--backends` list names (checked), else every one available on `device`."""
    from ..backends import BACKENDS, available

    if requested:
        unknown = [n for n in requested if n not in BACKENDS]
        if unknown:
            raise UsageError(f"--backends: unknown backend(s) {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
        return requested
    return available(device)


def dtype_names(values: list[str]) -> list[str]:
    """Canonical dtype names for a `--dtypes` list; a UsageError names a dtype the kernels do not take."""
    from ..spec import dtype_name

    try:
        return [dtype_name(v) for v in values]
    except ValueError as exc:
        raise UsageError(f"--dtypes: {exc} (other dtypes run on torch's own implementation)") from None
