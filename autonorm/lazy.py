"""Package attributes that load on first use (PEP 562): a package names each public attribute's submodule,
and the submodule is imported only when the attribute is first read. `autonorm --help`, `autonorm tune --help`
and `autonorm bench --help` need none of those submodules, and so never import torch (seconds)."""
from __future__ import annotations

import importlib


def lazy_exports(namespace: dict, where: dict[str, str], *, bind: bool = False):
    """The module `__getattr__` and `__dir__` of the package whose globals are `namespace`, where `where` maps
    each lazy name to the submodule (relative to the package) that defines it.

    With `bind`, a loaded value is stored in the package's namespace, so later reads skip `__getattr__` (a
    user's `autonorm.rms_norm` on every step). Without it, every read fetches the submodule's current value,
    so a test that patches the defining module is seen through the package too."""
    package = namespace["__name__"]

    def __getattr__(name: str):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        if bind:
            namespace[name] = value
        return value

    def __dir__():
        return sorted({*namespace, *where})

    return __getattr__, __dir__
