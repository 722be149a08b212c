"""The torch backend passes the shared grid: it proves the grid and the reference agree."""
import pytest
from grid import check_case, params

from autonorm.backends import get_backend


@pytest.mark.parametrize("spec,rows,strided", params(hidden=(1, 7, 760, 4096, 65537)))
def test_torch_backend_grid(spec, rows, strided, device):
    check_case(get_backend("torch"), spec, rows, strided, device)


@pytest.mark.parametrize("op", ("rmsnorm", "layernorm"))
@pytest.mark.parametrize("direction", ("fwd", "bwd"))
def test_compile_baseline_target_traces_without_graph_breaks(op, direction):
    """The tuner's torch.compile baseline must be one compiled graph: the eager forward's
    torch._fused_rms_norm graph-breaks, which would make the "torch.compile" baseline time eager."""
    import torch

    from autonorm.backends.torch_eager import compile_target
    from autonorm.spec import NormSpec
    from autonorm.verify import make_inputs

    spec = NormSpec(op, direction, "bfloat16", "bfloat16", 96)
    args = make_inputs(spec, 8).args(spec)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(compile_target(spec))(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    eager = get_backend("torch").build(None, spec, None, "cpu")
    for got, want in zip(compile_target(spec)(*args), eager(*args)):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
