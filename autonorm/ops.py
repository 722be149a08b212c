"""The torch operators: `autonorm::norm_fwd` and `autonorm::norm_bwd`.

Registered with `torch.library.custom_op` (fake implementations + autograd) so
that torch.compile traces them as opaque ops without graph breaks. Tensors are
2-D `(M, N)` here; `functional.py` validates and reshapes user inputs.
Optional outputs that do not exist (h without residual, mean for RMSNorm,
dweight without weight) are returned as empty tensors, since custom ops cannot
return None.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch

_EMPTY_SHAPE = (0,)


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty(_EMPTY_SHAPE, dtype=dtype)


@torch.library.custom_op("autonorm::norm_fwd", mutates_args=())
def norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
             op: str, eps: float, offset: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    choice = dispatch.choice_for(dispatch.make_key(op, "fwd", x, weight, bias, residual, offset))
    y, h, mean, rstd = choice.kernel(x, weight, bias, residual, eps, offset)
    return (y, _empty(x) if h is None else h, _empty(x, torch.float32) if mean is None else mean, rstd)


@norm_fwd.register_fake
def _(x, weight, bias, residual, op, eps, offset):
    m, n = x.shape
    y = x.new_empty((m, n))
    h = x.new_empty((m, n)) if residual is not None else x.new_empty(_EMPTY_SHAPE)
    mean = x.new_empty((m,) if op == "layernorm" else _EMPTY_SHAPE, dtype=torch.float32)
    return y, h, mean, x.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("autonorm::norm_bwd", mutates_args=())
def norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
             dh: Optional[Tensor], op: str, offset: float, has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    # The backward kernel's key is the forward's features: bias and residual change it.
    key = dispatch.make_key(op, "bwd", x, weight, weight if has_bias else None, dh, offset)
    choice = dispatch.choice_for(key)
    dx, dw, db = choice.kernel(dy, x, weight, mean if op == "layernorm" else None, rstd, dh, offset)
    return dx, _empty(x) if dw is None else dw, _empty(x) if db is None else db


@norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, dh, op, offset, has_bias):
    dx = x.new_empty(x.shape)
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty(_EMPTY_SHAPE)
    db = weight.new_empty(weight.shape) if (weight is not None and has_bias) else x.new_empty(_EMPTY_SHAPE)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, op, eps, offset = inputs
    y, h, mean, rstd = output
    ctx.op, ctx.offset = op, offset
    ctx.has_weight, ctx.has_bias, ctx.has_residual = weight is not None, bias is not None, residual is not None
    # Backward needs the normalized input: h when the residual add was fused.
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)


def unit_last_stride(t: Tensor | None) -> Tensor | None:
    """Kernels take any row stride but need the last dim packed (e.g. grads of expand())."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _backward(ctx, dy, dh, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dy = unit_last_stride(dy)
    dh = unit_last_stride(dh) if ctx.has_residual else None
    dx, dw, db = norm_bwd(dy, x, weight, mean, rstd, dh, ctx.op, ctx.offset, ctx.has_bias)
    return (dx,
            dw if ctx.has_weight else None,
            db if ctx.has_bias else None,
            dx if ctx.has_residual else None,
            None, None, None)


norm_fwd.register_autograd(_backward, setup_context=_setup_context)
