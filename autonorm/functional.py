"""`autonorm.rms_norm` and `autonorm.layer_norm`: torch.nn.functional's signatures, autonorm's kernels.

Inputs are checked here, once, with errors that name the problem; kernels only
ever see 2-D `(M, N)` views with a unit last stride.

The common call (plain tensor input, one normalized dim, a packed last dim,
absent or matching 1-D contiguous weight/bias, no residual) is recognized by
`_fast_n` with a few cheap tests; anything else, valid or not, takes the full
checks in `prepare_2d`, which own every error message. On 1x64 inputs the full
path cost ~4 us more per call than the norm itself (scripts/overhead.py).

Inputs that torch takes but the kernels do not (float64, N above the kernels'
maximum or 0, weight or bias dtypes other than float32 or the input's, an input,
weight, bias or residual inside a torch.func transform such as torch.vmap or
torch.func.grad, forward-mode AD) run torch's own implementation
instead: a fallback, never a failure. With AUTONORM_LOG=1 each reason is logged
once, and `autonorm.explain` reports it. Bad input that torch rejects gets
torch's kind of error (a shape mismatch is both a ValueError and, like torch's,
a RuntimeError).

Off the common call, both functions honour `__torch_function__` as torch.nn.functional's do: torch.fx
records them as one node (autonorm's modules trace), and a tensor subclass or a TorchFunctionMode sees
the call.
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import settings
from .ops import norm_fwd, unit_last_stride
from .spec import CASTING_MODES, DTYPE_NAMES, MAX_HIDDEN

log = logging.getLogger("autonorm")
_logged_fallbacks: set = set()
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor

_Tensor = torch.Tensor
_PARAM_TYPES = (torch.Tensor, torch.nn.Parameter)  # exact types: subclasses take the checked path
_FLOAT32 = torch.float32
# rms_norm's eps=None: torch computes 16-bit inputs in fp32 and takes fp32's eps for every input dtype it
# widens to fp32 (its docs say the input dtype's; bf16's 2**-7 would move every output element).
# A table: finfo() costs ~1 us a call.
_DEFAULT_EPS = {dtype: torch.finfo(torch.promote_types(dtype, torch.float32)).eps for dtype in DTYPE_NAMES}


def _fast_n(input, normalized_shape, weight, bias) -> int:
    """The hidden size when the call is the common case (see the module docstring), else 0.

    Weight and bias qualify when None or 1-D (n,), contiguous, float32 or the input dtype, on the
    input's device, and of one dtype. Written inline: each helper call costs ~0.1 us here."""
    if type(input) is not _Tensor or _forward_ad._current_level >= 0:  # (inside forward_ad.dual_level)
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
    if not 0 < n <= MAX_HIDDEN or not shape or shape[-1] != n:
        return 0
    if not input.is_contiguous() and input.stride(-1) != 1:  # is_contiguous() is the cheaper test
        return 0
    if weight is not None:
        if type(weight) not in _PARAM_TYPES:
            return 0
        cpu = input.is_cpu  # one CPU device: is_cpu (0.05 us) replaces a device comparison (0.12 us)
        wdtype = weight.dtype
        if not (weight.shape == (n,) and weight.is_contiguous()
                and (wdtype is dtype or wdtype is _FLOAT32)
                and (weight.is_cpu if cpu else weight.device == input.device)):
            return 0
    if bias is not None and not (weight is not None and type(bias) in _PARAM_TYPES and bias.shape == (n,)
                                 and bias.is_contiguous() and bias.dtype is wdtype
                                 and (bias.is_cpu if cpu else bias.device == input.device)):
        return 0
    return n


class NormShapeError(ValueError, RuntimeError):
    """A shape torch rejects too: a ValueError for autonorm's callers, a RuntimeError like torch's own."""


def shape_of(normalized_shape) -> tuple:
    """`normalized_shape` as a tuple: an int, NumPy's integers included (as torch.nn's modules take them), or
    a sequence (its elements kept as they are: under torch.compile they may be symbolic)."""
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    try:
        return tuple(normalized_shape)
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got "
                        f"{type(normalized_shape).__name__}") from None


def _normalized_size(x: Tensor, normalized_shape, name: str) -> int:
    shape = shape_of(normalized_shape)
    if len(shape) == 0 or len(shape) > x.dim() or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise NormShapeError(f"{name}: normalized_shape {list(shape)} does not match the trailing "
                             f"dimensions of input of shape {list(x.shape)}")
    return math.prod(shape)


