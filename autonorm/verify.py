"""Check a compiled kernel against the fp64 reference: used by tests, the tuner and `autonorm check`.

One function builds inputs for a spec (random-normal, never zeros; LayerNorm
inputs get a non-zero mean so an uncentered variance fails), one runs a kernel
on them and returns the relative L2 error of every output.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from . import reference
from .backends.base import poisoned_outputs
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
                on_device: bool = False, eps: float = EPS) -> Inputs:
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
    inputs = Inputs(x, weight, bias, residual, eps=eps, offset=OFFSET if spec.offset else 0.0)
    if spec.direction == "bwd":
        # Backward sees the normalized input (h) and fp32 stats computed from it.
        _, _, mean, rstd = reference.forward(spec.op, x, eps=eps, dtype=torch.float32)
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


def expected_outputs(spec: NormSpec, inputs: Inputs) -> dict:
    """Output name -> the fp64 reference (None: the output must not exist), on the inputs' device."""
    if spec.direction == "fwd":
        ry, rh, rmean, rrstd = reference.forward(spec.op, inputs.x, inputs.weight, inputs.bias, inputs.residual,
                                                 inputs.eps, inputs.offset, casting_mode=spec.casting_mode)
        return {"y": ry, "h": rh, "mean": rmean, "rstd": rrstd}
    rdx, rdw, rdb = reference.backward(spec.op, inputs.dy, inputs.x, inputs.weight, inputs.bias, inputs.dh,
                                       inputs.eps, inputs.offset)
    return {"dx": rdx, "dweight": rdw, "dbias": rdb}


def error_scales(spec: NormSpec, inputs: Inputs) -> dict:
    """The size each output's error is measured against, beyond the output's own (`reference.backward_scales`)."""
    return {} if spec.direction == "fwd" else reference.backward_scales(
        spec.op, inputs.dy, inputs.x, inputs.weight, inputs.bias, inputs.eps, inputs.offset)


def compare(spec: NormSpec, inputs: Inputs, outputs: tuple, expected: dict | None = None,
            scales: dict | None = None) -> CheckResult:
    """Relative L2 error of each kernel output against the fp64 reference (`expected` and `scales`, when
    computed before)."""
    result = CheckResult(tolerance=reference.tolerance(spec.torch_x_dtype))
    expected = expected_outputs(spec, inputs) if expected is None else expected
    names = ("y", "h", "mean", "rstd") if spec.direction == "fwd" else ("dx", "dweight", "dbias")
    actual = dict(zip(names, outputs))
    scales = error_scales(spec, inputs) if scales is None else scales
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
        result.errors[name] = reference.rel_l2(act, exp, scales.get(name))
    return result


def check_kernel(spec: NormSpec, kernel, rows: int, device="cpu", *, seed: int = 0,
                 strided: bool = False) -> CheckResult:
    """Run `kernel` once on fresh inputs for `spec` and compare every output."""
    inputs = make_inputs(spec, rows, device, seed=seed, strided=strided)
    return compare(spec, inputs, kernel(*inputs.args(spec)))


# --- verifying a tuning candidate ----------------------------------------------------------
# A candidate is recorded only if it is right wherever it will run, so it is checked on more than
# one easy case: at the row count it is timed at (a kernel can be wrong only past its first task
# or program), on row-strided inputs with a second eps (a kernel that ignores the row stride or
# eps), on a few rows (small-input paths), with every output pre-filled with NaN (an unwritten
# element), and for every variant it may dispatch to at run time (`kernel.variants`, e.g.
# numba-cpu's serial and parallel kernels) including the inference entry point `y_only`.

# At least this many rows, so that every launch has several tasks or programs (numba-cpu: up to
# 256 rows per task x threads; a GPU persistent grid of a few programs per SM), ending on a
# partial one (a prime).
VERIFY_MIN_ROWS = 1031
# At most this many elements per tensor (32 MiB fp32; the fp64 reference takes twice that).
VERIFY_MAX_ELEMENTS = 1 << 23
SECOND_EPS = 0.5  # large against the inputs' variance (~2), so a kernel ignoring eps is off by ~10%
FEW_ROWS = 3


