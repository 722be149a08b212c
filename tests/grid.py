"""The correctness grid every backend runs (the kernel contract in README), shared by the backend test files.

Awkward sizes on purpose: 1, primes, non-powers of two, and one row larger than
any on-chip block (65537) so chunked paths run. Features and layouts are crossed
with a subset of dtypes and sizes to keep interpreter/simulator runs affordable.
"""
from __future__ import annotations

import pytest
import torch

from autonorm import verify
from autonorm.spec import NormSpec

HIDDEN = (1, 7, 123, 760, 1128, 4096, 5120, 65537)
DTYPES = ("float32", "float16", "bfloat16")
OPS = ("rmsnorm", "layernorm")
DIRECTIONS = ("fwd", "bwd")


def rows_for(hidden: int) -> int:
    """Few rows for huge rows (the interpreter is slow); several rows elsewhere, odd on purpose."""
    return 2 if hidden > 10_000 else 5


def _features(op: str) -> list[dict]:
    extra = [dict(weight=True, bias=True)] if op == "layernorm" else [dict(weight=True, offset=True)]
    return [dict(weight=False), dict(weight=True, residual=True), *extra]


def cases(hidden=HIDDEN, dtypes=DTYPES, feature_hidden=(123, 4096), feature_dtypes=("float32", "bfloat16")):
    """(id, spec, rows, strided) tuples covering sizes x dtypes, then features, layouts and weight dtypes."""
    out = []
    for op in OPS:
        for direction in DIRECTIONS:
            for dt in dtypes:
                for n in hidden:
                    spec = NormSpec(op, direction, dt, dt, n)
                    out.append((f"{op}-{direction}-{dt}-N{n}", spec, rows_for(n), False))
            for dt in feature_dtypes:
                for n in feature_hidden:
                    for feats in _features(op):
                        spec = NormSpec(op, direction, dt, dt, n, **feats)
                        out.append((f"{op}-{direction}-{dt}-N{n}-{spec.features}", spec, 3, False))
                    strided = NormSpec(op, direction, dt, dt, n, residual=True)
                    out.append((f"{op}-{direction}-{dt}-N{n}-strided", strided, 4, True))
            # fp32 weights with low-precision inputs (mixed precision training)
            for n in (760, 4096):
                spec = NormSpec(op, direction, "bfloat16", "float32", n, bias=op == "layernorm")
                out.append((f"{op}-{direction}-bf16-w32-N{n}", spec, 3, False))
            out.append((f"{op}-{direction}-zero-rows", NormSpec(op, direction, "float32", "float32", 64), 0, False))
    return out


def in_quick_tier(spec: NormSpec, strided: bool) -> bool:
    """Whether a grid case runs in the default test command; the rest are marked `slow` (`.ci/run` runs them).

    A Latin square over the sweeps keeps every size, dtype, feature and layout in the default run, for both
    ops and directions, at a third of the sweep's cost: size i meets dtype j when (i + j) % 3 == 0; the feature
    and layout cases keep float32 at the first feature size and bfloat16 at the second; fp32 weights keep 4096.
    """
    hidden_at = HIDDEN.index(spec.hidden) if spec.hidden in HIDDEN else 0
    if spec.x_dtype != spec.w_dtype:
        return spec.hidden == 4096
    if spec.hidden == 64:  # zero rows
        return True
    if spec.features != _plain(spec).features or strided:
        return (spec.x_dtype, spec.hidden) in (("float32", 123), ("bfloat16", 4096))
    return (hidden_at + DTYPES.index(spec.x_dtype)) % 3 == 0


def _plain(spec: NormSpec) -> NormSpec:
    return NormSpec(spec.op, spec.direction, spec.x_dtype, spec.w_dtype, spec.hidden)


def latin_square(rows: list[tuple], columns: list[tuple]) -> list:
    """pytest params of rows x columns (each a tuple of argument values), all but a Latin square marked `slow`.

    Cell (i, j) runs in the default test command when (i + j) % min(len(rows), len(columns)) == 0: every row
    and every column keeps at least one case there, the other cells wait for the slow tier.
    """
    k = min(len(rows), len(columns))
    return [pytest.param(*row, *column, id="-".join(map(str, (*row, *column))),
                         marks=() if (i + j) % k == 0 else pytest.mark.slow)
            for i, row in enumerate(rows) for j, column in enumerate(columns)]


def params(**kwargs):
    return [pytest.param(spec, rows, strided, id=cid,
                         marks=() if in_quick_tier(spec, strided) else pytest.mark.slow)
            for cid, spec, rows, strided in cases(**kwargs)]


def check_case(backend, spec: NormSpec, rows: int, strided: bool, device, config=None):
    """Compile `config` (default: the heuristic) and assert every output matches the reference."""
    config = config if config is not None else backend.heuristic(spec)
    kernel = backend.compile(spec, config, device)
    result = verify.check_kernel(spec, kernel, rows, device, strided=strided)
    assert result.ok, (f"{backend.name} {spec.short()} rows={rows} strided={strided} config={config.short()}: "
                       f"errors {result.errors} > tol {result.tolerance}")
    return result


def public_api_3d(op: str, dtype: torch.dtype, device) -> float:
    """Max relative error of the public function on a 3-D input vs the reference (fwd + bwd)."""
    import autonorm
    from autonorm import reference

    x = torch.randn(2, 3, 96, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(96, dtype=dtype, device=device, requires_grad=True)
    if op == "rmsnorm":
        y = autonorm.rms_norm(x, (96,), w, 1e-5)
    else:
        y = autonorm.layer_norm(x, (96,), w, None, 1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    ry, _, _, _ = reference.forward(op, x.detach(), w.detach(), eps=1e-5)
    rdx, rdw, _ = reference.backward(op, dy, x.detach(), w.detach(), eps=1e-5)
    return max(reference.rel_l2(y, ry), reference.rel_l2(x.grad, rdx), reference.rel_l2(w.grad, rdw))