def _check_param(param: Tensor | None, what: str, x: Tensor, n: int, normalized_shape, name: str) -> Tensor | None:
    if param is None:
        return None
    if not isinstance(param, Tensor):
        raise TypeError(f"{name}: {what} must be a tensor or None, got {type(param).__name__}")
    if tuple(param.shape) != shape_of(normalized_shape):  # as strict as torch: [8, 8] is not (64,)
        raise NormShapeError(f"{name}: {what} has shape {list(param.shape)}, expected normalized_shape "
                             f"{list(shape_of(normalized_shape))}")
    if param.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name}: {what} dtype {param.dtype} must be float32 or the input dtype {x.dtype}")
    if param.device != x.device:
        raise ValueError(f"{name}: {what} is on {param.device} but input is on {x.device}")
    return param.reshape(n) if param.is_contiguous() else param.contiguous().reshape(n)


def prepare_2d(name, input, normalized_shape, weight, bias, residual):
    """Check a call's tensors (each error names `name` and the argument) and view them as the kernels take
    them: (hidden size n, input as rows x n, weight, bias, residual as rows x n or None)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: input must be a tensor, got {type(input).__name__}")
    if input.dtype not in DTYPE_NAMES:
        raise TypeError(f"{name}: input dtype {input.dtype} is not supported; use float32, float16 or bfloat16")
    n = _normalized_size(input, normalized_shape, name)
    weight = _check_param(weight, "weight", input, n, normalized_shape, name)
    bias = _check_param(bias, "bias", input, n, normalized_shape, name)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"{name}: weight dtype {weight.dtype} and bias dtype {bias.dtype} differ")
    x2d = unit_last_stride(input).reshape(-1, n)
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


# --- torch's own implementation, for what the kernels do not cover -----------------------------
@dataclass(frozen=True)
class TorchFallback:
    """What `autonorm.explain` returns for a call that runs torch's own implementation, and why."""

    function: str
    reason: str
    backend: str = "torch"
    rung: str = "fallback"

    def describe(self) -> str:
        return f"{self.function} -> torch's own implementation (rung: fallback: {self.reason})"

    __str__ = describe


def _in_functorch(*tensors) -> bool:
    """Whether a tensor among `tensors` is wrapped by a torch.func transform (grad or vmap over the input,
    or over the weight and bias as in `functional_call`): wrapped tensors have no storage for the kernels,
    and the kernels' autograd is not a transform's."""
    return any(isinstance(t, Tensor) and _is_functorch_wrapped(t) for t in tensors)


def fallback_reason(input, normalized_shape, weight, bias, residual=None) -> str | None:
    """Why the kernels cannot take a call that torch may (None when they can, or when the input is bad:
    then `prepare_2d` raises). Never raises."""
    if not isinstance(input, Tensor):
        return None
    # (is_compiling first: Dynamo cannot trace the wrapped-tensor test)
    if not torch.compiler.is_compiling() and _in_functorch(input, weight, bias, residual):
        return "tensors inside a torch.func transform (torch.vmap, torch.func.grad, ...)"
    if _forward_ad._current_level >= 0:  # the kernels would drop the tangents of dual tensors
        return "forward-mode AD (inside torch.autograd.forward_ad.dual_level)"
    if input.is_floating_point() and input.dtype not in DTYPE_NAMES:
        return f"{input.dtype} input (kernels take float32, float16, bfloat16)"
    try:
        shape = shape_of(normalized_shape)
        n = math.prod(shape)
    except TypeError:
        return None
    if n > MAX_HIDDEN:
        return f"normalized size {n} above the kernels' maximum {MAX_HIDDEN}"
    if n == 0:  # torch returns the empty input's shape; kernels need a row of at least one element
        return "empty normalized shape"
    params = [p for p in (weight, bias) if isinstance(p, Tensor) and p.is_floating_point()]
    if any(p.dtype not in (input.dtype, torch.float32) for p in params) or len({p.dtype for p in params}) > 1:
        dtypes = ", ".join(str(p.dtype) for p in params)
        return f"weight/bias dtype {dtypes} with {input.dtype} input (kernels take float32 or the input dtype)"
    return None


