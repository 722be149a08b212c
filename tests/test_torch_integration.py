"""torch integration: custom ops under torch.compile(fullgraph=True), the eager fast path, opcheck."""
import pytest
import torch
import torch.nn.functional as F

import autonorm
from autonorm import ops


class Block(torch.nn.Module):
    """A pre-norm block using every autonorm feature: residual fusion, Gemma offset, LayerNorm with bias."""

    def __init__(self, n=48):
        super().__init__()
        self.norm1 = autonorm.RMSNorm(n, eps=1e-6)
        self.norm2 = autonorm.RMSNorm(n, eps=1e-6, offset=1.0)
        self.norm3 = autonorm.LayerNorm(n)
        self.proj = torch.nn.Linear(n, n)
        with torch.no_grad():
            for norm in (self.norm1, self.norm2, self.norm3):
                norm.weight.normal_(0.3, 0.5)
            self.norm3.bias.normal_()

    def forward(self, x, residual):
        y, h = self.norm1(x, residual)
        y = self.proj(y)
        return self.norm3(self.norm2(y) + h)


def _run(model, x, r):
    model.zero_grad()
    x, r = x.clone().requires_grad_(), r.clone().requires_grad_()
    out = model(x, r)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), x.grad, r.grad, grads


@pytest.fixture(autouse=True)
def _torch_backend(use_backend):
    use_backend("torch")  # the kernels under test here are the integration, not a backend


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Block()
    x, r = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    eager = _run(model, x, r)
    compiled = _run(torch.compile(model, fullgraph=True, backend="aot_eager"), x, r)
    torch.testing.assert_close(compiled[:3], eager[:3])
    assert compiled[3].keys() == eager[3].keys()
    for name in eager[3]:
        torch.testing.assert_close(compiled[3][name], eager[3][name], msg=name)


def test_compile_inductor_fullgraph():
    # Inductor lowers around the opaque custom ops; values must still match eager.
    torch.manual_seed(1)
    torch._dynamo.reset()
    norm = autonorm.RMSNorm(32)
    x = torch.randn(7, 32, requires_grad=True)
    fn = torch.compile(lambda t: norm(t) * 2, fullgraph=True)
    y = fn(x)
    y.sum().backward()
    torch.testing.assert_close(y, F.rms_norm(x, (32,), norm.weight) * 2)
    gx = x.grad.clone()
    x.grad = None
    (F.rms_norm(x, (32,), norm.weight) * 2).sum().backward()
    torch.testing.assert_close(gx, x.grad)


def test_eager_fast_path_equals_custom_op():
    # Eager calls skip the custom op's dispatch; both must produce the same values and gradients.
    torch.manual_seed(2)
    x = torch.randn(6, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    r = torch.randn(6, 40, requires_grad=True)
    results = []
    for fn in (ops.norm_fwd, ops.norm_fwd_op):
        y, h, _, _ = fn(x, w, b, r, "layernorm", 1e-5, 0.0)
        (y.square().sum() + h.sum() * 0.5).backward()
        results.append([y.detach(), h.detach()] + [t.grad.clone() for t in (x, w, b, r)])
        for t in (x, w, b, r):
            t.grad = None
    for fast, op in zip(*results):
        torch.testing.assert_close(fast, op)


def test_no_grad_path_returns_plain_tensors():
    x = torch.randn(4, 16)
    with torch.no_grad():
        y = autonorm.rms_norm(x, (16,), torch.ones(16, requires_grad=True))
    assert y.grad_fn is None
    torch.testing.assert_close(y, F.rms_norm(x, (16,), torch.ones(16)))


def test_opcheck_custom_ops():
    x = torch.randn(5, 24)
    w = torch.randn(24, requires_grad=True)
    r = torch.randn(5, 24)
    torch.library.opcheck(ops.norm_fwd_op, (x, w, None, r, "rmsnorm", 1e-6, 0.5))
    torch.library.opcheck(ops.norm_fwd_op, (x, w.detach(), torch.randn(24), None, "layernorm", 1e-5, 0.0))
