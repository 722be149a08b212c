"""`autonorm render`: prints each backend's generated source; untrusted --config text is refused cleanly."""
from __future__ import annotations

import hashlib
import importlib.util

import pytest

from autonorm import cli
from autonorm.backends import BACKENDS, get_backend
from autonorm.spec import NormSpec


def _module_exists(name: str) -> bool:
    # Backends are written in parallel: one whose module is not there yet is skipped, not failed.
    return importlib.util.find_spec(BACKENDS[name].split(":")[0]) is not None


BACKEND_NAMES = [pytest.param(name, marks=pytest.mark.skipif(not _module_exists(name),
                                                             reason=f"{name} not written yet"))
                 for name in ("triton", "cupy", "numba", "numba-cpu", "torch")]


def _render(capsys, *argv):
    code = cli.main(["render", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("op,direction,flags", [
    ("rmsnorm", "fwd", ["--offset", "--residual"]),
    ("layernorm", "bwd", ["--bias", "--w-dtype", "float32"]),
])
def test_render_every_backend(capsys, backend, op, direction, flags):
    code, out, err = _render(capsys, "--backend", backend, "--op", op, "--direction", direction,
                             "--dtype", "bf16", "--hidden", "300", *flags)
    assert code == 0, err
    assert out.strip()
    # stderr carries the sha256 of exactly what was printed, and the heuristic config.
    spec = NormSpec(op, direction, "bfloat16", "float32" if "--w-dtype" in flags else "bfloat16", 300,
                    bias="--bias" in flags, residual="--residual" in flags, offset="--offset" in flags)
    source = get_backend(backend).render(spec, get_backend(backend).heuristic(spec))
    assert out == (source.text if source.text.endswith("\n") else source.text + "\n")
    assert f"sha256 {hashlib.sha256(source.text.encode()).hexdigest()}" in err


def test_numba_source_compiles_and_shows_the_config(capsys):
    code, out, err = _render(capsys, "--backend", "numba", "--op", "layernorm", "--direction", "bwd",
                             "--hidden", "300", "--config", "threads=32,items=2,rows=1")
    assert code == 0, err
    compile(out, "<rendered>", "exec")  # valid Python
    assert "THREADS = 32" in out and "ITEMS = 2" in out and "NCHUNK = 5" in out
    assert "config threads=32,items=2,rows=1" in err
    # A partial --config keeps the heuristic's other knobs (here its threads and items).
    heuristic = get_backend("numba").heuristic(NormSpec("layernorm", "bwd", "float32", "float32", 300))
    code, out, err = _render(capsys, "--backend", "numba", "--op", "layernorm", "--direction", "bwd",
                             "--hidden", "300", "--config", "rows=1")
    assert code == 0, err
    assert f"config threads={heuristic.threads},items={heuristic.items},rows=1" in err


def test_no_weight_flag(capsys):
    code, out, err = _render(capsys, "--backend", "numba", "--hidden", "64", "--no-weight")
    assert code == 0, err
    assert "w[j]" not in out


@pytest.mark.parametrize("config,message", [
    ("threads=48", "threads='48' is not one of"),
    ("threads=32,bogus=1", "no knob 'bogus'"),
    ("threads", "not key=value"),
    ("threads=1024,rows=8", "exceeds 1024"),  # in the domain, invalid for the spec
])
def test_bad_config_exits_2(capsys, config, message):
    code, out, err = _render(capsys, "--backend", "numba", "--hidden", "300", "--config", config)
    assert code == 2
    assert out == ""
    assert message in err


@pytest.mark.parametrize("value", ["__import__('os').system('touch /tmp/pwned')", "32\nimport os", "32 or 1", "3_2"])
def test_config_value_carrying_code_is_refused(capsys, value):
    code, out, err = _render(capsys, "--backend", "numba", "--hidden", "300", "--config", f"threads={value}")
    assert code == 2 and out == ""
    assert "is not one of [32, 64" in err


def test_bad_spec_and_unknown_backend_exit_2(capsys):
    code, _, err = _render(capsys, "--backend", "numba", "--hidden", "0")
    assert code == 2 and "autonorm render: error: invalid kernel: hidden size" in err
    code, _, err = _render(capsys, "--backend", "numba", "--hidden", "8", "--bias")
    assert code == 2 and "bias" in err
    code, _, err = _render(capsys, "--backend", "nope", "--hidden", "8")
    assert code == 2 and "known backends" in err
