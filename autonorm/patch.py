"""`autonorm.patch(model)`: swap a model's norm layers for autonorm modules, in place.

Swapped: `torch.nn.RMSNorm`, `torch.nn.LayerNorm`, and Hugging Face style RMSNorm
classes, recognized by shape rather than by import (transformers is never
imported here): a class whose name ends in "RMSNorm", with a 1-D `weight` and an
epsilon in `variance_epsilon` (Llama, Qwen2/3, Mistral, ...) or `eps` (Gemma).

Gemma's RMSNorm computes `x_hat * (1 + w)` in fp32; others compute `x_hat * w`.
Which one a class is, is found by running the original module once on a small
probe input and comparing it with autonorm at offset 0 and offset 1 (cached per
class). That also catches a look-alike class with other semantics: it is left as
it is, with a warning, rather than swapped for something that computes another
function. Modules on the meta device cannot run, so there the forward's source
decides (`1.0 + self.weight`).

Where a 16-bit input is rounded is part of the function too: Llama-style classes
return `weight * x_hat.to(input_dtype)` (casting_mode "llama"), Gemma's
`(x_hat * (1 + w)).type_as(x)` ("gemma"). A second probe, in bf16, tells them
apart bit for bit (on the meta device: `.to(input_dtype)` in the source), so a
patched bf16 model keeps the original's logits exactly.

The new modules share the original Parameter objects (optimizers and tied
weights keep working) and use the same attribute names, so state-dict keys do
not change. Hooks registered on the replaced modules are not carried over.
"""
from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from . import reference
from .modules import LayerNorm, RMSNorm

_offset_by_class: dict[type, float | None] = {}
_casting_by_class: dict[type, str] = {}


def _hf_epsilon(module: nn.Module):
    for name in ("variance_epsilon", "eps"):
        eps = getattr(module, name, None)
        if isinstance(eps, (int, float)) and not isinstance(eps, bool):
            return float(eps)
    return None


def _looks_like_hf_rmsnorm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1
            and _hf_epsilon(module) is not None)


def _offset_from_source(cls: type) -> float | None:
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None
    return 1.0 if ("1.0 + self.weight" in src or "1 + self.weight" in src) else 0.0


def _probe_offset(module: nn.Module, eps: float) -> float | None:
    """0.0 or 1.0 when the module computes autonorm's RMSNorm with that offset, else None."""
    weight = module.weight
    if weight.device.type == "meta":
        return _offset_from_source(type(module))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, weight.numel(), generator=gen).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        try:
            expected = module(x)
        except Exception:  # a look-alike whose forward wants other arguments: not ours to swap
            return None
        if not isinstance(expected, torch.Tensor) or expected.shape != x.shape:
            return None
        tol = 4 * reference.tolerance(weight.dtype)
        for offset in (0.0, 1.0):
            y = reference.forward("rmsnorm", x, weight, None, None, eps, offset, torch.float32)[0]
            if reference.rel_l2(expected.float(), y) <= tol:
                return offset
    return None


def _probe_casting(module: nn.Module, eps: float, offset: float) -> str:
    """The casting mode whose bf16 outputs equal the module's on a probe input ("gemma" when unsure)."""
    weight = module.weight
    if weight.device.type == "meta":
        try:
            src = inspect.getsource(type(module).forward)
        except (OSError, TypeError):
            return "gemma"
        return "llama" if ".to(input_dtype)" in src else "gemma"
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, weight.numel(), generator=gen).to(device=weight.device, dtype=torch.bfloat16)
    with torch.no_grad():
        try:
            out = module(x)
        except Exception:
            return "gemma"
        mismatches = {}
        for mode in ("gemma", "llama"):
            y = reference.forward("rmsnorm", x, weight, None, None, eps, offset, torch.float32, casting_mode=mode)[0]
            # Llama with an fp32 weight returns the fp32 product; otherwise the output is rounded to bf16.
            mismatches[mode] = int((y.to(out.dtype) != out).sum())
    return "llama" if mismatches["llama"] < mismatches["gemma"] else "gemma"


def _replacement(module: nn.Module, layer_norm: bool, rms_norm: bool) -> nn.Module | None:
    cls = type(module)
    if isinstance(module, (RMSNorm, LayerNorm)):
        return None
    if rms_norm and cls is nn.RMSNorm:
        new = RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine, device="meta")
        new.weight = module.weight
    elif layer_norm and cls is nn.LayerNorm:
        new = LayerNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                        bias=module.bias is not None, device="meta")
        new.weight, new.bias = module.weight, module.bias
    elif rms_norm and _looks_like_hf_rmsnorm(module):
        eps = _hf_epsilon(module)
        if cls not in _offset_by_class or _offset_by_class[cls] is None:
            _offset_by_class[cls] = _probe_offset(module, eps)
        offset = _offset_by_class[cls]
        if offset is None:
            warnings.warn(f"autonorm.patch: {cls.__qualname__} looks like an RMSNorm but does not compute "
                          f"x_hat * w or x_hat * (1 + w); left unpatched", RuntimeWarning, stacklevel=3)
            return None
        if cls not in _casting_by_class:
            _casting_by_class[cls] = _probe_casting(module, eps, offset)
        new = RMSNorm(module.weight.shape[0], eps, device="meta", offset=offset, casting_mode=_casting_by_class[cls])
        new.weight = module.weight
    else:
        return None
    new.train(module.training)
    return new


def patch(model: nn.Module, *, rms_norm: bool = True, layer_norm: bool = True) -> nn.Module:
    """Swap every supported norm in `model` for an autonorm module, in place; returns `model`.

    `rms_norm=False` / `layer_norm=False` leave that kind alone. If `model` is
    itself a norm layer, the autonorm replacement is returned instead.
    """
    top = _replacement(model, layer_norm, rms_norm)
    if top is not None:
        return top
    swaps, made = [], {}  # made: one replacement per module object, so a shared norm stays shared
    for parent in model.modules():
        for name, child in parent.named_children():
            if id(child) not in made:
                made[id(child)] = _replacement(child, layer_norm, rms_norm)
            if made[id(child)] is not None:
                swaps.append((parent, name, made[id(child)]))
    for parent, name, new in swaps:  # after the walk: never mutate a module tree while iterating it
        setattr(parent, name, new)
    return model