def verify_rows(rows: int, hidden: int) -> int:
    """Rows a candidate timed at `rows` is verified at: `rows`, raised to VERIFY_MIN_ROWS, capped by memory."""
    return min(max(rows, VERIFY_MIN_ROWS), max(1, VERIFY_MAX_ELEMENTS // max(hidden, 1)))


@functools.lru_cache(maxsize=3)  # one study's three cases; up to ~130 MB each
def _case(spec: NormSpec, rows: int, device: str, strided: bool, eps: float) -> tuple[Inputs, dict, dict]:
    """One verification case's inputs, reference and error scales: the same for every candidate of a study,
    so drawn and computed once (the inputs are copied for each call: `_fresh`)."""
    inputs = make_inputs(spec, rows, device, strided=strided, eps=eps)
    # Kept in fp32, the precision `reference.rel_l2` compares a kernel's output in: converted once, not per candidate.
    return inputs, _to_fp32(expected_outputs(spec, inputs)), _to_fp32(error_scales(spec, inputs))


def _to_fp32(outputs: dict) -> dict:
    return {name: None if t is None else t.float() for name, t in outputs.items()}


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """A copy with the same strides (a row-strided view stays row-strided; `clone` would make it contiguous)."""
    if t is None:
        return None
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def _fresh(inputs: Inputs) -> Inputs:
    """A copy of `inputs` for one kernel call: a kernel that writes into its inputs must not spoil the next."""
    return Inputs(*(_copy(getattr(inputs, name)) for name in ("x", "weight", "bias", "residual", "dy", "dh",
                                                               "mean", "rstd")), eps=inputs.eps, offset=inputs.offset)


def _variants(kernel) -> list[tuple[str, object, bool]]:
    """(name, callable, computes y only) for the kernel and every variant it dispatches to, each
    followed by its `y_only` entry point when it has one."""
    out = []
    for name, k in (("kernel", kernel), *((f"variant {i}", v) for i, v in enumerate(getattr(kernel, "variants", ())))):
        out.append((name, k, False))
        if getattr(k, "y_only", None) is not None:
            out.append((f"{name} y_only", k.y_only, True))
    return out


def check_candidate(spec: NormSpec, kernel, rows: int, device="cpu", *, full: bool = True) -> str | None:
    """None when `kernel`, to be timed at `rows` rows, is right on every verification case, else the first
    case that is wrong; never raises (a candidate that crashes is a failed candidate, not a tuner crash).

    `full=False` checks only the timed row count, contiguous, on `kernel` itself (for torch's own
    compiled baseline, where every further case would be another compile)."""
    try:
        return _first_wrong_case(spec, kernel, rows, device, full)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _cases(spec: NormSpec, rows: int, full: bool) -> list[tuple[int, bool, float]]:
    """(rows, row-strided, eps) of each verification case of a candidate timed at `rows`."""
    rows_v = verify_rows(rows, spec.hidden)
    return [(rows_v, False, EPS)] + ([(rows_v, True, SECOND_EPS), (FEW_ROWS, False, EPS)] if full else [])


def draw_cases(spec: NormSpec, rows: int, device="cpu") -> None:
    """Draw `check_candidate`'s cases for a study at `rows` now (inputs and fp64 reference: 1.5 s at 1031 x 4096 on
    two cores), so that its first check costs no more than the others."""
    device = str(torch.device(device))
    for n_rows, strided, eps in _cases(spec, rows, full=True):
        _case(spec, n_rows, device, strided, eps)


def _first_wrong_case(spec: NormSpec, kernel, rows: int, device, full: bool) -> str | None:
    device = str(torch.device(device))
    with poisoned_outputs():
        for n_rows, strided, eps in _cases(spec, rows, full):
            drawn, expected, scales = _case(spec, n_rows, device, strided, eps)
            for name, k, y_only in (_variants(kernel) if full else [("kernel", kernel, False)]):
                inputs = _fresh(drawn)
                if y_only:
                    y = k(inputs.x, inputs.weight, inputs.bias, inputs.eps, inputs.offset)
                    result = compare(spec, inputs, (y,), {"y": expected["y"]}, scales)
                else:
                    result = compare(spec, inputs, k(*inputs.args(spec)), expected, scales)
                if not result.ok:
                    worst = max(result.errors, key=result.errors.get)
                    return (f"wrong result: {worst} rel. error {result.errors[worst]:.3g} > tolerance "
                            f"{result.tolerance:.3g} ({name}, {n_rows} rows{', strided' if strided else ''}, "
                            f"eps={eps})")
    return None
