"""A new user's first hour: tune, and the next process uses the result; calls outside the kernels fall back."""
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import autonorm
from autonorm import db_sources


def _env(tmp_path, **extra):
    env = dict(os.environ, AUTONORM_USER_DB_DIR=str(tmp_path / "user-db"), AUTONORM_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("AUTONORM_DB_PATH", None)
    env.pop("AUTONORM_BACKEND", None)
    return {**env, **extra}


def _python(env, code):
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_tune_then_a_fresh_process_uses_the_tuned_record(tmp_path):
    """The README's flow on numba-cpu: `autonorm tune` with no --out, then `explain` in a new process."""
    pytest.importorskip("numba")
    pytest.importorskip("optuna")
    env = _env(tmp_path)
    out = _python(env, "import sys; from autonorm.cli import main; sys.exit(main(["
                       "'tune', '--quick', '--ops', 'rmsnorm', '--directions', 'fwd', '--hidden', '128', "
                       "'--rows', '32', '--trials', '3', '--backends', 'numba-cpu,torch', '--no-compile-baseline']))")
    last = out.strip().splitlines()[-1]
    assert str(tmp_path / "user-db") in last and "the next `import autonorm` on this machine uses it" in last
    explained = _python(env, "import torch, autonorm\n"
                             "x, w = torch.randn(32, 128), torch.ones(128)\n"
                             "print(autonorm.explain('rms_norm', x, (128,), w))")
    assert "(rung: exact)" in explained and "rmsnorm.fwd x=float32 w=float32 N=128 rows<=32" in explained
    where = _python(env, "from autonorm.cli import main; main(['db', 'where'])")
    assert f"[user] {tmp_path / 'user-db'}" in where


def test_search_order_shipped_user_env_then_load_db(tmp_path, monkeypatch):
    from test_db import sample_db

    user, env_dir, extra = tmp_path / "user", tmp_path / "env", tmp_path / "extra.json"
    sample_db(1).save(user / "a.json")
    sample_db(1).save(env_dir / "b.json")
    sample_db(1).save(extra)
    monkeypatch.setenv("AUTONORM_USER_DB_DIR", str(user))
    monkeypatch.setenv("AUTONORM_DB_PATH", str(env_dir))
    autonorm.reset()
    try:
        autonorm.load_db(extra)
        found = [(origin, path) for origin, path, _ in db_sources.sources() if origin != "shipped"]
        assert found == [("user", user / "a.json"), ("AUTONORM_DB_PATH", env_dir / "b.json"),
                         ("autonorm.load_db", extra)]
    finally:
        db_sources.forget(user_paths=True)
        monkeypatch.delenv("AUTONORM_DB_PATH")
        autonorm.reset()


# --- fallback, not failure -------------------------------------------------------------------
X = torch.randn(4, 64)


@pytest.mark.parametrize("call,reference", [
    (lambda: autonorm.rms_norm(X.double(), (64,), torch.ones(64)),
     lambda: F.rms_norm(X.double(), (64,), torch.ones(64))),
    (lambda: autonorm.layer_norm(X.double(), (64,)), lambda: F.layer_norm(X.double(), (64,))),
    (lambda: autonorm.layer_norm(X.double(), 64), lambda: F.layer_norm(X.double(), (64,))),  # an int too
    (lambda: autonorm.rms_norm(X, 64, torch.ones(64, dtype=torch.float64)),
     lambda: F.rms_norm(X, (64,), torch.ones(64, dtype=torch.float64))),
    (lambda: autonorm.rms_norm(X, (64,), torch.full((64,), 2.0, dtype=torch.float16)),
     lambda: F.rms_norm(X, (64,), torch.full((64,), 2.0, dtype=torch.float16))),
    (lambda: autonorm.rms_norm(X.half(), (64,), torch.ones(64, dtype=torch.bfloat16)),
     lambda: F.rms_norm(X.half(), (64,), torch.ones(64, dtype=torch.bfloat16))),
    (lambda: torch.vmap(lambda t: autonorm.rms_norm(t, (64,), torch.ones(64)))(X.view(2, 2, 64)),
     lambda: F.rms_norm(X.view(2, 2, 64), (64,), torch.ones(64))),
    (lambda: torch.vmap(lambda t: autonorm.layer_norm(t, (64,)))(X.view(2, 2, 64)),
     lambda: F.layer_norm(X.view(2, 2, 64), (64,))),
    (lambda: autonorm.rms_norm(X.double(), (64,), torch.ones(64, dtype=torch.float64), offset=1.0,
                               residual=X.double())[0],
     lambda: F.rms_norm(2 * X.double(), (64,), torch.full((64,), 2.0, dtype=torch.float64))),
])
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's own, on mixed dtypes
def test_inputs_outside_the_kernels_run_torch(call, reference):
    got, want = call(), reference()
    assert got.dtype == want.dtype and torch.allclose(got, want, atol=1e-6)


def test_hidden_above_the_kernels_maximum_runs_torch(monkeypatch):
    from autonorm import functional

    monkeypatch.setattr(functional, "MAX_HIDDEN", 32)  # the real maximum (2**20) needs 4 MiB rows
    assert torch.equal(autonorm.rms_norm(X, (64,)), F.rms_norm(X, (64,)))
    assert "above the kernels' maximum 32" in str(autonorm.explain("rms_norm", X, (64,)))


def test_float64_gradcheck_and_explain_and_one_log_line(caplog, monkeypatch):
    monkeypatch.setenv("AUTONORM_LOG", "1")
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="autonorm"):
        assert torch.autograd.gradcheck(lambda a, c, d: autonorm.layer_norm(a, (16,), c, d), (x, w, b))
        autonorm.layer_norm(x, (16,), w, b)
    lines = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert lines == ["autonorm: layer_norm falls back to torch's own implementation: torch.float64 input "
                     "(kernels take float32, float16, bfloat16)"]  # once, however many calls
    choice = autonorm.explain("layer_norm", x, (16,), w, b)
    assert choice.rung == "fallback" and "torch.float64 input" in str(choice)


def test_bad_input_gets_torchs_kind_of_error():
    with pytest.raises(RuntimeError, match=r"weight has shape \[8, 8\], expected normalized_shape \[64\]"):
        autonorm.rms_norm(X, (64,), torch.ones(8, 8))  # torch refuses it too; autonorm used to flatten it
    with pytest.raises(ValueError):
        autonorm.layer_norm(X, (64,), torch.ones(8, 8))  # still a ValueError for autonorm's own callers
    with pytest.raises(TypeError, match="weight must be a tensor or None, got list"):
        autonorm.rms_norm(X, (64,), [1.0] * 64)
    with pytest.raises(TypeError, match="weight must be a tensor or None, got list"):
        autonorm.layer_norm(X, (64,), [1.0] * 64)
    with pytest.raises(RuntimeError, match="expected scalar type"):  # torch's own error, from torch
        autonorm.layer_norm(X, (64,), torch.ones(64), torch.zeros(64, dtype=torch.float64))
