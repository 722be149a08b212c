"""`autonorm check`: every chosen backend against the fp64 reference, from the command line."""
import subprocess
import sys


def test_check_passes_the_torch_backend_at_odd_and_even_sizes():
    out = subprocess.run([sys.executable, "-m", "autonorm.cli", "check", "--backends", "torch", "--hidden", "7,64"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 failed" in out.stdout
