"""Drop-in modules: constructor arguments and state-dict keys of torch.nn.RMSNorm / LayerNorm."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .functional import layer_norm, rms_norm, rmsnorm_op, shape_of


class RMSNorm(nn.Module):
    """`torch.nn.RMSNorm` plus a Gemma-style `offset` (`y = x_hat * (offset + weight)`) and the
    `casting_mode` of `autonorm.rms_norm`.

    With an offset the weight starts at `1 - offset`, so a fresh module is the
    identity scale either way (Gemma's zeros for offset=1).
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *, offset: float = 0.0,
                 casting_mode: str = "gemma"):
        super().__init__()
        rmsnorm_op(casting_mode)  # validates it
        self.casting_mode = casting_mode
        self.normalized_shape = shape_of(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.offset = float(offset)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.normalized_shape, self.weight, self.eps, offset=self.offset, residual=residual,
                        casting_mode=self.casting_mode)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
                + (f", offset={self.offset}" if self.offset else "")
                + (f", casting_mode={self.casting_mode!r}" if self.casting_mode != "gemma" else ""))


class LayerNorm(nn.Module):
    """`torch.nn.LayerNorm` with autonorm's kernels (and an optional fused residual)."""

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = shape_of(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        if elementwise_affine and bias:
            self.bias = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:  # a registered None parameter (a plain `self.bias = None` would block registration)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
