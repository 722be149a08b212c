"""Benchmark report: markdown tables and PNG plots from `autonorm bench` JSON rows.

`write_report(json_paths, out_dir, db_path=None)` writes, per device found in
the rows:

- `<out_dir>/<device-slug>.md`: for each (op, direction, dtype) a table with one
  line per hidden size N (the largest row count measured for it): each
  provider's GB/s and % of measured copy bandwidth (`cache` where the inputs
  were read from a cache, which a DRAM copy probe cannot bound), autonorm's speedup over
  torch.compile and over the best anchor (the fastest of torch, torch.compile,
  Liger and quack on that cell), and a geometric-mean line; then the performance
  goals (cache-resident cells not counted), each with whether it is met and, where not, by how much; skipped
  providers and why; optionally a summary of a tuning database.
- `<out_dir>/<device-slug>-<op>-<direction>.png`: GB/s against N (log2 axis),
  one line per provider, one panel per dtype, the copy bandwidth dashed.

Only the Agg backend is used (no display on GPU machines or CI). Used by
`autonorm bench --report DIR` (with `--input JSON...` to measure nothing).
"""
from __future__ import annotations

import math
import os
from collections import defaultdict

from .rows import is_cache_resident, load

# The implementations `autonorm bench` compares (`autonorm.bench.PROVIDERS` builds them), in report
# order, and the anchors among them: the leading implementations autonorm must beat.
PROVIDER_ORDER = ("autonorm", "torch", "torch.compile", "liger", "quack")
ANCHORS = ("torch", "torch.compile", "liger", "quack")
DTYPE_ORDER = ("bfloat16", "float16", "float32")
# The performance goals on H100/H200: fraction of copy bandwidth at N >= 1024 for the largest row count.
GOAL_PCT = {"fwd": 90.0, "bwd": 75.0}
GOAL_MIN_N = 1024
GOAL_VS_ANCHOR = 1.0
GOAL_VS_COMPILE_GEOMEAN = 1.2


def geomean(values) -> float | None:
    vals = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None


def cells(rows: dict) -> dict:
    """{(op, direction, dtype): {hidden: {provider: row}}}, keeping the largest row count per hidden size."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for (_case, prov), row in rows.items():
        spec = row["spec"]
        cell = out[(spec["op"], spec["direction"], spec["x_dtype"])][spec["hidden"]]
        other = next(iter(cell.values()), None)
        if other is not None and other["rows"] != row["rows"]:
            if other["rows"] > row["rows"]:
                continue
            cell.clear()
        cell[prov] = row
    return out


def _order(keys):
    return sorted(keys, key=lambda k: (k[0] != "rmsnorm", k[1] != "fwd",
                                       DTYPE_ORDER.index(k[2]) if k[2] in DTYPE_ORDER else 9, k))


def _providers(table: dict) -> list[str]:
    present = {p for by_p in table.values() for p in by_p}
    return [p for p in PROVIDER_ORDER if p in present] + sorted(present - set(PROVIDER_ORDER))


def speedups(by_p: dict) -> tuple[float | None, float | None, str | None]:
    """autonorm's (x torch.compile, x best anchor, which anchor) in one cell; None where absent."""
    a = by_p.get("autonorm")
    if a is None or a["median_us"] <= 0:
        return None, None, None
    comp = by_p.get("torch.compile")
    x_comp = comp["median_us"] / a["median_us"] if comp else None
    anchors = [(by_p[p]["median_us"], p) for p in ANCHORS if p in by_p]
    if not anchors:
        return x_comp, None, None
    best_us, best = min(anchors)
    return x_comp, best_us / a["median_us"], best


def _fmt(v, spec=".2f", suffix=""):
    return "–" if v is None else f"{v:{spec}}{suffix}"


def pct_text(row: dict) -> str:
    """A row's share of the copy bandwidth, or `cache` where its inputs came from a cache: a DRAM copy
    probe is no roofline for those (a cache-resident cell measured 743% of it)."""
    return "cache" if is_cache_resident(row) else f"{row['pct_copy_bw']:.0f}%"


