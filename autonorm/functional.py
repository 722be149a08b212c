"""`autonorm.rms_norm` and `autonorm.layer_norm`: torch.nn.functional's signatures, autonorm's kernels.

Inputs are checked here, once, with errors that name the problem; kernels only
ever see 2-D `(M, N)` views with a unit last stride.

The common call (plain tensor input, one normalized dim, a packed last dim,
absent or matching 1-D contiguous weight/bias, no residual) is recognized by
`_fast_n` with a few cheap tests; anything else, valid or not, takes the full
checks in `_prepare`, which own every error message. On 1x64 inputs the full
path cost ~4 us more per call than the norm itself (scripts/overhead.py).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .ops import norm_fwd, unit_last_stride
from .spec import CASTING_MODES, DTYPE_NAMES

_Tensor = torch.Tensor
_PARAM_TYPES = (torch.Tensor, torch.nn.Parameter)  # exact types: subclasses take the checked path
_FLOAT32 = torch.float32
_DEFAULT_EPS = {dtype: torch.finfo(dtype).eps for dtype in DTYPE_NAMES}  # finfo() costs ~1 us a call


def _fast_n(input, normalized_shape, weight, bias) -> int:
    """The hidden size when the call is the common case (see the module docstring), else 0.

    Weight and bias qualify when None or 1-D (n,), contiguous, float32 or the input dtype, on the
    input's device, and of one dtype. Written inline: each helper call costs ~0.1 us here."""
    if type(input) is not _Tensor:
        return 0
    dtype = input.dtype
    if dtype not in DTYPE_NAMES:
        return 0
    if type(normalized_shape) is int:
        n = normalized_shape
    elif type(normalized_shape) in (tuple, list) and len(normalized_shape) == 1:
        n = normalized_shape[0]
        if type(n) is not int:
            return 0
    else:
        return 0
    shape = input.shape
    if n <= 0 or not shape or shape[-1] != n:
        return 0
    if not input.is_contiguous() and input.stride(-1) != 1:  # is_contiguous() is the cheaper test
        return 0
    if weight is not None:
        cpu = input.is_cpu  # one CPU device: is_cpu (0.05 us) replaces a device comparison (0.12 us)
        wdtype = weight.dtype
        if not (type(weight) in _PARAM_TYPES and weight.shape == (n,) and weight.is_contiguous()
                and (wdtype is dtype or wdtype is _FLOAT32)
                and (weight.is_cpu if cpu else weight.device == input.device)):
            return 0
    if bias is not None and not (weight is not None and type(bias) in _PARAM_TYPES and bias.shape == (n,)
                                 and bias.is_contiguous() and bias.dtype is wdtype
                                 and (bias.is_cpu if cpu else bias.device == input.device)):
        return 0
    return n


def _normalized_size(x: Tensor, normalized_shape, name: str) -> int:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) == 0 or len(shape) > x.dim() or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"{name}: normalized_shape {list(shape)} does not match the trailing "
                         f"dimensions of input of shape {list(x.shape)}")
    return math.prod(shape)


def _check_param(param: Tensor | None, what: str, x: Tensor, n: int, normalized_shape, name: str) -> Tensor | None:
    if param is None:
        return None
    if not isinstance(param, Tensor):
        raise TypeError(f"{name}: {what} must be a tensor or None, got {type(param).__name__}")
    if param.numel() != n or param.dim() == 0:
        raise ValueError(f"{name}: {what} has shape {list(param.shape)}, expected normalized_shape {normalized_shape}")
    if param.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name}: {what} dtype {param.dtype} must be float32 or the input dtype {x.dtype}")
    if param.device != x.device:
        raise ValueError(f"{name}: {what} is on {param.device} but input is on {x.device}")
    return param.reshape(n) if param.is_contiguous() else param.contiguous().reshape(n)


