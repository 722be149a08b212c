"""The verifier's comparison: a correct fp32 backward passes wherever its outputs are ill-conditioned, and the
check is as tight as before where they are not."""
from __future__ import annotations

import pytest
import torch

from autonorm import reference, verify
from autonorm.spec import NormSpec


def plain_fp32_backward(spec: NormSpec):
    """The textbook backward in fp32 (what every backend's kernel computes), as a kernel."""
    def kernel(dy, x, w, mean, rstd, dh, offset):
        xhat = (x - mean[:, None] if mean is not None else x) * rstd[:, None]
        g = dy * (w + offset) if w is not None else dy
        dx = g - xhat * (g * xhat).mean(1, keepdim=True)
        if mean is not None:
            dx = dx - g.mean(1, keepdim=True)
        dx = dx * rstd[:, None] + (dh if dh is not None else 0)
        dw = (dy * xhat).sum(0) if w is not None else None
        return dx, dw, dy.sum(0) if spec.bias else None
    return kernel


# (op, N, rows, strided): the shortest rows, where dx is a difference of near-equal terms (RMSNorm at N = 1: x_hat
# is +-1 and dx ~ eps; LayerNorm at N = 2: a nearly constant row loses digits to centering), and few rows, where
# a dW column's sum can cancel by chance. Before the comparison knew this, these reached 2.6e-5 to 1.7e-4.
ILL_CONDITIONED = [("rmsnorm", 1, verify.FEW_ROWS, False), ("rmsnorm", 1, 13, True), ("rmsnorm", 1, 1031, False),
                   ("layernorm", 2, verify.FEW_ROWS, False), ("layernorm", 3, 13, True)]


@pytest.mark.parametrize("op,n,rows,strided", ILL_CONDITIONED)
def test_a_correct_fp32_backward_passes_where_its_outputs_cancel(op, n, rows, strided):
    spec = NormSpec(op, "bwd", "float32", "float32", n, bias=op == "layernorm")
    kernel = plain_fp32_backward(spec)
    for seed in range(20):
        inputs = verify.make_inputs(spec, rows, seed=seed, strided=strided)
        result = verify.compare(spec, inputs, kernel(*inputs.args(spec)))
        assert result.ok, (seed, result.errors)


def test_a_wrong_backward_still_fails_at_n_1():
    """The scale is the size of dx's terms: a kernel that drops x_hat's correction is off by 100% of it."""
    spec = NormSpec("rmsnorm", "bwd", "float32", "float32", 1)
    inputs = verify.make_inputs(spec, verify.FEW_ROWS)
    dx, dw, db = plain_fp32_backward(spec)(*inputs.args(spec))
    uncorrected = inputs.dy * inputs.weight * inputs.rstd[:, None]
    assert verify.compare(spec, inputs, (uncorrected, dw, db)).errors["dx"] > 0.5
    assert verify.compare(spec, inputs, (dx, dw * 1.01, db)).errors["dweight"] > 10 * verify.compare(
        spec, inputs, (dx, dw, db)).tolerance


@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_well_conditioned_outputs_are_held_as_tightly_as_before(op):
    """At N = 4096 the terms' size is the output's own (dW's root sum of squares differs from the sum by
    the chance of 4096 columns, a few percent either way): an error of twice the tolerance in any output fails."""
    spec = NormSpec(op, "bwd", "float32", "float32", 4096, bias=op == "layernorm")
    inputs = verify.make_inputs(spec, 257)
    expected = verify.expected_outputs(spec, inputs)
    scales = reference.backward_scales(op, inputs.dy, inputs.x, inputs.weight, inputs.bias, inputs.eps,
                                       inputs.offset)
    tol = reference.tolerance(torch.float32)
    gen = torch.Generator().manual_seed(1)
    for name in ("dx", "dweight", "dbias"):
        exp = expected[name]
        if exp is None:
            continue
        assert scales[name].norm() < 1.05 * exp.norm(), name
        noise = torch.randn(exp.shape, generator=gen, dtype=torch.float64)
        off = exp + noise * (2 * tol * exp.norm() / noise.norm())
        assert reference.rel_l2(off, exp, scales[name]) > 1.9 * tol, name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_element_is_an_infinite_error(bad):
    expected = torch.randn(64, 32, dtype=torch.float64)
    actual = expected.float().clone()
    actual[17, 5] = bad
    assert reference.rel_l2(actual, expected) == float("inf")
    assert reference.rel_l2(expected.float(), expected) < 1e-6


@pytest.mark.parametrize("relative", [2e-6, 1e-5, 2e-5])
def test_rel_l2_in_fp32_measures_errors_at_the_fp32_tolerance(relative):
    """The fp32 arithmetic of rel_l2 reads an fp32 output's error to within 2% even at a tenth of fp32's
    tolerance, so a kernel just past the tolerance fails and one under it passes, as in fp64."""
    gen = torch.Generator().manual_seed(3)
    expected = torch.randn(1031, 512, generator=gen, dtype=torch.float64) * 3 + 1
    noise = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    actual = (expected + noise * (relative * expected.norm() / noise.norm())).float()
    exact = float((actual.double() - expected).norm() / expected.norm())  # fp64, as a reference
    assert reference.rel_l2(actual, expected) == pytest.approx(exact, rel=0.02)


def test_each_call_gets_a_copy_of_the_cases_inputs_with_their_strides():
    spec = NormSpec("layernorm", "bwd", "float32", "float32", 48, **NormSpec.feature_kwargs("weight+bias"))
    drawn = verify.make_inputs(spec, 9, strided=True)
    fresh = verify._fresh(drawn)
    for name in ("x", "weight", "bias", "dy", "mean", "rstd"):
        a, b = getattr(drawn, name), getattr(fresh, name)
        assert torch.equal(a, b) and a.stride() == b.stride() and a.data_ptr() != b.data_ptr(), name
    assert fresh.x.stride(0) > spec.hidden  # still row-strided


def test_a_kernel_that_writes_into_its_inputs_spoils_no_later_candidates_check():
    spec = NormSpec("rmsnorm", "bwd", "float32", "float32", 32, **NormSpec.feature_kwargs("weight"))
    right = plain_fp32_backward(spec)

    def scribbler(dy, x, w, mean, rstd, dh, offset):
        out = right(dy, x, w, mean, rstd, dh, offset)
        for t in (dy, x, w, rstd):
            t.fill_(7.0)  # after computing: this candidate is right, its inputs are ruined
        return out
    assert verify.check_candidate(spec, scribbler, 8) is None
    assert verify.check_candidate(spec, right, 8) is None
