"""Packaging: dependencies and extras as a user installs them, the license, `python -m autonorm`, CI."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]


def _names(requirements) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_runtime_needs_are_core_dependencies():
    # Loading any tuning database validates it with jsonschema: a plain `pip install autonorm` must load one.
    assert {"torch", "jsonschema", "jinja2", "filelock"} <= _names(PYPROJECT["project"]["dependencies"])


def test_extras_per_machine():
    assert _names(EXTRAS["cpu"]) == {"numba"}
    assert _names(EXTRAS["cuda12"]) == {"cupy-cuda12x", "numba-cuda"}
    assert _names(EXTRAS["cuda13"]) == {"cupy-cuda13x", "numba-cuda"}
    assert any(r.startswith("numba-cuda[cu12]") for r in EXTRAS["cuda12"])
    assert any(r.startswith("numba-cuda[cu13]") for r in EXTRAS["cuda13"])
    assert "psycopg" in _names(EXTRAS["postgres"]) and any("binary" in r for r in EXTRAS["postgres"])
    assert {"optuna", "tqdm"} <= _names(EXTRAS["tune"])
    # `all`: runtime extras for one CUDA major, no test tools.
    (all_req,) = EXTRAS["all"]
    parts = set(re.search(r"\[(.*)\]", all_req).group(1).split(","))
    assert {"cpu", "triton", "tune", "postgres", "report"} <= parts and "dev" not in parts
    assert len(parts & {"cuda12", "cuda13"}) == 1
    assert "pytest" in _names(EXTRAS["dev"]) and "pytest" not in _names(sum((EXTRAS[p] for p in parts), []))


def test_license():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"  # an SPDX expression (PEP 639)
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    setuptools_req = next(r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools"))
    assert int(setuptools_req.split(">=")[1].split(".")[0]) >= 77  # the first setuptools reading SPDX licenses


def test_python_dash_m_autonorm():
    out = subprocess.run([sys.executable, "-m", "autonorm", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("autonorm ")


def test_ci_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("pip install") and "pytest" in line)
    assert command in readme
    assert "set -euo pipefail" in ci
    # The default run leaves the slow tier out; CI runs it after, with the command README gives for it. Both
    # spread their tests over the CPUs with pytest-xdist, which the dev extra (CI's install) brings.
    addopts = PYPROJECT["tool"]["pytest"]["ini_options"]["addopts"]
    assert addopts == ["-m", "not slow", "-n", "auto"] and "pytest-xdist" in _names(EXTRAS["dev"])
    slow_tier = next(line for line in ci.splitlines() if line.startswith("python -m pytest") and "-m slow" in line)
    assert slow_tier in readme


def _dry_run(tmp_path, extra: str) -> dict[str, str]:
    """What `pip install autonorm[extra]` installs on a machine that has torch already (name -> version).

    A throwaway environment holds a stand-in torch (metadata only), as a machine with torch from the
    PyTorch index for its CUDA major would: the resolver then answers for autonorm's own requirements."""
    env = tmp_path / extra
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = next(env.glob("lib/python*/site-packages"))
    info = site / "torch-2.13.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")
    report = tmp_path / f"{extra}.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install",
                           "--dry-run", "--quiet", "--report", str(report), f"{ROOT}[{extra}]"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "does not provide the extra" not in proc.stderr, proc.stderr
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


@pytest.mark.slow
@pytest.mark.parametrize("major", [12, 13])
def test_cuda_extra_resolves_to_its_major(tmp_path, major):
    """Needs the package index (CI reaches PyPI)."""
    other = 25 - major
    wheels = _dry_run(tmp_path, f"cuda{major}")
    assert f"cupy-cuda{major}x" in wheels and f"cupy-cuda{other}x" not in wheels
    assert "torch" not in wheels  # the stand-in satisfied it
    assert wheels["cuda-bindings"].split(".")[0] == str(major)  # numba-cuda's CUDA bindings of that major
    nvrtc = [name for name in wheels if name.startswith("nvidia-cuda-nvrtc")]
    assert nvrtc and all(name.endswith("-cu12") == (major == 12) for name in nvrtc)
