"""Core contracts: specs, config domains, registry, rendering, packaging, and bad input."""
import dataclasses
import subprocess
import sys
import zipfile
from pathlib import Path

import jinja2
import numpy as np
import pytest
import torch

import autonorm
from autonorm.backends import BACKENDS, get_backend
from autonorm.backends.base import Backend
from autonorm.config import Config, knob
from autonorm.errors import BackendUnavailableError, InvalidConfigError, UnknownBackendError
from autonorm.render import environment
from autonorm.spec import NormSpec, rows_bucket

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class DemoConfig(Config):
    backend = "demo"
    BLOCK: int = knob((64, 128, 256))
    mode: str = knob(("registers", "shared"))
    fast: bool = knob((False, True))


def test_config_domain_and_from_dict():
    assert DemoConfig(128, "shared", True).to_dict() == {"BLOCK": 128, "mode": "shared", "fast": True}
    assert len(list(DemoConfig.all_configs())) == 12
    with pytest.raises(InvalidConfigError, match="BLOCK=100"):
        DemoConfig(100, "shared", False)
    with pytest.raises(InvalidConfigError, match="unknown keys"):
        DemoConfig.from_dict({"BLOCK": 64, "mode": "shared", "fast": False, "extra": 1})
    with pytest.raises(InvalidConfigError, match="missing keys"):
        DemoConfig.from_dict({"BLOCK": 64})
    # A value carrying code is not a domain literal, so it never reaches a template.
    with pytest.raises(InvalidConfigError, match="outside its domain"):
        DemoConfig.from_dict({"BLOCK": 64, "mode": "shared\n}\nimport os; os.system('x')", "fast": False})
    # bool and int are different types even though True == 1.
    with pytest.raises(InvalidConfigError):
        DemoConfig.from_dict({"BLOCK": 64, "mode": "shared", "fast": 1})
    with pytest.raises(InvalidConfigError, match="must be an object"):
        DemoConfig.from_dict(["BLOCK", 64])


def test_spec_validation():
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
    assert [rows_bucket(m) for m in (0, 1, 2, 3, 1000, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]


def test_registry_unknown_name_lists_known_ones():
    with pytest.raises(UnknownBackendError) as info:
        get_backend("tensorrt")
    for name in BACKENDS:
        assert name in str(info.value)


def test_backend_abc_rejects_incomplete_subclass():
    class Incomplete(Backend):
        name = "incomplete"
        config_cls = DemoConfig

        def version(self):
            return "0"

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def test_render_is_strict():
    with pytest.raises(jinja2.UndefinedError):
        environment().from_string("{{ config.NOT_A_FIELD }}").render(config=DemoConfig(64, "shared", False))


def test_wrong_config_type_is_refused():
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 8)
    with pytest.raises(InvalidConfigError, match="expects a NoConfig"):
        get_backend("torch").render(spec, DemoConfig(64, "shared", False))


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


def test_forced_backend_errors(use_backend):
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


def test_modules_match_torch_state_dict_and_outputs(use_backend):
    use_backend("torch")
    ours, theirs = autonorm.LayerNorm(32), torch.nn.LayerNorm(32)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.weight.data.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x))
    rms, trms = autonorm.RMSNorm(32, eps=1e-6), torch.nn.RMSNorm(32, eps=1e-6)
    assert rms.state_dict().keys() == trms.state_dict().keys()
    torch.testing.assert_close(rms(x), trms(x))
    gemma = autonorm.RMSNorm(32, offset=1.0)
    assert torch.all(gemma.weight == 0)  # (1 + w) starts as the identity scale
    torch.testing.assert_close(gemma(x), trms(x), atol=1e-5, rtol=1e-5)


def test_modules_and_functions_take_numpy_integers_as_torch_nn_does(use_backend):
    use_backend("torch")
    x = torch.randn(3, 32)
    for ours, theirs in ((autonorm.LayerNorm, torch.nn.LayerNorm), (autonorm.RMSNorm, torch.nn.RMSNorm)):
        module = ours(np.int64(32))
        assert module.normalized_shape == theirs(np.int64(32)).normalized_shape == (32,)
        torch.testing.assert_close(module(x), theirs(32)(x))
    torch.testing.assert_close(autonorm.rms_norm(x, np.int64(32)), torch.nn.functional.rms_norm(x, (32,)))
    torch.testing.assert_close(autonorm.layer_norm(x.double(), np.int32(32)),  # the torch fallback too
                               torch.nn.functional.layer_norm(x.double(), (32,)))


def test_check_command_runs_torch_backend():
    out = subprocess.run([sys.executable, "-m", "autonorm.cli", "check", "--backends", "torch", "--hidden", "7,64"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 failed" in out.stdout


def test_wheel_contains_templates_and_databases(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    wheel = next(tmp_path.glob("autonorm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {p.relative_to(ROOT).as_posix() for p in (ROOT / "templates").rglob("*.j2")}
    assert templates, "no templates found in the source tree"
    for t in templates:
        assert f"autonorm/{t}" in names, f"{t} missing from the wheel"
    for db in (ROOT / "tuning_db").glob("*.json"):
        assert f"autonorm/tuning_db/{db.name}" in names
    assert "autonorm/tuning_db/__init__.py" in names
    assert "autonorm/backends/base.py" in names
    assert "autonorm/cuda_host.h" in names  # the CPU harness of the CuPy kernels compiles against it
    assert not any(n.startswith("backends/") or n.startswith("templates/") for n in names)


def test_output_contract_helpers():
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
