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


@pytest.mark.parametrize("backend", ["torch", "numba-cpu"])
@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_gradient_penalty_matches_torch(use_backend, backend, op):
    """create_graph=True (a gradient penalty): the second-order terms reach x, weight, bias and the residual."""
    use_backend(backend)
    torch.manual_seed(3)
    x, r = torch.randn(5, 24, requires_grad=True), torch.randn(5, 24, requires_grad=True)
    w = (torch.randn(24) * 0.5 + 1).requires_grad_()
    b = torch.randn(24, requires_grad=True)
    c = torch.linspace(-1, 1, 24)
    params = (x, r, w, b) if op == "layernorm" else (x, r, w)

    def ours():
        if op == "layernorm":
            return autonorm.layer_norm(x, (24,), w, b, residual=r)
        return autonorm.rms_norm(x, (24,), w, 1e-6, offset=0.5, residual=r)

    def theirs():
        h = x + r
        if op == "layernorm":
            return F.layer_norm(h, (24,), w, b), h
        return F.rms_norm(h, (24,), w + 0.5, 1e-6), h

    results = []
    for fn in (ours, theirs):
        y, h = fn()
        out = (y * c).sum() + (h * h).sum() * 0.1
        first = torch.autograd.grad(out, params, create_graph=True)
        penalty = out + sum(g.square().sum() for g in first)
        results.append(torch.autograd.grad(penalty, params))
    for name, a, e in zip(("x", "residual", "weight", "bias"), *results):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=name)


def test_negative_views_are_read_as_negative(use_backend):
    """torch._neg_view keeps x in memory and a bit meaning -x: kernels reading memory must see -x."""
    use_backend("numba-cpu")
    x, w, b = torch.randn(4, 32), torch.randn(32), torch.randn(32)
    neg = torch._neg_view
    assert neg(x).is_neg()
    torch.testing.assert_close(autonorm.rms_norm(neg(x), (32,), neg(w)), F.rms_norm(-x, (32,), -w))
    torch.testing.assert_close(autonorm.rms_norm(x, (32,), neg(w)), F.rms_norm(x, (32,), -w))
    torch.testing.assert_close(autonorm.layer_norm(neg(x), (32,), w, neg(b)), F.layer_norm(-x, (32,), w, -b))
    y, h = autonorm.rms_norm(x, (32,), w, residual=neg(b.expand(4, 32)))
    torch.testing.assert_close(h, x - b)
    xg = x.clone().requires_grad_()
    autonorm.rms_norm(xg, (32,), w).backward(neg(torch.ones(4, 32)))  # a negative view as the incoming gradient
    xr = x.clone().requires_grad_()
    F.rms_norm(xr, (32,), w).backward(-torch.ones(4, 32))
    torch.testing.assert_close(xg.grad, xr.grad)


def test_fx_traces_the_modules_to_one_node_each():
    """torch.fx (and what builds on it: FX quantization, pipeline splitters) traces a model using autonorm."""
    torch.manual_seed(2)
    model = Block()
    traced = torch.fx.symbolic_trace(model)
    targets = [node.target for node in traced.graph.nodes if node.op == "call_function"]
    assert targets.count(autonorm.functional.rms_norm) == 2 and autonorm.functional.layer_norm in targets
    x, r = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    torch.testing.assert_close(traced(x, r), model(x, r), rtol=0, atol=0)


class _Logged(torch.Tensor):
    """A tensor subclass that records the functions called on it."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("call", [
    lambda x, w: autonorm.rms_norm(x, 32, w),
    lambda x, w: autonorm.rms_norm(x, 32, w, residual=x)[0],
    lambda x, w: autonorm.layer_norm(x, 32, w, w),
])
def test_tensor_subclasses_and_modes_see_the_call(call):
    x, w = torch.randn(3, 32), torch.randn(32)
    _Logged.calls = []
    got = call(x.as_subclass(_Logged), w)
    assert type(got) is _Logged and _Logged.calls[0] in (autonorm.functional.rms_norm, autonorm.functional.layer_norm)
    torch.testing.assert_close(got.as_subclass(torch.Tensor), call(x, w), rtol=0, atol=0)

    class Mode(torch.overrides.TorchFunctionMode):
        seen: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    with Mode():
        autonorm.rms_norm(x, 32, w, residual=x)  # (the common call without a residual skips the check: ~0.1 us)
    assert Mode.seen[0] is autonorm.functional.rms_norm


def test_export_with_a_dynamic_batch_saves_loads_and_matches_eager(tmp_path):
    """torch.export (the way to AOTInductor and ExecuTorch) records the custom op; the saved program loads
    wherever autonorm is imported and takes another batch size."""
    torch.manual_seed(3)
    model = Block()
    x, r = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x, r), dynamic_shapes=({0: batch}, {0: batch}))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "autonorm.norm_fwd.default" in targets
    torch.export.save(program, tmp_path / "block.pt2")
    loaded = torch.export.load(tmp_path / "block.pt2")
    x, r = torch.randn(7, 5, 48), torch.randn(7, 5, 48)
    torch.testing.assert_close(loaded.module()(x, r), model(x, r), rtol=0, atol=0)
