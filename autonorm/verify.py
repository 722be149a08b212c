"""Check a compiled kernel against the fp64 reference: used by tests, the tuner and `autonorm check`.

One function builds inputs for a spec (random-normal, never zeros; LayerNorm
inputs get a non-zero mean so an uncentered variance fails), one runs a kernel
on them and returns the relative L2 error of every output.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import reference
from .spec import NormSpec

EPS = 1e-5
OFFSET = 0.5  # a non-trivial Gemma offset, so forgetting it fails


@dataclass
class Inputs:
    """Arguments of one kernel call for a spec (2-D, possibly row-strided views)."""

    x: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    residual: torch.Tensor | None
    dy: torch.Tensor | None = None
    dh: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    rstd: torch.Tensor | None = None
    eps: float = EPS
    offset: float = 0.0

    def args(self, spec: NormSpec) -> tuple:
        """Positional arguments of the kernel calling convention (backends/base.py)."""
        if spec.direction == "fwd":
            return (self.x, self.weight, self.bias, self.residual, self.eps, self.offset)
        return (self.dy, self.x, self.weight, self.mean, self.rstd, self.dh, self.offset)


def _rows(rows: int, n: int, dtype, device, gen, strided: bool, scale=1.0, shift=0.0) -> torch.Tensor:
    """A (rows, n) tensor; when strided, a column slice of a wider buffer (row stride > n)."""
    width = n + (17 if strided else 0)
    buf = torch.randn(rows, width, generator=gen, dtype=torch.float32, device=gen.device) * scale + shift
    return buf.to(device=device, dtype=dtype)[:, :n]


def make_inputs(spec: NormSpec, rows: int, device="cpu", *, seed: int = 0, strided: bool = False,
                on_device: bool = False) -> Inputs:
    """Random inputs for `spec`; `on_device=True` draws them with a generator on `device` itself
    (a GB-sized host randn plus the copy costs seconds on a GPU), other values than the host's."""
    gen = torch.Generator(device=device if on_device else "cpu").manual_seed(seed)
    n, xd, wd = spec.hidden, spec.torch_x_dtype, spec.torch_w_dtype
    shift = 0.75 if spec.is_layernorm else 0.0
    x = _rows(rows, n, xd, device, gen, strided, 1.5, shift)
    residual = _rows(rows, n, xd, device, gen, strided) if spec.residual else None
    weight = (torch.randn(n, generator=gen, device=gen.device) * 0.5 + 1.0).to(device=device, dtype=wd) \
        if spec.weight else None
    bias = (torch.randn(n, generator=gen, device=gen.device) * 0.5).to(device=device, dtype=wd) if spec.bias else None
    inputs = Inputs(x, weight, bias, residual, offset=OFFSET if spec.offset else 0.0)
    if spec.direction == "bwd":
        # Backward sees the normalized input (h) and fp32 stats computed from it.
        _, _, mean, rstd = reference.forward(spec.op, x, eps=EPS, dtype=torch.float32)
        inputs.mean = mean.contiguous() if mean is not None else None
        inputs.rstd = rstd.contiguous()
        inputs.residual = None
        inputs.dy = _rows(rows, n, xd, device, gen, strided)
        inputs.dh = _rows(rows, n, xd, device, gen, strided) if spec.residual else None
    return inputs


@dataclass
class CheckResult:
    errors: dict = field(default_factory=dict)  # output name -> relative L2 error
    tolerance: float = 0.0

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance


def compare(spec: NormSpec, inputs: Inputs, outputs: tuple) -> CheckResult:
    """Relative L2 error of each kernel output against the fp64 reference."""
    result = CheckResult(tolerance=reference.tolerance(spec.torch_x_dtype))
    if spec.direction == "fwd":
        y, h, mean, rstd = outputs
        ry, rh, rmean, rrstd = reference.forward(spec.op, inputs.x, inputs.weight, inputs.bias, inputs.residual,
                                                 inputs.eps, inputs.offset, casting_mode=spec.casting_mode)
        expected = {"y": ry, "h": rh, "mean": rmean, "rstd": rrstd}
        actual = {"y": y, "h": h, "mean": mean, "rstd": rstd}
    else:
        dx, dw, db = outputs
        rdx, rdw, rdb = reference.backward(spec.op, inputs.dy, inputs.x, inputs.weight, inputs.bias, inputs.dh,
                                           inputs.eps, inputs.offset)
        expected = {"dx": rdx, "dweight": rdw, "dbias": rdb}
        actual = {"dx": dx, "dweight": dw, "dbias": db}
    for name, exp in expected.items():
        act = actual[name]
        if exp is None:
            if act is not None and act.numel() != 0:
                result.errors[name] = float("inf")  # an output that should not exist
            continue
        if act is None:
            result.errors[name] = float("inf")
            continue
        if tuple(act.shape) != tuple(exp.shape):
            result.errors[name] = float("inf")
            continue
        result.errors[name] = reference.rel_l2(act, exp)
    return result


def check_kernel(spec: NormSpec, kernel, rows: int, device="cpu", *, seed: int = 0,
                 strided: bool = False) -> CheckResult:
    """Run `kernel` once on fresh inputs for `spec` and compare every output."""
    inputs = make_inputs(spec, rows, device, seed=seed, strided=strided)
    return compare(spec, inputs, kernel(*inputs.args(spec)))
