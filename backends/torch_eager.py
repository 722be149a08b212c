"""Torch eager as a backend: the last rung of the dispatcher's ladder and a tuning candidate.

It has no tunables and no templates; it computes in fp32 with plain torch ops,
so it runs on any device torch supports. The tuner times it like any other
candidate, so a recorded winner is never slower than torch.
"""
from __future__ import annotations

import torch

from autonorm import reference
from autonorm.config import NoConfig
from autonorm.render import Source

from .base import Backend

_F32 = torch.float32


def _fused_rms_norm_op():
    """torch's fused RMSNorm op returning (y, rstd) (torch >= 2.8), or None on older torch.

    The `torch._fused_rms_norm` binding costs 7.3 us at 1x64 vs ~9 us through torch.ops.aten."""
    fn = getattr(torch, "_fused_rms_norm", None)
    if fn is not None:
        return fn
    try:
        return torch.ops.aten._fused_rms_norm.default
    except (AttributeError, RuntimeError):
        return None


def _forward(op):
    """Torch's fused ops (one native call instead of ~8 elementwise ops; 1x64 fp32: 2.3 us for
    native_layer_norm vs ~20 us through the fp32 reference) with the kernel contract kept:
    fp32 mean/rstd (fp32 parameters put torch in its mixed-precision mode, whose stats are fp32),
    the offset folded into the weight in fp32, the residual added first (h in x's dtype)."""
    fused_rms = _fused_rms_norm_op() if op == "rmsnorm" else None
    reference_kernel = _plain_forward(op)

    def kernel(x, weight, bias, residual, eps, offset):
        m, n = x.shape
        if m == 0 or n == 0:
            return reference_kernel(x, weight, bias, residual, eps, offset)
        h = x if residual is None else x + residual
        weight = _fp32_weight(x, weight, offset)
        if op == "layernorm":
            if x.dtype is not _F32:  # fp32 parameters (ones when absent) select fp32 statistics
                weight = weight if weight is not None else torch.ones(n, dtype=_F32, device=x.device)
                bias = bias.float() if bias is not None else None
            y, mean, rstd = torch.native_layer_norm(h, (n,), weight, bias, eps)
            return y, (None if residual is None else h), mean.view(m), rstd.view(m)
        if fused_rms is None:
            return reference_kernel(x, weight, None, residual, eps, 0.0)
        y, rstd = fused_rms(h, (n,), weight, eps)
        return y, (None if residual is None else h), None, rstd.view(m)

    def y_only(x, weight, bias, eps, offset):
        """y alone (inference, no residual): torch.layer_norm for fp32 (1.9 us at 1x64 vs 2.0 us +
        two 0.8 us views for native_layer_norm), the fused RMSNorm without its rstd view."""
        if op == "layernorm":
            # fp32 parameters as in kernel(): the same bits
            if x.dtype is not _F32 or x.shape[0] == 0 or x.shape[1] == 0:
                return kernel(x, weight, bias, None, eps, offset)[0]
            return torch.layer_norm(x, (x.shape[1],), weight, bias, eps)
        if x.shape[0] == 0 or x.shape[1] == 0:
            return kernel(x, weight, bias, None, eps, offset)[0]
        return fused_rms(x, (x.shape[1],), _fp32_weight(x, weight, offset), eps)[0]

    if op == "layernorm" or fused_rms is not None:
        kernel.y_only = y_only
    return kernel


def _plain_forward(op, casting_mode="gemma"):
    """The forward in plain fp32 torch ops (the fp32 reference), outputs in the kernel contract's dtypes.

    With the "llama" casting these are LlamaRMSNorm's own ops, so its outputs are bit for bit HF's."""
    def kernel(x, weight, bias, residual, eps, offset):
        y, h, mean, rstd = reference.forward(op, x, weight, bias, residual, eps, offset, _F32, casting_mode)
        return (y.to(x.dtype), None if h is None else h.to(x.dtype), mean, rstd)
    return kernel


def compile_target(spec):
    """What the torch.compile baseline compiles: the same math in plain torch ops only.

    The eager forward calls `torch._fused_rms_norm`, which Dynamo cannot trace: compiled as is, it
    graph-breaks and the "torch.compile" baseline would time eager. Plain ops are what Inductor fuses
    (it decomposes F.rms_norm / F.layer_norm into them too)."""
    return _plain_forward(spec.op, spec.casting_mode) if spec.direction == "fwd" else _backward(spec)


def _fp32_weight(x, weight, offset):
    """`weight + offset` in fp32 when there is an offset; weight in fp32 for fp16/bf16 inputs (torch's
    mixed mode: fp32 statistics); else the weight as is."""
    if weight is not None and (offset != 0.0 or (x.dtype is not _F32 and weight.dtype is not _F32)):
        return weight.float() + offset if offset != 0.0 else weight.float()
    return weight


def _backward(spec):
    def kernel(dy, x, weight, mean, rstd, dh, offset):
        xf = x.float()
        xhat = (xf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1) if mean is not None else xf * rstd.unsqueeze(-1)
        dyf = dy.float()
        g = dyf * (weight.float() + offset) if weight is not None else dyf
        n = x.shape[-1]
        proj = (g * xhat).sum(-1, keepdim=True) / n
        if mean is not None:
            dxf = rstd.unsqueeze(-1) * (g - g.sum(-1, keepdim=True) / n - xhat * proj)
        else:
            dxf = rstd.unsqueeze(-1) * (g - xhat * proj)
        if dh is not None:
            dxf = dxf + dh.float()
        dw = (dyf * xhat).sum(0).to(weight.dtype) if weight is not None else None
        db = dyf.sum(0).to(weight.dtype) if spec.bias else None
        return dxf.to(x.dtype), dw, db
    return kernel


class TorchBackend(Backend):
    name = "torch"
    config_cls = NoConfig
    compiles = False

    def unavailable_reason(self):
        return None

    def version(self):
        return torch.__version__

    def supports_device(self, device):
        return True

    def template_name(self, spec):
        return ""

    def render(self, spec, config):
        self.validate(spec, config)
        # The "source" must name everything the kernel closes over: it keys the compile cache.
        return Source.of(f"torch-eager {spec!r}", "")

    def build(self, source, spec, config, device):
        if spec.direction == "bwd":
            return _backward(spec)
        # torch's fused ops multiply x_hat by the weight in fp32: the other casting modes take plain ops.
        return _forward(spec.op) if spec.casting_mode == "gemma" else _plain_forward(spec.op, spec.casting_mode)
