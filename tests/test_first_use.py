"""The first-use check: a kernel no tuning run verified is checked on the first rows of its first
real call; a wrong one is disabled with one warning and the call is served by the next rung.

The fake backends of test_dispatch.py (its `clean` fixture is not used here: ours registers them
and a deliberately wrong one) compute with the torch backend's kernels; `WrongBackend` scales every
output it returns by 1.01, `LargeInputBackend` only when the input holds values above 50, so it is
right on verify's synthetic inputs and wrong on the caller's.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import test_dispatch as td
import torch
import torch.nn.functional as F

import autonorm
from autonorm import backends, db_sources, dispatch, first_use


class WrongConfig(td.FakeConfig):
    backend = "wrong"


def _off(outputs, x):
    return tuple(None if t is None else t * 1.01 for t in outputs)


class WrongBackend(td.FakeBackend):
    name = "wrong"
    config_cls = WrongConfig
    fake_hash = "wrong-template-v1"

    def wrong_on(self, x):
        return True

    def build(self, source, spec, config, device):
        right = super().build(source, spec, config, device)

        def kernel(*args):
            outputs = right(*args)
            x = args[0] if spec.direction == "fwd" else args[1]
            return _off(outputs, x) if x.numel() and self.wrong_on(x) else outputs
        return kernel


class LargeInputBackend(WrongBackend):
    name = "large"

    def wrong_on(self, x):
        return bool(x.abs().max() > 50)


def register(order=("wrong", "fake", "torch")):
    """Make the fake backends known and the heuristic rung try them in `order` (also for a subprocess)."""
    for name, cls in (("fake", td.FakeBackend), ("wrong", WrongBackend), ("large", LargeInputBackend)):
        backends.BACKENDS[name] = f"tests:{cls.__name__}"
        backends._instances[name] = cls()
    dispatch.DEFAULT_ORDER["cpu"] = order
    db_sources._shipped = lambda: []
    dispatch.reset()


@pytest.fixture(autouse=True)
def clean(monkeypatch, tmp_path):
    for var in ("AUTONORM_BACKEND", "AUTONORM_DB_PATH", "AUTONORM_DISABLE", "AUTONORM_LOG", "AUTONORM_TUNE_ON_MISS",
                "AUTONORM_VERIFY_DB", "AUTONORM_SKIP_FIRST_USE_CHECK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AUTONORM_CACHE_DIR", str(tmp_path / "cache"))  # verdicts of this test only
    for name in ("fake", "wrong", "large"):
        monkeypatch.setitem(backends.BACKENDS, name, "")
        monkeypatch.setitem(backends._instances, name, None)
    monkeypatch.setitem(dispatch.DEFAULT_ORDER, "cpu", ())
    monkeypatch.setattr(db_sources, "_shipped", lambda: [])
    register()
    db_sources.forget(user_paths=True)
    yield
    db_sources.forget(user_paths=True)
    dispatch.reset()


@pytest.fixture
def checks(monkeypatch):
    """The first-use checks run, as (spec, compiling at the time) pairs."""
    seen = []
    real = first_use.check_call

    def spy(spec, *args):
        seen.append((spec.short(), torch.compiler.is_compiling()))
        return real(spec, *args)
    monkeypatch.setattr(first_use, "check_call", spy)
    return seen


def rms(x, w):
    return autonorm.rms_norm(x, (x.shape[-1],), w, 1e-6)


def verdict_files():
    return sorted((Path(os.environ["AUTONORM_CACHE_DIR"]) / "verdicts").glob("*.json"))


def test_wrong_heuristic_kernel_is_disabled_with_one_warning_and_the_call_is_right():
    x, w = torch.randn(5, 64, requires_grad=True), torch.randn(64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="first use") as caught:
        y = rms(x, w)
        y.backward(torch.ones_like(y))
    messages = [str(m.message) for m in caught if "first use" in str(m.message)]
    assert len(messages) == 2, messages  # the forward kernel, then the backward one
    assert "wrong [block=64] for rmsnorm.fwd" in messages[0] and "rung: heuristic" in messages[0]
    assert "rmsnorm.bwd" in messages[1]
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    yr = F.rms_norm(xr, (64,), wr, 1e-6)
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)
    assert autonorm.explain("rms_norm", x, (64,), w, 1e-6).backend == "fake"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the disabled kernel is not tried again
        torch.testing.assert_close(rms(x.detach(), w.detach()), yr.detach())
    assert len(verdict_files()) == 4  # wrong fwd and bwd, then the fake backend's, which passed


def test_a_passing_kernel_leaves_the_bare_kernel_in_the_memo(checks):
    register(("fake", "torch"))
    x, w = torch.randn(3, 64), torch.randn(64)
    key = dispatch.make_key("rmsnorm", "fwd", x, w, None, None, 0.0)
    assert isinstance(dispatch.choice_for(key).kernel, first_use.FirstUseCheck)
    rms(x, w)
    rms(x, w)
    assert len(checks) == 1
    choice = dispatch.choice_for(key)
    assert not isinstance(choice.kernel, first_use.FirstUseCheck) and choice.check == ""


def test_the_check_sees_the_callers_rows():
    # Right on verify's synthetic inputs, wrong on these: only a check on the real call catches it.
    register(("large", "fake", "torch"))
    x, w = torch.randn(4, 64) * 100, torch.randn(64)
    with pytest.warns(RuntimeWarning, match="large .* gave a wrong result at its first use"):
        y = rms(x, w)
    torch.testing.assert_close(y, F.rms_norm(x, (64,), w, 1e-6))


def test_nearest_hidden_record_is_checked(tmp_path):
    register(("fake", "torch"))
    autonorm.load_db(td.write_db(tmp_path / "db.json", [td.record(64, 4, 256, backend="wrong",
                                                                  template_hash=WrongBackend.fake_hash)]))
    x, w = torch.randn(3, 100), torch.randn(100)
    with pytest.warns(RuntimeWarning, match=r"wrong \[block=256\] for rmsnorm.fwd .* \(rung: nearest-hidden\)"):
        y = rms(x, w)
    torch.testing.assert_close(y, F.rms_norm(x, (100,), w, 1e-6))
    assert autonorm.explain("rms_norm", x, (100,), w, 1e-6).rung == "heuristic"


def test_exact_records_are_trusted_unless_verify_db(tmp_path, monkeypatch, checks):
    # The tuning run that wrote an exact record verified its kernel on this device: no check by default.
    autonorm.load_db(td.write_db(tmp_path / "db.json", [td.record(64, 4, 64, backend="wrong",
                                                                  template_hash=WrongBackend.fake_hash)]))
    x, w = torch.randn(3, 64), torch.randn(64)
    torch.testing.assert_close(rms(x, w), F.rms_norm(x, (64,), w, 1e-6) * 1.01)
    assert checks == []
    monkeypatch.setenv("AUTONORM_VERIFY_DB", "1")
    autonorm.reset(keep_databases=True)
    with pytest.warns(RuntimeWarning, match=r"\(rung: exact\)"):
        torch.testing.assert_close(rms(x, w), F.rms_norm(x, (64,), w, 1e-6))
    assert len(checks) == 2  # the exact record, then the fake heuristic the ladder moved on to
    monkeypatch.delenv("AUTONORM_VERIFY_DB")
    autonorm.reset(keep_databases=True)
    with pytest.warns(RuntimeWarning, match="verdict kept in"):  # a kernel known to be wrong is never used
        torch.testing.assert_close(rms(x, w), F.rms_norm(x, (64,), w, 1e-6))


def test_the_environment_variable_turns_the_check_off(monkeypatch, checks):
    monkeypatch.setenv("AUTONORM_SKIP_FIRST_USE_CHECK", "1")
    autonorm.reset()
    x, w = torch.randn(3, 64), torch.randn(64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(rms(x, w), F.rms_norm(x, (64,), w, 1e-6) * 1.01)
    assert checks == [] and verdict_files() == []


def test_verdicts_are_reused_after_reset_and_in_a_new_process(checks):
    x, w = torch.randn(3, 64), torch.randn(64)
    with pytest.warns(RuntimeWarning, match="first use"):
        rms(x, w)
    assert len(checks) == 2  # wrong (failed), fake (passed)
    autonorm.reset()
    with pytest.warns(RuntimeWarning, match="verdict kept in") as caught:
        torch.testing.assert_close(rms(x, w), F.rms_norm(x, (64,), w, 1e-6))
    assert len([m for m in caught if "verdict kept in" in str(m.message)]) == 1
    assert len(checks) == 2  # both verdicts read back: nothing checked again
    script = (
        "import sys, warnings, torch; sys.path.insert(0, sys.argv[1]); import test_first_use as t\n"
        "from autonorm import first_use\n"
        "t.register()\n"
        "first_use.check_call = lambda *a: sys.exit('checked again')\n"
        "x, w = torch.randn(3, 64), torch.randn(64)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    torch.testing.assert_close(t.rms(x, w), torch.nn.functional.rms_norm(x, (64,), w, 1e-6))\n"
        "assert any('verdict kept in' in str(m.message) for m in caught), [str(m.message) for m in caught]\n")
    done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True,
                          text=True, timeout=120, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_backward_check_judges_on_the_real_rows():
    # Rows of very different variance, some of it below eps: the reference must work from the forward's
    # statistics (the backward gets rstd, not eps), or every backward check would fall to synthetic inputs.
    spec = autonorm.spec.NormSpec("layernorm", "bwd", "float32", "float32", 64, bias=True)
    x = torch.randn(6, 64) * torch.tensor([1e-3, 1e-2, 1.0, 10.0, 300.0, 1.0]).unsqueeze(1) + 2.0
    w = torch.randn(64)
    _, mean, rstd = torch.native_layer_norm(x, (64,), w, torch.zeros(64), 1e-5)
    args = (torch.randn(6, 64), x, w, mean.view(6), rstd.view(6), None, 0.0)
    right = backends.get_backend("fake").compile(spec, td.FakeConfig(64))
    torch_kernel = backends.get_backend("torch").compile(spec, backends.get_backend("torch").heuristic(spec))
    assert first_use.check_call(spec, right, torch_kernel, args, x.device) is None
    wrong = backends.get_backend("wrong").compile(spec, WrongConfig(64))
    error = first_use.check_call(spec, wrong, torch_kernel, args, x.device)
    assert error is not None and "rel. error" in error and "synthetic" not in error


def test_no_check_without_values_or_during_capture(monkeypatch, checks):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w = torch.randn(3, 64), torch.randn(64)
    key = dispatch.make_key("rmsnorm", "fwd", x, w, None, None, 0.0)
    pending = dispatch.choice_for(key).kernel
    with FakeTensorMode() as mode:  # a tracer's tensors hold no values: nothing to check
        y = pending(mode.from_tensor(x), mode.from_tensor(w), None, None, 1e-6, 0.0)[0]
    assert y.shape == (3, 64)
    # CUDA graph capture (no synchronization allowed): torch's kernel serves the captured call.
    monkeypatch.setattr(first_use, "_capturing", lambda device: True)
    torch.testing.assert_close(pending(x, w, None, None, 1e-6, 0.0)[0], F.rms_norm(x, (64,), w, 1e-6))
    assert checks == [] and verdict_files() == []
    assert dispatch.choice_for(key).kernel is pending  # still to be checked at the next eager call


def test_no_check_while_compiling(checks):
    x, w = torch.randn(3, 64), torch.randn(64)
    compiled = torch.compile(rms, backend="aot_eager", fullgraph=True)
    with pytest.warns(RuntimeWarning, match="first use"):
        torch.testing.assert_close(compiled(x, w), F.rms_norm(x, (64,), w, 1e-6))
    assert checks and not any(compiling for _, compiling in checks)  # checked at run time, never in tracing
