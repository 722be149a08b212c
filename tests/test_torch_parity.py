"""A drop-in replacement keeps a model's outputs: autonorm against torch where torch defines the answer.

Mixed dtypes with the default eps, CPU autocast, torch.func transforms over the weight and bias
(`functional_call` + `grad`, per-weight `vmap`), and an empty normalized shape.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import autonorm

BACKENDS = ["torch", "numba-cpu"]
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's own warning


def _backend(use_backend, name):
    if name == "numba-cpu":
        pytest.importorskip("numba")
    use_backend(name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_dtype", [torch.float32, "input"])
def test_default_eps_and_mixed_dtypes_equal_torch_bit_for_bit(use_backend, backend, dtype, weight_dtype):
    """eps=None is float32's eps for 16-bit inputs too (torch computes them in fp32); bf16's 2**-7 moved
    every element. Small activations make the eps visible."""
    _backend(use_backend, backend)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 96, generator=gen) * 0.05).to(dtype)
    ours, theirs = autonorm.RMSNorm(96), torch.nn.RMSNorm(96)
    with torch.no_grad():
        ours.weight.normal_(generator=gen)
        theirs.weight.copy_(ours.weight)
    if weight_dtype == "input":
        ours, theirs = ours.to(dtype), theirs.to(dtype)
    with torch.no_grad():
        want = theirs(x)
        assert torch.equal(ours(x), want)
        assert torch.equal(autonorm.rms_norm(x, (96,)), F.rms_norm(x, (96,)))  # no weight


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_autocast_bf16_activations_fp32_weight_equal_torch(use_backend, backend):
    """Under CPU autocast a Linear hands the norm bf16 activations while its weight stays fp32."""
    _backend(use_backend, backend)
    torch.manual_seed(0)
    proj = torch.nn.Linear(64, 64)
    theirs = torch.nn.RMSNorm(64)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    ours = autonorm.patch(torch.nn.Sequential(proj, theirs)[1])
    x = torch.randn(8, 64) * 0.02
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = proj(x)
        want, got = theirs(h), ours(h)
        fp32_want, fp32_got = theirs(x), ours(x)  # an fp32 input stays fp32 under autocast, as torch's
    assert h.dtype == torch.bfloat16 and got.dtype == want.dtype
    assert torch.equal(got, want)
    # fp32 output: the same up to summation order, not bit for bit
    assert fp32_got.dtype == fp32_want.dtype == torch.float32
    torch.testing.assert_close(fp32_got, fp32_want)


# --- torch.func over the parameters ----------------------------------------------------------
X = torch.randn(4, 64)
W, B = torch.randn(64), torch.randn(64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("module_cls,torch_cls", [(autonorm.RMSNorm, torch.nn.RMSNorm),
                                                  (autonorm.LayerNorm, torch.nn.LayerNorm)])
def test_functional_call_grad_over_parameters_matches_torch(use_backend, backend, module_cls, torch_cls):
    """Meta-learning's pattern: gradients of a loss with respect to a patched model's parameters."""
    _backend(use_backend, backend)
    ours, theirs = module_cls(64), torch_cls(64)
    params = {name: torch.randn_like(p) for name, p in theirs.named_parameters()}

    def loss(module):
        return lambda p: (functional_call(module, p, (X,)) * torch.linspace(-1, 1, 64)).pow(2).sum()

    got, want = grad(loss(ours))(params), grad(loss(theirs))(params)
    assert got.keys() == want.keys() == params.keys()
    for name in params:
        torch.testing.assert_close(got[name], want[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_and_vmap_over_weight_and_bias_match_torch(use_backend, backend):
    _backend(use_backend, backend)
    rms = grad(lambda w: autonorm.rms_norm(X, (64,), w).pow(3).sum())(W)
    torch.testing.assert_close(rms, grad(lambda w: F.rms_norm(X, (64,), w).pow(3).sum())(W))
    ln = grad(lambda b: autonorm.layer_norm(X, (64,), W, b).pow(3).sum())(B)
    torch.testing.assert_close(ln, grad(lambda b: F.layer_norm(X, (64,), W, b).pow(3).sum())(B))
    hessian = torch.func.hessian(lambda w: autonorm.rms_norm(X, (64,), w).pow(3).sum())(W)
    torch.testing.assert_close(hessian, torch.func.hessian(lambda w: F.rms_norm(X, (64,), w).pow(3).sum())(W))
    weights = torch.randn(3, 64)
    torch.testing.assert_close(vmap(lambda w: autonorm.rms_norm(X, (64,), w))(weights),
                               vmap(lambda w: F.rms_norm(X, (64,), w))(weights))
    torch.testing.assert_close(vmap(lambda b: autonorm.layer_norm(X, (64,), W, b))(weights),
                               vmap(lambda b: F.layer_norm(X, (64,), W, b))(weights))
    residuals = torch.randn(3, 4, 64)
    y, h = vmap(lambda r: autonorm.rms_norm(X, (64,), W, residual=r))(residuals)
    torch.testing.assert_close(y, F.rms_norm(X + residuals, (64,), W))
    torch.testing.assert_close(h, X + residuals)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_carries_tangents_as_torch(use_backend, backend):
    """Dual tensors of torch.autograd.forward_ad: the kernels would return y without its tangent."""
    import torch.autograd.forward_ad as fwAD

    _backend(use_backend, backend)
    tangent_w, tangent_x = torch.randn(64), torch.randn(4, 64)
    with fwAD.dual_level():
        w, x = fwAD.make_dual(W, tangent_w), fwAD.make_dual(X, tangent_x)
        pairs = [(autonorm.rms_norm(X, (64,), w), F.rms_norm(X, (64,), w)),
                 (autonorm.layer_norm(x, (64,), W, B), F.layer_norm(x, (64,), W, B))]
        for ours, theirs in pairs:
            ours, theirs = fwAD.unpack_dual(ours), fwAD.unpack_dual(theirs)
            assert ours.tangent is not None
            torch.testing.assert_close(ours.primal, theirs.primal)
            torch.testing.assert_close(ours.tangent, theirs.tangent)
    assert autonorm.explain("rms_norm", X, (64,), W).rung != "fallback"  # outside the dual level: the kernels


def test_explain_names_a_transformed_weight_as_a_fallback():
    reasons = []
    grad(lambda w: reasons.append(autonorm.explain("rms_norm", X, (64,), w)) or w.sum())(W)
    assert reasons[0].rung == "fallback" and "torch.func transform" in reasons[0].reason


# --- an empty normalized shape ---------------------------------------------------------------
@pytest.mark.parametrize("shape,normalized_shape", [((4, 0), (0,)), ((0, 0), (0,)), ((4, 3, 0), (3, 0))])
def test_an_empty_normalized_shape_returns_what_torch_returns(shape, normalized_shape):
    x = torch.randn(shape, requires_grad=True)
    w = torch.ones(normalized_shape, requires_grad=True)
    for ours, theirs in [(autonorm.rms_norm(x, normalized_shape), F.rms_norm(x, normalized_shape)),
                         (autonorm.rms_norm(x, normalized_shape, w), F.rms_norm(x, normalized_shape, w)),
                         (autonorm.layer_norm(x, normalized_shape, w, w), F.layer_norm(x, normalized_shape, w, w))]:
        assert ours.shape == theirs.shape == shape and ours.dtype == theirs.dtype
        ours.sum().backward()  # a gradient flows (empty) as torch's does
    assert x.grad.shape == shape and w.grad.shape == normalized_shape
    y, h = autonorm.rms_norm(x, normalized_shape, residual=x)
    assert y.shape == h.shape == shape
    assert autonorm.explain("rms_norm", x, normalized_shape).rung == "fallback"