def table_markdown(key, table: dict) -> str:
    op, direction, dtype = key
    provs = _providers(table)
    head = ["N", "rows"] + [f"{p} GB/s (% copy)" for p in provs] + ["autonorm × compile", "autonorm × best anchor"]
    lines = [f"### {op} {direction} {dtype}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join("---:" for _ in head) + "|"]
    xs_comp, xs_anchor = [], []
    per_prov: dict[str, list] = defaultdict(list)
    for n in sorted(table):
        by_p = table[n]
        rows = next(iter(by_p.values()))["rows"]
        line = [str(n), str(rows)]
        for p in provs:
            r = by_p.get(p)
            line.append("–" if r is None else f"{r['gbps']:.0f} ({pct_text(r)})")
            if r is not None:
                per_prov[p].append(r["gbps"])
        x_comp, x_anchor, best = speedups(by_p)
        xs_comp.append(x_comp)
        xs_anchor.append(x_anchor)
        line += [_fmt(x_comp, suffix="×"), _fmt(x_anchor, suffix="×") + (f" ({best})" if best else "")]
        lines.append("| " + " | ".join(line) + " |")
    gm = ["geomean", ""] + [_fmt(geomean(per_prov[p]), ".0f") for p in provs]
    gm += [_fmt(geomean(xs_comp), suffix="×"), _fmt(geomean(xs_anchor), suffix="×")]
    lines.append("| " + " | ".join(f"**{c}**" if c else c for c in gm) + " |")
    return "\n".join(lines)


def goals(tables: dict) -> list[tuple[str, str, str]]:
    """(goal, result, met) lines for the performance goals (GOAL_*), saying by how much a miss misses."""
    out = []
    for direction in ("fwd", "bwd"):
        want = GOAL_PCT[direction]
        every = [(k, n, t[n]["autonorm"]) for k, t in tables.items() if k[1] == direction
                 for n in t if n >= GOAL_MIN_N and "autonorm" in t[n]]
        # A cache-resident cell says nothing about DRAM bandwidth: left out of the count, and said so.
        cells_ = [c for c in every if not is_cache_resident(c[2])]
        resident = len(every) - len(cells_)
        if not every:
            continue
        misses = [(r["pct_copy_bw"], k, n) for k, n, r in cells_ if r["pct_copy_bw"] < want]
        text = f"{len(cells_) - len(misses)}/{len(cells_)} cells"
        if misses:
            pct, k, n = min(misses)
            text += f"; worst {pct:.0f}% ({k[0]} {k[2]} N={n}, {want - pct:.0f} points short)"
        if resident:
            text += f"; {resident} cache-resident cells not counted"
        out.append((f"{direction} ≥ {want:.0f}% of copy bandwidth, N ≥ {GOAL_MIN_N}", text,
                    "no" if misses else "yes" if cells_ else "–"))
    anchor_cells = [(speedups(t[n])[1:], k, n) for k, t in tables.items() for n in t]
    anchor_cells = [(x, best, k, n) for (x, best), k, n in anchor_cells if x is not None]
    if anchor_cells:
        misses = [c for c in anchor_cells if c[0] < GOAL_VS_ANCHOR]
        text = f"{len(anchor_cells) - len(misses)}/{len(anchor_cells)} cells"
        if misses:
            x, best, k, n = min(misses, key=lambda c: c[0])
            text += f"; worst {x:.2f}× vs {best} ({k[0]} {k[1]} {k[2]} N={n}, {100 * (1 - x):.0f}% slower)"
        out.append((f"≥ {GOAL_VS_ANCHOR:.1f}× the best anchor in every cell", text, "yes" if not misses else "no"))
    comp = [speedups(t[n])[0] for t in tables.values() for n in t]
    gm = geomean(comp)
    if gm is not None:
        out.append((f"≥ {GOAL_VS_COMPILE_GEOMEAN:.1f}× torch.compile in geometric mean",
                    f"{gm:.2f}× over {sum(c is not None for c in comp)} cells"
                    + ("" if gm >= GOAL_VS_COMPILE_GEOMEAN else f" ({GOAL_VS_COMPILE_GEOMEAN - gm:.2f} short)"),
                    "yes" if gm >= GOAL_VS_COMPILE_GEOMEAN else "no"))
    return out


def db_summary(db_path: str) -> str:
    from ..db import TuningDB

    db = TuningDB.load(db_path)
    by_backend: dict[str, int] = defaultdict(int)
    trials = 0
    for rec in db.records.values():
        by_backend[rec.winner.backend] += 1
        trials += rec.trials
    lines = [f"## Tuning database `{os.path.basename(db_path)}`", "",
             f"{len(db.records)} records, {trials} distinct candidates measured in all; winners by backend: "
             + ", ".join(f"{b} {c}" for b, c in sorted(by_backend.items(), key=lambda t: -t[1]))]
    return "\n".join(lines)


def plot(slug: str, key2: tuple[str, str], tables: dict, copy_gbps: float | None, path: str) -> None:
    """One PNG for (op, direction): a panel per dtype, GB/s vs N per provider, log2 N axis."""
    import matplotlib

    matplotlib.use("Agg")  # no display anywhere we run
    import matplotlib.pyplot as plt

    keys = [k for k in _order(tables) if k[:2] == key2]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False, sharey=True)
    cache_note = False
    for ax, key in zip(axes[0], keys):
        table = tables[key]
        for p in _providers(table):
            pts = sorted((n, table[n][p]["gbps"], is_cache_resident(table[n][p])) for n in table if p in table[n])
            line, = ax.plot([n for n, _, _ in pts], [g for _, g, _ in pts], marker="o", label=p)
            cached = [(n, g) for n, g, resident in pts if resident]
            if cached:  # hollow markers: read from a cache, so above what the DRAM copy line means
                ax.plot([n for n, _ in cached], [g for _, g in cached], linestyle="none", marker="o",
                        markersize=9, markerfacecolor="white", color=line.get_color())
                cache_note = True
        if copy_gbps:
            ax.axhline(copy_gbps, linestyle="--", color="gray", label="copy bandwidth")
            frac = ax.secondary_yaxis("right", functions=(lambda g: g / copy_gbps, lambda f: f * copy_gbps))
            if ax is axes[0][-1]:
                frac.set_ylabel("fraction of copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{key[0]} {key[1]} {key[2]}")
        ax.set_xlabel("hidden size N")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("GB/s")
    axes[0][-1].legend(fontsize="small")
    fig.suptitle(slug + ("  (hollow: cache-resident, not a DRAM figure)" if cache_note else ""))
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)


