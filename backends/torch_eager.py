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


def _forward(op):
    def kernel(x, weight, bias, residual, eps, offset):
        y, h, mean, rstd = reference.forward(op, x, weight, bias, residual, eps, offset, torch.float32)
        return (y.to(x.dtype), None if h is None else h.to(x.dtype), mean, rstd)
    return kernel


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
        return _forward(spec.op) if spec.direction == "fwd" else _backward(spec)
