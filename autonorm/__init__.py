"""autonorm: autotuned, template-generated RMSNorm and LayerNorm kernels.

    import autonorm
    y = autonorm.rms_norm(x, (4096,), weight)          # like torch.nn.functional.rms_norm
    norm = autonorm.RMSNorm(4096)                       # like torch.nn.RMSNorm
    model = autonorm.patch(model)                       # swap a model's norms in place

Using it needs only torch, numpy and jinja2; backends load when first used.

The names below load on first use (PEP 562), so that `autonorm --help` and the other
command-line paths that need no tensor never import torch (seconds). Where torch is
already imported, `import autonorm` loads them at once: the import itself registers the
custom ops, as `torch.export.load` of a saved program needs.
"""
import sys

from .lazy import lazy_exports

__version__ = "0.1.0"

# Each public name and the module that defines it.
_API = {
    "rms_norm": "functional", "layer_norm": "functional", "RMSNorm": "modules", "LayerNorm": "modules",
    "NormSpec": "spec", "Config": "config", "reset": "dispatch", "patch": "patch", "explain": "explain",
    "load_db": "db_sources", "AutonormError": "errors", "BackendUnavailableError": "errors",
    "DatabaseError": "errors", "InvalidConfigError": "errors", "KernelError": "errors",
    "UnknownBackendError": "errors",
}

__all__ = [*_API, "__version__"]

# Bound once loaded: `autonorm.rms_norm` is read on every step of a user's model.
__getattr__, __dir__ = lazy_exports(globals(), _API, bind=True)


if "torch" in sys.modules:  # torch's import is paid already: load everything, the custom ops included
    for _name in _API:
        __getattr__(_name)
    del _name
