"""The built wheel: the templates, the shipped databases, the backends and the CPU harness's header are inside
the autonorm package, and nothing lands at the top level of site-packages."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
