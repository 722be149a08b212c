"""The reference every kernel is judged against: tests, the tuner's verifier, benchmarks.

Computed in fp64 by default (fp32 on request) from upcast inputs, with the
semantics of `torch.nn.functional.rms_norm` / `layer_norm` plus the features of
the kernel contract (README: Gemma offset, fused residual). Errors are relative L2 norms, with
tolerances keyed by the dtype of the kernel's inputs.
"""
from __future__ import annotations

import torch

# Relative L2 error allowed per input dtype: a few ulps of the storage type, so a
# kernel that drops an element, forgets a feature or reduces in low precision fails.
TOLERANCES = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.5e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCES[dtype]


def rel_l2(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """||actual - expected|| / max(||expected||, ||scale||, 0.01 * sqrt(numel)); NaN anywhere gives inf.

    `scale` is the size of the terms the output is computed from (`backward_scales`): where they cancel, the
    rounding error of any correct kernel is relative to them, not to the small result. The floor keeps
    outputs that are mathematically ~0 from turning cancellation noise into a huge relative error; the
    inputs' elements are O(1), so any real output norm is far above it.

    Computed in fp32 (fp64 only for an fp64 `actual`): rounding the fp64 reference to fp32 moves the error by at
    most 2**-24 (6e-8) of the reference's norm, under 1% of the tightest tolerance (fp32's 1e-5), and on a CPU
    fp64 arithmetic and conversions cost 4x as much (a 1031 x 4096 bf16 output: 52 ms in fp64, 14 ms in fp32),
    which made the tuner's reference check cost twice a candidate's timing.
    """
    work = torch.float64 if actual.dtype == torch.float64 else torch.float32
    a, e = actual.detach().to("cpu", work), expected.detach().to("cpu", work)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0
    # A NaN or inf anywhere in `actual` makes the difference's norm NaN or inf (the reference is finite): one
    # pass over the data instead of a separate isfinite scan.
    error = float((a - e).norm())
    if error != error or error == float("inf"):
        return float("inf")
    size = max(float(e.norm()), 0.01 * a.numel() ** 0.5)
    if scale is not None:
        size = max(size, float(scale.detach().to("cpu", work).norm()))
    return error / size


def backward_scales(op: str, dy, x, weight=None, bias=None, eps: float = 1e-6, offset: float = 0.0) -> dict:
    """The size of what each backward output is a difference or a sum of, in fp64 (None: no output).

    dx = rstd * (g - xhat * mean(g * xhat) [- mean(g)]) with g = dy * (w + offset): its terms are of the size
    rstd * |g|. When the row is short they cancel (RMSNorm at N = 1: xhat = +-1, dx ~ eps), and fp32 rounding
    of a correct kernel is ~1e-7 of rstd * |g|, not of dx. For long rows the correction removes about 1/N of
    g's energy, so ||dx|| ~ ||rstd * g|| and the check is as tight as before.
    dW and dB are column sums over rows of dy * xhat and dy: a sum of independent terms has the size of
    their root sum of squares, the size the rounding error is relative to; a column whose terms cancel by
    chance (few rows, N = 1) is not held to a relative error no summation order meets. With many columns
    ||dW|| ~ ||rss|| and nothing is loosened.
    LayerNorm also loses digits to centering where a row's mean is larger than its spread (a nearly constant
    row: x_hat carries the error of h - mean): such a row's terms are scaled up by |mean| * rstd; the rows of
    ordinary data (mean below the spread) are not.
    """
    h = x.detach().double()
    mean = h.mean(-1, keepdim=True)
    centered = h - mean if op == "layernorm" else h
    rstd = torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
    lost = (mean.abs() * rstd).clamp_min(1.0) if op == "layernorm" else 1.0
    g = dy.detach().double()
    if weight is not None:
        g = g * (weight.detach().double() + offset)
    terms_w = dy.detach().double() * centered * rstd * lost
    return {"dx": rstd * g.abs() * lost,
            "dweight": terms_w.square().sum(0).sqrt() if weight is not None else None,
            "dbias": dy.detach().double().square().sum(0).sqrt() if bias is not None else None}


def forward(op: str, x, weight=None, bias=None, residual=None, eps: float = 1e-6,
            offset: float = 0.0, dtype: torch.dtype = torch.float64, casting_mode: str = "gemma"):
    """(y, h, mean, rstd) in `dtype`; h is None without residual, mean None for RMSNorm.

    `casting_mode` "llama" rounds x_hat to x's dtype before the weight, "none" rounds the scale
    (offset + weight) too (spec.CASTING_MODES)."""
    h = x.to(dtype)
    if residual is not None:
        h = h + residual.to(dtype)
    if op == "layernorm":
        mean = h.mean(-1)
        centered = h - mean.unsqueeze(-1)
    else:
        mean = None
        centered = h
    rstd = torch.rsqrt(centered.square().mean(-1) + eps)
    y = centered * rstd.unsqueeze(-1)
    if weight is not None:
        scale = weight.to(dtype) + offset
        if casting_mode != "gemma":
            y = y.to(x.dtype).to(dtype)
        if casting_mode == "none":
            scale = scale.to(x.dtype).to(dtype)
        y = y * scale
    if bias is not None:
        y = y + bias.to(dtype)
    return y, (h if residual is not None else None), mean, rstd


def backward(op: str, dy, x, weight=None, bias=None, dh=None, eps: float = 1e-6,
             offset: float = 0.0, dtype: torch.dtype = torch.float64):
    """(dx, dweight, dbias) in `dtype` for the normalized input `x` (h when fused)."""
    xr = x.detach().to(dtype).requires_grad_(True)
    wr = weight.detach().to(dtype).requires_grad_(True) if weight is not None else None
    br = bias.detach().to(dtype).requires_grad_(True) if bias is not None else None
    with torch.enable_grad():
        y, _, _, _ = forward(op, xr, wr, br, None, eps, offset, dtype)
        inputs = [t for t in (xr, wr, br) if t is not None]
        grads = torch.autograd.grad(y, inputs, dy.to(dtype))
    grads = list(grads)
    dx = grads.pop(0)
    if dh is not None:
        dx = dx + dh.to(dtype)
    dw = grads.pop(0) if weight is not None else None
    db = grads.pop(0) if bias is not None else None
    return dx, dw, db
