"""autonorm: autotuned, template-generated RMSNorm and LayerNorm kernels.

    import autonorm
    y = autonorm.rms_norm(x, (4096,), weight)          # like torch.nn.functional.rms_norm
    norm = autonorm.RMSNorm(4096)                       # like torch.nn.RMSNorm
    model = autonorm.patch(model)                       # swap a model's norms in place

Importing needs only torch, numpy and jinja2; backends load when first used.
"""
from .config import Config
from .dbload import load_db
from .dispatch import reset
from .errors import (AutonormError, BackendUnavailableError, DatabaseError, InvalidConfigError, KernelError,
                     UnknownBackendError)
from .explain import explain
from .functional import layer_norm, rms_norm
from .modules import LayerNorm, RMSNorm
from .patch import patch
from .spec import NormSpec

__version__ = "0.1.0"

__all__ = [
    "rms_norm", "layer_norm", "RMSNorm", "LayerNorm", "NormSpec", "Config", "reset", "patch", "explain", "load_db",
    "AutonormError", "BackendUnavailableError", "DatabaseError", "InvalidConfigError", "KernelError",
    "UnknownBackendError", "__version__",
]
