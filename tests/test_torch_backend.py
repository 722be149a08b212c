"""The torch backend passes the shared grid: it proves the grid and the reference agree."""
import pytest

from autonorm.backends import get_backend

from grid import check_case, params


@pytest.mark.parametrize("spec,rows,strided", params(hidden=(1, 7, 760, 4096, 65537)))
def test_torch_backend_grid(spec, rows, strided, device):
    check_case(get_backend("torch"), spec, rows, strided, device)
