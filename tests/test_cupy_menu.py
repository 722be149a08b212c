"""The CuPy tuning menu: a few dozen to a few hundred candidates a spec out of thousands of valid configs, every
structural variant that is not dominated in traffic, the heuristic always; the full domain still judges databases."""
from __future__ import annotations

import pytest

from autonorm.backends.cupy import CupyBackend, CupyConfig
from autonorm.grids import STANDARD
from autonorm.spec import NormSpec

BACKEND = CupyBackend()


def _variants(configs):
    return {(c.row_cache, c.partials, c.prefetch) for c in configs}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_standard_spec_has_a_menu_of_tens_to_hundreds_with_its_heuristic(dtype):
    for spec in (s for s in STANDARD.specs() if s.x_dtype == dtype):
        menu = BACKEND.space(spec)
        assert 10 <= len(menu) <= 400, (spec.short(), len(menu))
        assert len(set(menu)) == len(menu) and CupyConfig.heuristic(spec) in menu
        assert all(CupyConfig.is_valid(spec, c) is None for c in menu)


def test_the_menu_keeps_every_variant_that_is_not_dominated_in_traffic():
    """RMSNorm backward at 4K (about 10,000 valid configs): every cluster and prefetch variant stays; the row
    re-read (row_cache=none) and the per-row partials (global, columns) go, since a row cache and on-chip
    partials fit."""
    spec = NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 4096)
    full, menu = CupyConfig.space(spec), BACKEND.space(spec)
    assert len(full) > 20 * len(menu)
    dominated = {v for v in _variants(full) if v[0] == "none" or v[1] in ("global", "columns")}
    assert _variants(menu) == _variants(full) - dominated
    assert {c.vec for c in menu} == {8}  # the widest: 16-byte accesses


def test_the_row_is_reread_only_where_no_row_cache_fits():
    wide = NormSpec("layernorm", "fwd", "float32", "float32", 262144, bias=True)
    assert "none" in {c.row_cache for c in BACKEND.space(wide)}  # beside clusters, which need sm_90
    narrow = NormSpec("layernorm", "fwd", "float32", "float32", 4096, bias=True)
    assert "none" not in {c.row_cache for c in BACKEND.space(narrow)}


def test_a_database_config_off_the_menu_is_still_valid():
    spec = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 4096)
    narrow = CupyConfig.heuristic(spec).replace(vec=2)
    assert narrow not in BACKEND.space(spec)
    BACKEND.validate(spec, narrow)  # no error: the domain, not the menu, judges untrusted input
