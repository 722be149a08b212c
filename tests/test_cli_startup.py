"""`--help`, `--version` and usage errors answer without importing torch (its import takes seconds);
`import autonorm` registers the custom ops wherever torch is already imported."""
import subprocess
import sys

QUICK_ANSWERS = [["--help"], ["--version"], [], ["check", "--help"], ["db", "--help"], ["db", "show", "--help"],
                 ["db", "validate", "--help"], ["render", "--help"], ["audit", "--help"], ["tune", "--help"],
                 ["bench", "--help"], ["check", "--hidden", "abc"], ["check", "--dtypes", "fp32", "--nope"],
                 ["render", "--op", "x"], ["audit", "--dtype"], ["tune", "--hidden", "abc"], ["bench", "--shapes"],
                 ["nope"]]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_help_and_usage_errors_do_not_import_torch():
    """One process runs them all in turn (a process each took minutes on a loaded machine): torch is
    absent after the last, so none imported it."""
    done = _python("import sys\nfrom autonorm.cli import main\n"
                   f"for argv in {QUICK_ANSWERS!r}:\n"
                   "    print('RESULT', argv, main(argv), 'torch' in sys.modules)")
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert len(results) == len(QUICK_ANSWERS), done.stderr
    for line, argv in zip(results, QUICK_ANSWERS):
        assert line in (f"RESULT {argv} 0 False", f"RESULT {argv} 2 False"), line
    assert "Traceback" not in done.stderr


def test_import_autonorm_loads_the_torch_face_on_first_use():
    done = _python("import sys, autonorm\n"
                   "print('torch' in sys.modules, 'autonorm.ops' in sys.modules)\n"
                   "print(autonorm.rms_norm.__module__, 'autonorm.ops' in sys.modules, 'rms_norm' in dir(autonorm))")
    assert done.stdout.split() == ["False", "False", "autonorm.functional", "True", "True"], done.stderr


def test_import_autonorm_after_torch_registers_the_custom_ops():
    """What `torch.export.load` of a program that records autonorm's op needs."""
    done = _python("import torch, autonorm\nprint(torch.ops.autonorm.norm_fwd.default)")
    assert done.stdout.strip() == "autonorm.norm_fwd.default", done.stderr


def test_bench_offers_every_provider_in_report_order():
    """The command line's provider names are plain data (no torch); the providers themselves must match them."""
    from autonorm.bench.options import PROVIDER_NAMES
    from autonorm.bench.providers import PROVIDERS

    assert tuple(PROVIDERS) == PROVIDER_NAMES
