"""README's claims hold as written: what `all` installs, what `--quick` tunes, what `tuning_db/` ships,
and what is bit-exact against torch in bf16."""
import re
from pathlib import Path

import pytest
import tomllib
import torch
import torch.nn.functional as F

import autonorm

ROOT = Path(__file__).resolve().parent.parent
README = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())  # one line: claims wrap
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_all_extra_is_what_readme_lists():
    (requirement,) = EXTRAS["all"]
    parts = set(re.search(r"\[(.*)\]", requirement).group(1).split(","))
    claim = re.search(r"`all` is every extra for a CUDA 13 machine: the runtime ones \(`([a-z0-9,]+)`\) and `(\w+)`",
                      README)
    assert claim, "README no longer says what `all` installs"
    assert parts == {*claim.group(1).split(","), claim.group(2)}
    assert parts == set(EXTRAS) - {"all", "dev", "cuda12"}  # every extra but the tools and the other CUDA major


def test_quick_tunes_what_readme_says():
    from autonorm import cli
    from autonorm.cli import tune as tune_cli

    parser, _, _ = cli._parser(["tune"])
    specs = tune_cli.specs_from_args(parser.parse_args(["tune", "--quick"]))
    forward = {(s.op, s.hidden) for s in specs if s.direction == "fwd"}
    backward = [(s.op, s.hidden, s.x_dtype) for s in specs if s.direction == "bwd"]
    assert forward == {(op, n) for op in ("rmsnorm", "layernorm") for n in (1024, 4096)}
    assert backward == [("rmsnorm", 1024, "float32")]
    assert ("`--quick` tunes the forward of both ops at hidden 1024 and 4096 and one backward, RMSNorm's at "
            "hidden 1024 (float32, 1024 rows; LayerNorm's backward is not tuned)") in README


def test_readme_says_what_tuning_db_ships():
    shipped = sorted(path.name for path in (ROOT / "tuning_db").glob("*.json"))
    if shipped:
        assert all(f"tuning_db/{name}" in README for name in shipped)
    else:
        assert "`tuning_db/*.json`; this release ships none" in README


# The README's bit-exactness paragraph, held to what it says about the forward.
@pytest.mark.parametrize("backend,dtype,max_share", [("torch", torch.bfloat16, 0.0), ("torch", torch.float16, 0.0),
                                                     ("numba-cpu", torch.bfloat16, 1e-4),
                                                     ("numba-cpu", torch.float16, 1e-3)])
def test_forward_is_torchs_bit_for_bit_but_for_rare_one_step_roundings(use_backend, backend, dtype, max_share):
    if backend == "numba-cpu":
        pytest.importorskip("numba")
    use_backend(backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1024, generator=gen).to(dtype)
    w32 = torch.rand(1024, generator=gen) + 0.5
    w, b = w32.to(dtype), torch.randn(1024, generator=gen).to(dtype)
    step = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10  # one step of the dtype at 1.0
    with torch.no_grad():
        pairs = [(autonorm.rms_norm(x, (1024,), w32), F.rms_norm(x, (1024,), w32)),
                 (autonorm.rms_norm(x, (1024,), w), F.rms_norm(x, (1024,), w)),
                 (autonorm.layer_norm(x, (1024,), w, b), F.layer_norm(x, (1024,), w, b))]
    for ours, theirs in pairs:
        differ = ours != theirs
        assert differ.float().mean().item() <= max_share
        if differ.any():  # one step of the output's own magnitude, never more
            gap = (ours.float() - theirs.float()).abs()[differ]
            assert (gap <= step * theirs.float().abs()[differ].clamp_min(1.0) * 2).all()
