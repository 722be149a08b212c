"""The backend interface (backends/base.py and the registry): an unknown backend name lists the known ones, a
backend must implement every abstract method, the output contract's buffers, and the stream wrapper."""
import pytest
import torch

from autonorm.backends import BACKENDS, get_backend
from autonorm.backends.base import Backend
from autonorm.config import NoConfig
from autonorm.errors import UnknownBackendError
from autonorm.spec import NormSpec


def test_an_unknown_backend_name_lists_the_known_ones():
    with pytest.raises(UnknownBackendError) as info:
        get_backend("tensorrt")
    for name in BACKENDS:
        assert name in str(info.value)


def test_a_backend_missing_an_abstract_method_cannot_be_made():
    class Incomplete(Backend):
        name = "incomplete"
        config_cls = NoConfig

        def version(self):
            return "0"

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def test_output_buffers_follow_the_contract():
    """forward_outputs / backward_outputs: row-major outputs of the contract's dtypes, zero parameter
    gradients for zero rows (the sum over no rows), none for absent parameters."""
    from autonorm.backends.base import backward_outputs, forward_outputs

    ln = NormSpec("layernorm", "fwd", "bfloat16", "float32", 8, bias=True, residual=True)
    x = torch.randn(8, 3).t()  # (3, 8) with strides (1, 3): not row-major
    y, h, mean, rstd = forward_outputs(ln, x)
    assert y.shape == h.shape == (3, 8) and y.is_contiguous() and h.is_contiguous()
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (3,)
    rms = NormSpec("rmsnorm", "fwd", "float32", "float32", 8)
    assert forward_outputs(rms, torch.empty(2, 8))[1] is None and forward_outputs(rms, torch.empty(2, 8))[2] is None

    bwd = NormSpec("layernorm", "bwd", "bfloat16", "float32", 8, bias=True)
    dx, dw, db = backward_outputs(bwd, torch.empty(0, 8, dtype=torch.bfloat16))
    assert dx.shape == (0, 8) and dw.dtype == db.dtype == torch.float32
    assert torch.equal(dw, torch.zeros(8)) and torch.equal(db, torch.zeros(8))
    no_weight = NormSpec("rmsnorm", "bwd", "float32", "float32", 8, weight=False)
    assert backward_outputs(no_weight, torch.empty(4, 8))[1:] == (None, None)


def test_current_stream_wraps_each_stream_once(monkeypatch):
    from types import SimpleNamespace

    from autonorm.backends.base import CurrentStream

    handles = iter([7, 7, 9, 7])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: SimpleNamespace(cuda_stream=next(handles)))
    wrapped = []
    stream = CurrentStream(lambda handle: wrapped.append(handle) or f"stream-{handle}", 0)
    assert [stream() for _ in range(4)] == ["stream-7", "stream-7", "stream-9", "stream-7"]
    assert wrapped == [7, 9]  # one wrapper per stream handle, not per call
