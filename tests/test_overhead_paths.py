"""The cheap paths taken by tiny calls compute what the general paths compute.

scripts/overhead.py times them; these tests only check values (no timing asserts):
- functional.py's common-call fast path vs the fully checked path,
- a kernel's `y_only` entry (no-grad inference) vs its full forward,
- numba-cpu's serial variant (small problems) vs its parallel one.
"""
import pytest
import torch

import autonorm
from autonorm import functional, verify
from autonorm.backends import get_backend
from autonorm.spec import NormSpec


def _backend(name):
    b = get_backend(name)
    if not b.is_available():
        pytest.skip(b.unavailable_reason())
    return b


@pytest.mark.parametrize("backend_name", ["numba-cpu", "torch"])
@pytest.mark.parametrize("op,feats", [("rmsnorm", {}), ("rmsnorm", {"weight": False}), ("rmsnorm", {"offset": True}),
                                      ("layernorm", {"bias": True}), ("layernorm", {"weight": False})])
@pytest.mark.parametrize("dtype,w_dtype", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                           ("float16", "float32")])
def test_y_only_matches_full_forward(backend_name, op, feats, dtype, w_dtype):
    backend = _backend(backend_name)
    spec = NormSpec(op, "fwd", dtype, w_dtype, 123, **feats)
    kernel = backend.compile(spec, backend.heuristic(spec))
    assert hasattr(kernel, "y_only"), "no-residual forwards offer y_only"
    for rows, strided in ((1, False), (7, True), (0, False)):
        inp = verify.make_inputs(spec, rows, strided=strided)
        y_full = kernel(inp.x, inp.weight, inp.bias, None, 1e-5, inp.offset)[0]
        y = kernel.y_only(inp.x, inp.weight, inp.bias, 1e-5, inp.offset)
        assert y.shape == y_full.shape and y.dtype == y_full.dtype and y.is_contiguous()
        assert torch.equal(y, y_full), f"{spec.short()} rows={rows}"
        ref = verify.reference.forward(op, inp.x, inp.weight, inp.bias, None, 1e-5, inp.offset)[0]
        if rows:
            err = ((y.double() - ref).norm() / ref.norm()).item()
            assert err < verify.reference.TOLERANCES[spec.torch_x_dtype], err


def test_residual_kernels_have_no_y_only():
    """ops.norm_fwd must never drop h: a residual kernel is always called in full."""
    backend = _backend("numba-cpu")
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 64, residual=True)
    assert not hasattr(backend.compile(spec, backend.heuristic(spec)), "y_only")


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_numba_serial_variant_is_bitwise_parallel(monkeypatch, op, direction):
    """The serial variant (small problems) and the parallel one give identical bits, dW/dB included."""
    from autonorm.backends import numba_cpu

    backend = _backend("numba-cpu")
    spec = NormSpec(op, direction, "bfloat16", "float32", 333, bias=op == "layernorm", residual=True)
    config = backend.heuristic(spec).replace(rows_per_task=8)
    inputs = verify.make_inputs(spec, 45, strided=True)
    outs = []
    for serial_below in (0, 1 << 40):  # never serial, always serial
        monkeypatch.setattr(numba_cpu, "SERIAL_BELOW", serial_below)
        backend._cache.clear()  # the launcher reads the threshold when it is built
        outs.append(backend.compile(spec, config)(*inputs.args(spec)))
    backend._cache.clear()
    for a, b in zip(*outs):
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend_name", ["numba-cpu", "torch"])
def test_fast_path_matches_checked_path(use_backend, backend_name, monkeypatch):
    """Calls the fast path accepts give the same values as the fully checked path."""
    _backend(backend_name)
    use_backend(backend_name)
    gen = torch.Generator().manual_seed(0)
    x3 = torch.randn(2, 3, 48, generator=gen)
    w = torch.randn(48, generator=gen)
    b = torch.randn(48, generator=gen)
    calls = [
        lambda: autonorm.rms_norm(x3, (48,), w, 1e-6),
        lambda: autonorm.rms_norm(x3, 48, w, offset=1.0),
        lambda: autonorm.rms_norm(x3[0], [48], None),
        lambda: autonorm.rms_norm(x3.bfloat16(), (48,), w),  # fp32 weight, bf16 input; eps from finfo
        lambda: autonorm.layer_norm(x3, (48,), w, b, 1e-5),
        lambda: autonorm.layer_norm(x3[:, 1], 48, None, None),
        lambda: autonorm.layer_norm(x3, (48,), None, b),  # bias without weight: checked path only
    ]
    fast = [c() for c in calls]
    monkeypatch.setattr(functional, "_fast_n", lambda *args: 0)  # force the checked path
    for c, y in zip(calls, fast):
        ref = c()
        assert y.shape == ref.shape and y.dtype == ref.dtype
        assert torch.equal(y, ref)
    torch.testing.assert_close(fast[0], torch.nn.functional.rms_norm(x3, (48,), w, 1e-6))
    torch.testing.assert_close(fast[4], torch.nn.functional.layer_norm(x3, (48,), w, b, 1e-5))


def test_fast_path_declines_unusual_calls():
    x = torch.randn(3, 16)
    w = torch.randn(16)
    assert functional._fast_n(x, (16,), w, None) == 16
    assert functional._fast_n(x, 16, w, torch.randn(16)) == 16
    assert functional._fast_n(x, (16,), torch.nn.Parameter(w), torch.nn.Parameter(w)) == 16  # modules' params
    declined = [
        (x.t().contiguous().t(), (3,), None, None),           # last dim not packed
        (x, (3, 16), None, None),                              # two normalized dims
        (x, (8,), None, None),                                 # mismatched size
        (x, (16,), torch.randn(32)[::2], None),                # non-contiguous weight
        (x, (16,), torch.randn(1, 16), None),                  # 2-D weight
        (x, (16,), w.double(), None),                          # wrong weight dtype
        (x, (16,), w, torch.randn(16).bfloat16()),             # bias dtype differs from weight
        (x, (16,), None, torch.randn(16)),                     # bias without weight
        (x.int(), (16,), None, None),                          # unsupported input dtype
        (x, (True,), None, None),                              # not an int
        (torch.tensor(1.0), (1,), None, None),                 # 0-d input
    ]
    for args in declined:
        assert functional._fast_n(*args) == 0, args


def test_grad_path_unchanged_by_fast_path(use_backend):
    """With requires_grad the fast path still records autograd (values and grads match torch)."""
    _backend("numba-cpu")
    use_backend("numba-cpu")
    x = torch.randn(1, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    y = autonorm.layer_norm(x, (64,), w, b, 1e-5)
    y.sum().backward()
    xr, wr, br = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    torch.nn.functional.layer_norm(xr, (64,), wr, br, 1e-5).sum().backward()
    for got, want in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
