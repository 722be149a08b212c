"""Templates stay readable: no template nests its Jinja blocks more than 3 deep, and the CuPy backward, split by
row cache into one body template each (bwd_registers / bwd_shared / bwd_none, routed by bwd.cu.j2), renders
each strategy's own kernel body."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from autonorm.backends.cupy import CupyBackend, CupyConfig
from autonorm.spec import NormSpec

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
MAX_DEPTH = 3

_COMMENT = re.compile(r"{#.*?#}", re.S)
_TAG = re.compile(r"{%-?\s*(\w+)(.*?)-?%}", re.S)
_OPENERS = {"if", "for", "macro", "call", "filter", "with", "block", "autoescape"}


def nesting_depth(text: str) -> int:
    """The deepest nesting of Jinja blocks in a template's text (comments ignored; a `set` without `=` is a
    block, as `{% set x %}...{% endset %}` is)."""
    depth = deepest = 0
    for name, rest in _TAG.findall(_COMMENT.sub("", text)):
        if name in _OPENERS or (name == "set" and "=" not in rest):
            depth += 1
            deepest = max(deepest, depth)
        elif name.startswith("end"):
            depth -= 1
    return deepest


def test_the_counter_counts_blocks_not_branches():
    assert nesting_depth("{% if a %}{% for x in y %}{% if b %}{% elif c %}{% else %}{% endif %}{% endfor %}"
                         "{% endif %}") == 3
    assert nesting_depth("{% set v = 1 %}{% include 'x' %}{# {% if a %}{% if b %} #}") == 0
    assert nesting_depth("{% macro m() %}{% set s %}{%- if a -%}{% endif %}{% endset %}{% endmacro %}") == 3


@pytest.mark.parametrize("path", sorted(p.relative_to(TEMPLATES).as_posix() for p in TEMPLATES.rglob("*.j2")))
def test_no_template_nests_more_than_three_blocks(path):
    depth = nesting_depth((TEMPLATES / path).read_text())
    assert depth <= MAX_DEPTH, f"{path} nests {depth} Jinja blocks deep"


BWD = NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 4096, bias=True, residual=True)


def bwd(row_cache: str, partials: str, threads: int = 256, prefetch: int = 0) -> CupyConfig:
    unroll = 1 if row_cache == "registers" or row_cache.startswith("cluster") else 2
    return CupyConfig(threads=threads, vec=8, rows=1, unroll=unroll, row_cache=row_cache, partials_per_sm=4,
                      partials=partials, prefetch=prefetch)


# (body template, config, a line only that body template renders for it)
STRATEGIES = [
    ("registers", bwd("registers", "registers"), "float xh[ITEMS][VEC], dv[ITEMS][VEC];"),
    ("registers", bwd("registers", "registers", prefetch=1), "an_fetch_row<ALIGNED>("),
    ("shared", bwd("shared", "shared", threads=512), "an_grad_in<true>(cx, cdy, j, mu, rs, xh, dv);"),
    ("shared", bwd("shared", "global", threads=512, prefetch=1), "an_copy_row(nx, nx + N,"),
    ("shared", bwd("cluster4", "registers", threads=128), "an_cluster_sums(s1, s2, part + 2 * parity);"),
    ("none", bwd("none", "global"), "// chunked: re-read from global"),
    ("none", bwd("none", "columns"), "// Pass 2, column-outer"),
]


@pytest.mark.parametrize("body, config, marker", STRATEGIES,
                         ids=[f"{c.row_cache}-{c.partials}-{c.prefetch}" for _, c, _ in STRATEGIES])
def test_each_row_cache_renders_its_own_backward_body(body, config, marker):
    text = CupyBackend().render(BWD, config).text
    assert marker in text
    foreign = [m for b, _, m in STRATEGIES if b != body and m in text]
    assert not foreign, f"a {config.row_cache} kernel rendered another body template's lines: {foreign}"
    assert text.count("an_bwd_body<") == 2 and text.count("__device__ __forceinline__ void an_bwd_body(") == 1
