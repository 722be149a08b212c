"""What `autonorm bench` offers on its command line, without importing torch (so `--help` answers at once):
the providers' names in report order and the default shapes. providers.py and run.py build on these."""
from __future__ import annotations

PROVIDER_NAMES = ("autonorm", "torch", "torch.compile", "liger", "quack")
DEFAULT_SHAPES = ("8192x4096", "65536x512")


def parse_shape(text: str) -> tuple[int, int]:
    try:
        rows, hidden = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r} must look like ROWSxHIDDEN, e.g. 8192x4096") from None
    return rows, hidden