def _torch_norm(name, op, reason, input, normalized_shape, weight, bias, eps, offset, residual):
    """The call on torch.nn.functional (which raises its own errors for inputs it rejects)."""
    import torch.nn.functional as F

    if settings.log_choices() and (name, reason) not in _logged_fallbacks:
        _logged_fallbacks.add((name, reason))
        log.warning("autonorm: %s falls back to torch's own implementation: %s", name, reason)
    if offset != 0.0 and weight is None:
        raise ValueError(f"{name}: offset={offset} needs a weight (y = x_hat * (offset + weight))")
    h = input + residual if residual is not None else input
    normalized_shape = shape_of(normalized_shape)  # autonorm takes an int, as torch.nn's modules do; F's do not
    if op == "layernorm":
        y = F.layer_norm(h, normalized_shape, weight, bias, eps)
    elif op == "rmsnorm" or weight is None:
        y = F.rms_norm(h, normalized_shape, weight if offset == 0.0 else weight + offset, eps)
    else:  # a casting mode ("rmsnorm:llama" / "rmsnorm:none"), as reference.forward, in differentiable torch ops
        wide = torch.promote_types(h.dtype, torch.float32)
        x_hat = F.rms_norm(h.to(wide), normalized_shape, None, eps).to(h.dtype).to(wide)
        scale = weight.to(wide) + offset
        if op == "rmsnorm:none":
            scale = scale.to(h.dtype).to(wide)
        y = (x_hat * scale).to(h.dtype)
    return (y, h) if residual is not None else y


def _call(name, op, input, normalized_shape, weight, bias, eps, offset, residual):
    reason = fallback_reason(input, normalized_shape, weight, bias, residual)
    if reason is not None:
        return _torch_norm(name, op, reason, input, normalized_shape, weight, bias, eps, offset, residual)
    n, x2d, weight, bias, r2d = prepare_2d(name, input, normalized_shape, weight, bias, residual)
    if eps is None:  # rms_norm's default, as torch.nn.functional.rms_norm's
        eps = _DEFAULT_EPS[input.dtype]
    if offset != 0.0 and weight is None:
        raise ValueError(f"{name}: offset={offset} needs a weight (y = x_hat * (offset + weight))")
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
    `eps=None` uses the eps that `torch.nn.functional.rms_norm` uses: float32's for every input dtype
    (torch computes 16-bit inputs in float32).
    `casting_mode` says where a 16-bit input is rounded: "gemma" (default) multiplies x_hat by the
    weight in fp32, "llama" rounds x_hat to the input dtype first (Hugging Face LlamaRMSNorm),
    "none" rounds the weight too.
    """
    op = _RMSNORM_OPS.get(casting_mode) or rmsnorm_op(casting_mode)
    n = _fast_n(input, normalized_shape, weight, None) if residual is None else 0
    if n and (offset == 0.0 or weight is not None):
        x2d = input if input.dim() == 2 else input.reshape(-1, n)
        try:
            y = norm_fwd(x2d, weight, None, None, op,
                         _DEFAULT_EPS[input.dtype] if eps is None else float(eps), float(offset))[0]
        except RuntimeError:
            if not _in_functorch(input, weight):  # torch.func: see _in_functorch
                raise
            return _call("rms_norm", op, input, normalized_shape, weight, None, eps, offset, None)
        return y if x2d is input else y.view(input.shape)
    if has_torch_function_variadic(input, weight, residual):  # torch.fx proxies, __torch_function__ subclasses
        return handle_torch_function(rms_norm, (input, weight, residual), input, normalized_shape, weight, eps,
                                     offset=offset, residual=residual, casting_mode=casting_mode)
    return _call("rms_norm", op, input, normalized_shape, weight, None, eps, offset, residual)


def layer_norm(input: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5, *, residual: Tensor | None = None):
    """LayerNorm over the trailing `normalized_shape` dims; with `residual`, returns `(y, h)`."""
    n = _fast_n(input, normalized_shape, weight, bias) if residual is None else 0
    if n:  # (a bias without a weight does not qualify: it needs the ones weight below)
        x2d = input if input.dim() == 2 else input.reshape(-1, n)
        try:
            y = norm_fwd(x2d, weight, bias, None, "layernorm", float(eps), 0.0)[0]
        except RuntimeError:
            if not _in_functorch(input, weight, bias):  # torch.func: see _in_functorch
                raise
            return _call("layer_norm", "layernorm", input, normalized_shape, weight, bias, eps, 0.0, None)
        return y if x2d is input else y.view(input.shape)
    if has_torch_function_variadic(input, weight, bias, residual):  # as in rms_norm
        return handle_torch_function(layer_norm, (input, weight, bias, residual), input, normalized_shape, weight,
                                     bias, eps, residual=residual)
    if bias is not None and weight is None and isinstance(bias, Tensor):
        weight = torch.ones_like(bias)  # kernels take bias only with a weight; 1 is exact
    return _call("layer_norm", "layernorm", input, normalized_shape, weight, bias, eps, 0.0, residual)