def device_markdown(slug: str, d: dict, png_names: list[str], db_path: str | None) -> str:
    tables = cells(d["rows"])
    dev = d["device"]
    copy = d["copy_gbps"][-1] if d["copy_gbps"] else None
    dates = sorted(x for x in d["dates"] if x)
    vers = ", ".join(f"{k} {v}" for k, v in sorted(d["versions"].items()) if v)
    proto = d.get("protocol") or {}
    cache = "L2 flushed before every call" if "l2_flush_bytes" in proto else "rotating input sets"
    out = [f"# Benchmarks: {dev.get('name', slug)} (`{slug}`)", "",
           ("Generated by `autonorm bench --report` (autonorm/bench/report.py) from `autonorm bench --json` rows; "
            "do not edit by hand."), "",
           (f"- Device: {dev.get('name', slug)}, compute capability {dev.get('compute_capability')}, "
            f"{dev.get('sm_count')} SMs, L2 {dev.get('l2_bytes', 0) / 2**20:.0f} MiB"),
           f"- Measured copy bandwidth: {_fmt(copy, '.0f', ' GB/s')} (read + write)",
           f"- Dates: {dates[0] if dates else '?'} … {dates[-1] if dates else '?'}",
           f"- Versions: {vers}",
           (f"- Protocol: {proto.get('timer', '?')}, median (p20/p80 in the JSON), {cache}, implementations "
            "interleaved; GB/s = `NormSpec.bytes_moved(rows)` / median"),
           ("- Anchors: torch eager, torch.compile, Liger, quack (each when installed); "
            "'× best anchor' divides the fastest anchor's time in that cell by autonorm's"),
           ("- `cache` in place of a % of copy bandwidth: the cell's inputs were read from a cache (their rotation "
            "fits in the last-level cache, or the cell beat the DRAM copy probe), so no DRAM figure"), ""]
    g = goals(tables)
    if g:
        out += ["## Goals", "", "| goal | result | met |", "|---|---|---|"]
        out += [f"| {a} | {b} | {c} |" for a, b, c in g]
        out.append("")
    out += ["## Tables", ""]
    for key in _order(tables):
        out += [table_markdown(key, tables[key]), ""]
    if png_names:
        out += ["## Plots", ""] + [f"![{name}]({name})" for name in png_names] + [""]
    if d["skipped"]:
        out += ["## Skipped providers", "", "| case | provider | why |", "|---|---|---|"]
        for case in sorted(d["skipped"]):
            for prov, why in sorted(d["skipped"][case].items()):
                out.append(f"| {case} | {prov} | {why.replace('|', '/')} |")
        out.append("")
    if db_path:
        out += [db_summary(db_path), ""]
    return "\n".join(out)


def write_report(json_paths: list[str], out_dir: str, db_path: str | None = None) -> list[str]:
    """Write the markdown and PNGs for every device in the files; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for slug, d in load(json_paths).items():
        tables = cells(d["rows"])
        copy = d["copy_gbps"][-1] if d["copy_gbps"] else None
        pngs = []
        for key2 in dict.fromkeys(k[:2] for k in _order(tables)):
            name = f"{slug}-{key2[0]}-{key2[1]}.png"
            plot(slug, key2, tables, copy, os.path.join(out_dir, name))
            pngs.append(name)
            written.append(os.path.join(out_dir, name))
        md = os.path.join(out_dir, f"{slug}.md")
        tmp = md + ".tmp"
        with open(tmp, "w") as f:
            f.write(device_markdown(slug, d, pngs, db_path))
        os.replace(tmp, md)
        written.insert(0, md)
    return written
