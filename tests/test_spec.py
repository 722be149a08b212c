"""NormSpec, what a kernel computes: its feature tag and direction, the combinations it refuses by name, and the
row-count buckets that databases and the dispatcher key on."""
import pytest

from autonorm.spec import NormSpec, rows_bucket


def test_a_spec_names_its_features_and_refuses_what_no_kernel_computes():
    spec = NormSpec("layernorm", "fwd", "bfloat16", "float32", 4096, bias=True, residual=True)
    assert spec.features == "weight+bias+residual"
    assert spec.with_direction("bwd").direction == "bwd"
    with pytest.raises(ValueError, match="unknown op"):
        NormSpec("batchnorm", "fwd", "float32", "float32", 8)
    with pytest.raises(ValueError, match="weight dtype"):
        NormSpec("rmsnorm", "fwd", "bfloat16", "float16", 8)
    with pytest.raises(ValueError, match="hidden size"):
        NormSpec("rmsnorm", "fwd", "float32", "float32", 0)
    with pytest.raises(ValueError, match="bias is a LayerNorm feature"):
        NormSpec("rmsnorm", "fwd", "float32", "float32", 8, bias=True)


def test_a_row_count_falls_in_the_next_power_of_two_bucket():
    assert [rows_bucket(m) for m in (0, 1, 2, 3, 1000, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]
