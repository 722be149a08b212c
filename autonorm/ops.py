"""The torch operators: `autonorm::norm_fwd` and `autonorm::norm_bwd`, and the eager fast path.

Registered with `torch.library.custom_op` (fake implementations + autograd) so
that torch.compile traces them as opaque ops without graph breaks. Tensors are
2-D `(M, N)` here; `functional.py` validates and reshapes user inputs.
Optional outputs that do not exist (h without residual, mean for RMSNorm,
dweight without weight) are returned as empty tensors, since custom ops cannot
return None.

`norm_fwd` (what functional.py calls) takes the custom op only when tracing
(torch.compile, export, fake or functional tensors). In plain eager mode the
custom op's Python dispatch costs more than a small norm itself (measured with
scripts/overhead.py), so eager calls the resolved kernel directly: through a
`torch.autograd.Function` when a gradient is needed, bare otherwise. Both paths
use the same dispatcher choice and kernels, so they compute the same values.
Without a gradient, a kernel's optional `y_only` entry point (numba-cpu and torch
offer one for calls without a residual) computes y alone.
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
def norm_fwd_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
             op: str, eps: float, offset: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    choice = dispatch.choice_for(dispatch.make_key(op, "fwd", x, weight, bias, residual, offset))
    y, h, mean, rstd = choice.kernel(x, weight, bias, residual, eps, offset)
    return (y, _empty(x) if h is None else h, _empty(x, torch.float32) if mean is None else mean, rstd)


@norm_fwd_op.register_fake
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


def kernel_readable(t: Tensor | None) -> Tensor | None:
    """`t` as kernels read it in eager mode, by address: the last dim packed and no lazy negation
    (`torch._neg_view` keeps x in memory plus a bit meaning -x; conjugate views exist only for
    complex dtypes, which no kernel takes). Not for traced code: Dynamo cannot trace is_neg()."""
    if t is not None and t.is_neg():
        t = t.resolve_neg()
    return unit_last_stride(t)


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


norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --- eager mode: the same kernels without the custom op's dispatch ---------------------------
class _NormFunction(torch.autograd.Function):
    """Autograd for eager calls: outputs `y` (and `h` with a residual).

    The backward kernels are not differentiable. When the backward itself is recorded
    (`create_graph=True`: gradient penalties, double backward), the gradients are computed
    through torch's own differentiable ops instead, as `torch.nn.functional` does."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, op, eps, offset):
        kernel = dispatch.choice_for(dispatch.make_key(op, "fwd", x, weight, bias, residual, offset)).kernel
        y, h, mean, rstd = kernel(x, weight, bias, residual, eps, offset)
        ctx.op, ctx.eps, ctx.offset = op, eps, offset
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        ctx.save_for_backward(h if residual is not None else x, weight, bias, mean, rstd)
        return (y, h) if residual is not None else y

    @staticmethod
    def backward(ctx, dy, dh=None):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _backward_through_torch(ctx, dy, dh, x, weight, bias)
        dy = kernel_readable(dy)
        if ctx.has_residual:
            dh = torch.zeros_like(x) if dh is None else kernel_readable(dh)
        key = dispatch.make_key(ctx.op, "bwd", x, weight, weight if ctx.has_bias else None, dh, ctx.offset)
        dx, dw, db = dispatch.choice_for(key).kernel(dy, x, weight, mean, rstd, dh, ctx.offset)
        return dx, dw, db, (dx if ctx.has_residual else None), None, None, None


def _backward_through_torch(ctx, dy, dh, x, weight, bias):
    """The backward as a differentiable graph: the kernels' formulas in fp32 torch ops, statistics
    recomputed from x, so second derivatives reach x, weight, bias and dy.

    Explicit formulas, not torch.autograd.grad of a recomputed forward: with a fused residual x
    is this node's own output h, and a nested autograd.grad towards the weight would run this
    backward again through h, without end."""
    xf, dyf = x.float(), dy.float()
    if ctx.op == "layernorm":
        xf = xf - xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + ctx.eps)
    xhat = xf * rstd
    g = dyf * (weight.float() + ctx.offset) if weight is not None else dyf
    if ctx.op == "layernorm":
        g_centered = g - g.mean(-1, keepdim=True)
    else:
        g_centered = g
    dx = (rstd * (g_centered - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
    if ctx.has_residual and dh is not None:
        dx = dx + dh
    dw = (dyf * xhat).sum(0).to(weight.dtype) if weight is not None else None
    db = dyf.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db, (dx if ctx.has_residual else None), None, None, None


_is_compiling = torch.compiler.is_compiling
_Tensor = torch.Tensor


def norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
             op: str, eps: float, offset: float):
    """Forward of a norm on 2-D tensors -> (y, h, mean, rstd); h, mean, rstd may be None in eager mode."""
    if _is_compiling() or type(x) is not _Tensor:
        # Tracing (dynamo, export, fake/functional tensors): the opaque custom op.
        return norm_fwd_op(x, weight, bias, residual, op, eps, offset)
    if x.is_neg() or (weight is not None and weight.is_neg()) or (bias is not None and bias.is_neg()) or (
            residual is not None and residual.is_neg()):
        x, weight, bias, residual = map(kernel_readable, (x, weight, bias, residual))
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)
                                    or (residual is not None and residual.requires_grad)):
        out = _NormFunction.apply(x, weight, bias, residual, op, eps, offset)
        return (out[0], out[1], None, None) if residual is not None else (out, None, None, None)
    kernel = dispatch.choice_for(dispatch.make_key(op, "fwd", x, weight, bias, residual, offset)).kernel
    # No gradient and no residual: only y is used. A kernel may offer `y_only(x, weight, bias, eps,
    # offset) -> y`, which skips the mean/rstd outputs (their allocation is a third of a tiny call).
    y_only = getattr(kernel, "y_only", None) if residual is None else None
    if y_only is not None:
        return y_only(x, weight, bias, eps, offset), None, None, None
    return kernel(x, weight, bias, residual, eps, offset)
