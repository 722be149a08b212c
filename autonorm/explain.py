"""`autonorm.explain`: which kernel a call would use, and why, without running the call."""
from __future__ import annotations

import torch

from . import functional, modules
from .dispatch import choice_for_tensors


def explain(fn, input, *args, direction: str = "fwd", **kwargs):
    """Which backend, config and ladder rung a call would use, without running the call.

    (Resolving a key not seen before launches its kernel once on 2 rows, as any first call does.)

    `fn` is `"rms_norm"`, `"layer_norm"`, the function itself, or an autonorm
    `RMSNorm` / `LayerNorm` module (then pass only the input, and `residual=`);
    the other arguments are that call's. `direction="bwd"` explains its backward.

        print(autonorm.explain("rms_norm", x, (4096,), w))
        print(autonorm.explain(model.norm, x, direction="bwd"))

    Returns a `Choice`, or a `functional.TorchFallback` (rung "fallback", with the reason) for a call
    the kernels do not take and torch's own implementation runs.
    """
    if direction not in ("fwd", "bwd"):
        raise ValueError(f"explain: direction must be 'fwd' or 'bwd', got {direction!r}")
    if isinstance(fn, modules.RMSNorm):
        fn, args, kwargs = "rms_norm", (fn.normalized_shape, fn.weight, fn.eps), {
            "offset": fn.offset, "casting_mode": fn.casting_mode, **kwargs}
    elif isinstance(fn, modules.LayerNorm):
        fn, args = "layer_norm", (fn.normalized_shape, fn.weight, fn.bias, fn.eps)
    name = getattr(fn, "__name__", fn)
    if name not in ("rms_norm", "layer_norm"):
        raise ValueError(f"explain: expected 'rms_norm', 'layer_norm' or an autonorm norm module, got {fn!r}")
    if name == "rms_norm":
        params = dict(zip(("normalized_shape", "weight", "eps"), args), **kwargs)
        offset, bias = float(params.get("offset", 0.0)), None
        op = functional.rmsnorm_op(params.get("casting_mode", "gemma"))
    else:
        params = dict(zip(("normalized_shape", "weight", "bias", "eps"), args), **kwargs)
        offset, bias, op = 0.0, params.get("bias"), "layernorm"
        if bias is not None and params.get("weight") is None:
            params["weight"] = torch.ones_like(bias)
    fallback = functional.fallback_reason(input, params["normalized_shape"], params.get("weight"), bias)
    if fallback is not None:  # a call the kernels do not take runs torch's own implementation
        return functional.TorchFallback(name, fallback)
    _, x2d, weight, bias, r2d = functional.prepare_2d(name, input, params["normalized_shape"], params.get("weight"),
                                                     bias, params.get("residual"))
    return choice_for_tensors(op, direction, x2d, weight, bias, r2d, offset)
