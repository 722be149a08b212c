"""What `autonorm bench` compares, as data: one adapter per provider (autonorm, torch, torch.compile,
Liger, quack), each building, for one case, a callable that takes an input-set index.

A provider whose package is missing (or that does not run on this device) is
skipped with a note; each provider's result on the first input set is checked
against the fp64 reference before it is timed, and a wrong or crashing one is
skipped with a note, never timed. Inputs are the one recipe of `verify.make_inputs`,
drawn on the device, with the same eps for every provider.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import reference
from ..verify import EPS, make_inputs


def make_sets(spec, rows: int, device: torch.device, n_sets: int) -> list[dict]:
    """`n_sets` input sets (`verify.make_inputs`, drawn on the device: a GB-sized host randn would cost
    seconds per case), as the dicts the providers index: x, w, and for backward dy and fp32 stats."""
    sets = []
    for i in range(n_sets):
        inputs = make_inputs(spec, rows, device, seed=i, on_device=True)
        sets.append({"x": inputs.x, "w": inputs.weight, "dy": inputs.dy, "mean": inputs.mean, "rstd": inputs.rstd})
    return sets


def _torch_fn(op):
    import torch.nn.functional as F

    if op == "rmsnorm":
        return lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS)
    return lambda x, w: F.layer_norm(x, (x.shape[-1],), w, None, EPS)




class ProviderUnavailable(Exception):
    """A provider cannot run this case here (package missing, unsupported size or dtype)."""


def _autograd_impl(spec, sets, f) -> Callable[[int], object]:
    """A callable timing `f`'s forward (no grad) or only its backward (graphs built per set, untimed)."""
    if spec.direction == "fwd":
        def fwd(i):
            with torch.no_grad():
                return f(sets[i]["x"], sets[i]["w"])
        return fwd
    graphs = []
    for s in sets:
        xr, wr = s["x"].detach().requires_grad_(True), s["w"].detach().requires_grad_(True)
        graphs.append((f(xr, wr), xr, wr, s["dy"]))

    def bwd(i):
        # retain_graph keeps the graph for the next sample; each call computes dx and dw.
        y, xr, wr, dy = graphs[i]
        return torch.autograd.grad(y, (xr, wr), dy, retain_graph=True)
    return bwd


def _provide_autonorm(spec, sets, device):
    from .. import dispatch

    key = dispatch.make_key(spec.op, spec.direction, sets[0]["x"], sets[0]["w"], None, None, 0.0)

    def call(kern, s):
        if spec.direction == "fwd":
            return kern(s["x"], s["w"], None, None, EPS, 0.0)
        return kern(s["dy"], s["x"], s["w"], s["mean"] if spec.is_layernorm else None, s["rstd"], None, 0.0)

    # The first call settles the dispatcher's first-use check (a kernel no tuning run verified is checked, and
    # replaced by the next rung if wrong): what is timed and named is what the key resolves to from then on.
    call(dispatch.choice_for(key).kernel, sets[0])
    choice = dispatch.choice_for(key)
    kern = choice.kernel

    def fn(i):
        return call(kern, sets[i])
    return f"autonorm[{choice.backend}]", fn, choice


def _provide_torch(spec, sets, device):
    return "torch", _autograd_impl(spec, sets, _torch_fn(spec.op)), None


def _provide_compile(spec, sets, device):
    # One compiled graph per case: without the reset, Dynamo's recompile limit (8 shapes per code
    # object) would silently fall back to eager part-way through a grid.
    torch._dynamo.reset()
    return "torch.compile", _autograd_impl(spec, sets, torch.compile(_torch_fn(spec.op), dynamic=False)), None


def _provide_liger(spec, sets, device):
    if device.type != "cuda":
        raise ProviderUnavailable("Liger runs on GPUs only")
    try:
        if spec.op == "rmsnorm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            # offset 0, llama casting (fp32 rstd) and Liger's default in_place=True, as its users run it:
            # the backward writes dx into dy (in_place=False adds a zero-filled dx, a full extra write).
            def f(x, w):
                return LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama")
        else:
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
            zeros = torch.zeros(spec.hidden, device=device, dtype=spec.torch_w_dtype)
            # Liger's LayerNorm always takes a bias; a zero bias adds N elements of reads (negligible).
            def f(x, w):
                return LigerLayerNormFunction.apply(x, w, zeros, EPS)
    except ImportError as exc:
        raise ProviderUnavailable(f"liger_kernel not importable ({exc})") from None
    if spec.direction == "fwd" or spec.op != "rmsnorm":
        return "liger", _autograd_impl(spec, sets, f), None
    # In place, dy becomes dx: Liger gets dy copies of its own (the other providers' dy stays intact), and
    # the timer restores them before every timed call, untimed (`prepare`), so no call sees a decayed dy.
    own = [{**s, "dy": s["dy"].clone()} for s in sets]
    fn = _autograd_impl(spec, own, f)

    def prepare():
        for mine, shared in zip(own, sets):
            mine["dy"].copy_(shared["dy"])
    fn.prepare = prepare
    return "liger", fn, None


