"""autonorm.rms_norm / layer_norm as a user calls them: bad input is an error naming the problem, a forced
backend that cannot run says so, and a non-contiguous last dimension is served like torch serves it."""
import pytest
import torch

import autonorm
from autonorm.errors import BackendUnavailableError, UnknownBackendError


@pytest.mark.parametrize("call,match", [
    (lambda x, w: autonorm.rms_norm(x, (64,), torch.ones(63)), "weight has shape"),
    (lambda x, w: autonorm.rms_norm(x, (32,), None), "normalized_shape"),
    (lambda x, w: autonorm.rms_norm(x.to(torch.int32), (64,), None), "dtype"),
    (lambda x, w: autonorm.rms_norm(x, (64,), torch.ones(64, device="meta")), "is on meta"),
    (lambda x, w: autonorm.rms_norm(x, (64,), w, residual=torch.ones(3, 64)), "residual"),
    (lambda x, w: autonorm.rms_norm(x, (64,), None, offset=1.0), "offset"),
    (lambda x, w: autonorm.rms_norm(x, 64.0, None), "normalized_shape must be an int or a sequence of ints, got float"),
    (lambda x, w: autonorm.layer_norm(x.double(), 64.0), "normalized_shape must be an int or a sequence"),
])
def test_bad_input_errors_name_the_problem(call, match):
    x, w = torch.randn(4, 64), torch.ones(64)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, w)


def test_a_forced_backend_that_is_unknown_or_cannot_run_is_an_error(use_backend):
    x = torch.randn(2, 16)
    use_backend("no-such-backend")
    with pytest.raises(UnknownBackendError, match="known backends"):
        autonorm.rms_norm(x, (16,))
    use_backend("cupy")  # never usable on CPU tensors
    with pytest.raises(BackendUnavailableError, match="cupy"):
        autonorm.rms_norm(x, (16,))


def test_non_contiguous_last_dim_is_made_contiguous(use_backend):
    use_backend("torch")
    x = torch.randn(64, 8).t()  # last-dim stride 64
    assert x.stride(-1) != 1
    torch.testing.assert_close(autonorm.rms_norm(x, (64,), eps=1e-6),
                               torch.nn.functional.rms_norm(x, (64,), eps=1e-6))