def _prepare(name, input, normalized_shape, weight, bias, residual):
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: input must be a tensor, got {type(input).__name__}")
    if input.dtype not in DTYPE_NAMES:
        raise TypeError(f"{name}: input dtype {input.dtype} is not supported; use float32, float16 or bfloat16")
    n = _normalized_size(input, normalized_shape, name)
    weight = _check_param(weight, "weight", input, n, normalized_shape, name)
    bias = _check_param(bias, "bias", input, n, normalized_shape, name)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"{name}: weight dtype {weight.dtype} and bias dtype {bias.dtype} differ")
    x2d = unit_last_stride(input).reshape(-1, n) if n > 0 else input.reshape(-1, 0)
    r2d = None
    if residual is not None:
        if not isinstance(residual, Tensor) or residual.shape != input.shape:
            raise ValueError(f"{name}: residual must have the input's shape {list(input.shape)}, "
                             f"got {list(getattr(residual, 'shape', []))}")
        if residual.dtype != input.dtype:
            raise TypeError(f"{name}: residual dtype {residual.dtype} differs from input dtype {input.dtype}")
        if residual.device != input.device:
            raise ValueError(f"{name}: residual is on {residual.device} but input is on {input.device}")
        r2d = unit_last_stride(residual).reshape(-1, n)
    return n, x2d, weight, bias, r2d


def _call(name, op, input, normalized_shape, weight, bias, eps, offset, residual):
    n, x2d, weight, bias, r2d = _prepare(name, input, normalized_shape, weight, bias, residual)
    if offset != 0.0 and weight is None:
        raise ValueError(f"{name}: offset={offset} needs a weight (y = x_hat * (offset + weight))")
    if n == 0:
        raise ValueError(f"{name}: cannot normalize over an empty dimension")
    y, h, _, _ = norm_fwd(x2d, weight, bias, r2d, op, float(eps), float(offset))
    y = y.view(input.shape)
    return (y, h.view(input.shape)) if residual is not None else y


# The op name the kernels are dispatched under: the casting mode rides in it ("rmsnorm:llama"), so that
# the custom ops and their autograd carry it without another argument.
_RMSNORM_OPS = {mode: "rmsnorm" if mode == "gemma" else f"rmsnorm:{mode}" for mode in CASTING_MODES}


def rmsnorm_op(casting_mode: str) -> str:
    op = _RMSNORM_OPS.get(casting_mode)
    if op is None:
        raise ValueError(f"rms_norm: casting_mode={casting_mode!r}: expected one of {', '.join(CASTING_MODES)}")
    return op


def rms_norm(input: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
             eps: float | None = None, *, offset: float = 0.0, residual: Tensor | None = None,
             casting_mode: str = "gemma"):
    """RMSNorm over the trailing `normalized_shape` dims: `x / rms(x) * (offset + weight)`.

    With `residual`, normalizes `h = input + residual` and returns `(y, h)`.
    `eps=None` uses `torch.finfo(input.dtype).eps`, as `torch.nn.functional.rms_norm` does.
    `casting_mode` says where a 16-bit input is rounded: "gemma" (default) multiplies x_hat by the
    weight in fp32, "llama" rounds x_hat to the input dtype first (Hugging Face LlamaRMSNorm),
    "none" rounds the weight too.
    """
    op = _RMSNORM_OPS.get(casting_mode) or rmsnorm_op(casting_mode)
    n = _fast_n(input, normalized_shape, weight, None) if residual is None else 0
    if n and (offset == 0.0 or weight is not None):
        x2d = input if input.dim() == 2 else input.reshape(-1, n)
        y = norm_fwd(x2d, weight, None, None, op,
                     _DEFAULT_EPS[input.dtype] if eps is None else float(eps), float(offset))[0]
        return y if x2d is input else y.view(input.shape)
    if eps is None:
        eps = torch.finfo(input.dtype).eps if isinstance(input, Tensor) and input.is_floating_point() else 1e-6
    return _call("rms_norm", op, input, normalized_shape, weight, None, eps, offset, residual)


def layer_norm(input: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5, *, residual: Tensor | None = None):
    """LayerNorm over the trailing `normalized_shape` dims; with `residual`, returns `(y, h)`."""
    n = _fast_n(input, normalized_shape, weight, bias) if residual is None else 0
    if n:  # (a bias without a weight does not qualify: it needs the ones weight below)
        x2d = input if input.dim() == 2 else input.reshape(-1, n)
        y = norm_fwd(x2d, weight, bias, None, "layernorm", float(eps), 0.0)[0]
        return y if x2d is input else y.view(input.shape)
    if bias is not None and weight is None and isinstance(bias, Tensor):
        weight = torch.ones_like(bias)  # kernels take bias only with a weight; 1 is exact
    return _call("layer_norm", "layernorm", input, normalized_shape, weight, bias, eps, 0.0, residual)