def _provide_quack(spec, sets, device):
    if device.type != "cuda":
        raise ProviderUnavailable("quack runs on GPUs only")
    try:
        import quack.rmsnorm as qr
    except Exception as exc:  # quack's import also loads the CuTe DSL, which can fail for other reasons
        raise ProviderUnavailable(f"quack not importable ({type(exc).__name__}: {exc})") from None
    if spec.op == "rmsnorm":
        def f(x, w):
            return qr.rmsnorm(x, w, eps=EPS)
    else:
        ln = getattr(qr, "layernorm", None)
        if ln is None:
            raise ProviderUnavailable("this quack has no layernorm in quack.rmsnorm")
        def f(x, w):
            return ln(x, w, eps=EPS)
    return "quack", _autograd_impl(spec, sets, f), None


@dataclass(frozen=True)
class Provider:
    """One implementation compared by `autonorm bench`: `build(spec, sets, device)` returns
    (impl name, callable taking an input-set index, dispatch choice or None)."""

    build: Callable
    about: str


PROVIDERS: dict[str, Provider] = {
    "autonorm": Provider(_provide_autonorm, "autonorm's dispatched kernel (tuning database or heuristic)"),
    "torch": Provider(_provide_torch, "torch eager: F.rms_norm / F.layer_norm"),
    "torch.compile": Provider(_provide_compile, "torch.compile(dynamic=False) of the eager function"),
    "liger": Provider(_provide_liger, "liger_kernel.ops LigerRMSNormFunction / LigerLayerNormFunction"),
    "quack": Provider(_provide_quack, "quack.rmsnorm.rmsnorm (CuTe DSL)"),
}


def check_providers(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {', '.join(unknown)}; known: {', '.join(PROVIDERS)}")
    return names


def _primary(out):
    """The main output of a call: y forward, dx backward (kernels and autograd return tuples)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


CHECK_ROWS = 256  # outputs are row-wise: checking the first rows keeps the fp64 reference cheap at any size


def _reference_output(spec, s):

    k = CHECK_ROWS
    if spec.direction == "fwd":
        return reference.forward(spec.op, s["x"][:k], s["w"], eps=EPS)[0]
    return reference.backward(spec.op, s["dy"][:k], s["x"][:k], s["w"], eps=EPS)[0]


def build_case(spec, rows: int, device: torch.device, n_sets: int, providers: list[str]):
    """(impls, choice, notes): callables by impl name taking an input-set index, autonorm's dispatch
    choice, and one line per provider skipped (not installed, unsupported, or wrong on this case)."""

    sets = make_sets(spec, rows, device, n_sets)
    impls: dict[str, Callable[[int], object]] = {}
    notes: dict[str, str] = {}
    choice = None
    expected = None
    for name in providers:
        try:
            impl, fn, ch = PROVIDERS[name].build(spec, sets, device)
            out = _primary(fn(0))  # first call: compiles, and is the correctness check
            for i in range(1, n_sets):  # every other input set once, untimed: torch.compile guards per input,
                fn(i)  # so that any compile happens here, never in a timed call
        except ProviderUnavailable as exc:
            notes[name] = f"skipped: {exc}"
            continue
        except Exception as exc:  # an anchor that crashes on a shape is a finding, not a bench crash
            notes[name] = f"skipped: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        if expected is None:
            expected = _reference_output(spec, sets[0])
        err = reference.rel_l2(out[:CHECK_ROWS], expected)
        tol = reference.TOLERANCES[spec.torch_x_dtype]
        if not err <= tol:  # NaN fails too
            notes[name] = f"skipped: wrong result (rel. L2 error {err:.3g} > {tol:.3g})"
            continue
        impls[impl] = fn
        if ch is not None:
            choice = ch
    return impls, choice, notes
