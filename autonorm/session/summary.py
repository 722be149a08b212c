"""The session's summary, printed last by the parent and embedded in the imported report: pure JSON reading."""
from __future__ import annotations

from pathlib import Path

from ..config import candidate_key
from .records import FILES, env_facts, read_lines


def _phase_events(out: Path) -> list[dict]:
    return [e for e in read_lines(out / "session.jsonl") if e.get("event") == "phase"]


def _fmt_gbps(row: dict | None) -> str:
    return "-" if row is None else f"{row['gbps']:.0f} ({row['pct_copy_bw']:.0f}%)"


def _header(out: Path) -> list[str]:
    facts = env_facts(out)
    ident = facts.get("identity", {})
    dev = ident.get("device", {})
    lines = [f"autonorm GPU session: {dev.get('name', '?')} ({dev.get('slug', '?')}), {ident.get('date', '?')}"
             + (" -- DRY RUN on CPU: pipeline only, never speed" if ident.get("dry_run") else "")]
    vers = ident.get("versions", {})
    if vers:
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v))
    copy = facts.get("copy bandwidth")
    lines.append(f"copy bandwidth: {copy['copy_gbps']:.0f} GB/s ({copy['bytes'] / 2**30:.2f} GiB, median of "
                 f"{copy['reps']})" if copy else "copy bandwidth: not measured")
    lines.append("phases: " + " | ".join(f"{e['phase']} {e['status']} {e['seconds']:.0f}s" for e in _phase_events(out)))
    return lines


def _smoke(out: Path) -> list[str]:
    """Per backend: the count of each status, then its first four cases that did not pass."""
    lines = []
    smoke = [r for r in read_lines(out / "smoke.jsonl") if r.get("backend")]
    for backend in dict.fromkeys(r["backend"] for r in smoke):
        rs = [r for r in smoke if r["backend"] == backend]
        counts = {s: sum(r["status"] == s for r in rs) for s in dict.fromkeys(r["status"] for r in rs)}
        lines.append(f"smoke {backend}: {len(rs)} cases: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        for r in [r for r in rs if r["status"] != "pass"][:4]:
            why = r.get("error") or ", ".join(f"{k} {v:.2g}" for k, v in r.get("errors", {}).items()
                                             if v > r.get("tolerance", 0))
            lines.append(f"  {r['status']}: " + (f"{r['case']}: " if r["case"] != r["status"] else "")
                         + str(why)[:150])
    return lines


def _bench(out: Path) -> list[str]:
    """One table row per case, one column per implementation, then the first cases that failed."""
    lines = []
    cases: dict[str, dict] = {}  # case -> impl -> row (torch.compile's rows come in lines of their own)
    for line in read_lines(out / "bench.jsonl"):
        for row in line.get("rows_out") or ():
            cases.setdefault(row["case"], {})[row["impl"]] = row
    if cases:
        impls = list(dict.fromkeys(i for by in cases.values() for i in by))
        lines.append("bench GB/s (% of copy bandwidth):")
        lines.append(f"  {'case':<34}" + "".join(f"{i[:17]:>18}" for i in impls))
        for case, by in cases.items():
            lines.append(f"  {case[:34]:<34}" + "".join(f"{_fmt_gbps(by.get(i)):>18}" for i in impls))
    errors = [c for c in read_lines(out / "bench.jsonl") if c.get("status") not in (None, "ok")]
    for c in errors[:3]:
        lines.append(f"  {c['status']}: {c['case']}: {str(c.get('error'))[:150]}")
    return lines


def _variant_result(v: dict) -> str:
    if v["status"] == "ok":
        return f"{v['speedup']:.2f}x, {v['variant_gbps']:.0f} GB/s"
    if v["status"] == "unavailable":
        return v["status"]
    return f"{v['status']}: {str(v.get('error') or v.get('errors'))[:100]}"


def _variants(out: Path) -> list[str]:
    variants = read_lines(out / "variants.jsonl")
    if not variants:
        return []
    return ["variants (speedup over the heuristic; > 1: the variant is faster):"] + [
        f"  {v['case'][:46]:<46} {_variant_result(v)}" for v in variants]


def _tune(out: Path) -> list[str]:
    tune = read_lines(out / "tune.jsonl")
    if not tune:
        return []
    lines = [f"tune: {sum(t['status'] == 'ok' for t in tune)}/{len(tune)} studies recorded"]
    for t in tune:
        w = (t.get("record") or {}).get("winner")
        lines.append(f"  {t['case']}: " + (f"{w['backend']} {w['median_us']:.1f} us {w['gbps']:.0f} GB/s, "
                                           f"{t['trials']} trials ({t['failed_count']} failed)"
                                           + (f", {completeness(t)}" if completeness(t) else "")
                                           if w else t["status"]))
    return lines


def completeness(tuned: dict) -> str | None:
    """How complete a tune line's search was (exhaustive, converged, budget), from the line or its record."""
    return tuned.get("completeness") or (tuned.get("record") or {}).get("completeness")


def tuned_vs_sweep(out: Path) -> dict | None:
    """The recorded study of the sweep's spec and rows against the sweep's best (the least median of its ok
    lines: an exhaustive measure of Triton's space); None unless both ran. `ratio` is the tuned winner's
    median over the sweep's best; `winner_swept_us` the sweep's median of the same config, if it swept it."""
    sweep = [s for s in read_lines(out / "sweep.jsonl") if s.get("candidate")]
    ok = [s for s in sweep if s["status"] == "ok"]
    if not ok:
        return None
    tuned = [t for t in read_lines(out / "tune.jsonl")
             if t.get("record") and t.get("spec") == ok[0]["spec"] and t.get("rows") == ok[0]["rows"]]
    if not tuned:
        return None
    winner = tuned[-1]["record"]["winner"]
    key = candidate_key(winner["backend"], winner["config"])
    best = min(s["median_us"] for s in ok)
    return {"case": tuned[-1]["case"], "completeness": completeness(tuned[-1]), "winner": key,
            "winner_us": winner["median_us"], "sweep_best_us": best, "ratio": round(winner["median_us"] / best, 3),
            "winner_in_sweep": any(s["candidate"] == key for s in sweep),
            "winner_swept_us": next((s["median_us"] for s in ok if s["candidate"] == key), None)}


def _sweep(out: Path) -> list[str]:
    sweep = read_lines(out / "sweep.jsonl")
    if not sweep:
        return []
    ok = [s for s in sweep if s["status"] == "ok"]
    best = min(ok, key=lambda s: s["median_us"]) if ok else None
    about = next((s for s in sweep if "space" in s), {})
    return [f"sweep {about.get('spec_short', '?')} rows={about.get('rows', '?')}: {len(sweep)}/"
            f"{about.get('space', '?')} configs, {len(ok)} measured, {len(sweep) - len(ok)} failed"
            + (f"; best {best['median_us']:.1f} us {best['candidate']}" if best else "")
            + (f"; tuned winner {vs['ratio']:.2f}x the best" if (vs := tuned_vs_sweep(out)) else "")]


def summary(out: Path) -> str:
    """The human summary of the files in `out`, whatever finished: device, versions, copy bandwidth, each
    phase's outcome, smoke pass/fail per backend, the bench table, the variants, the tuned winners, the sweep."""
    present = [f for f in FILES if (out / f).exists()]
    lines = ["", "=" * 100, *_header(out), *_smoke(out), *_bench(out), *_variants(out), *_tune(out), *_sweep(out),
             f"files in {out}: {', '.join(present)}", "=" * 100]
    return "\n".join(lines)


def session_markdown(folder: Path, ident: dict) -> str:
    """The session's summary and every smoke case, for the report."""
    lines = ["## GPU session", "",
             f"One call of `scripts/gpu_session.py` on {ident['device']['name']}, {ident['date']}; versions in "
             "the header above. Summary as printed at the end of the call:", "", "```",
             summary(folder).strip("=\n "), "```", ""]
    smoke = [r for r in read_lines(folder / "smoke.jsonl") if r.get("backend")]
    if smoke:
        lines += ["### Smoke cases (heuristic configs, inputs and fp64 reference on the device)", "",
                  "| backend | case | status | worst rel. error / tolerance | error |", "|---|---|---|---|---|"]
        for r in smoke:
            errs = r.get("errors") or {}
            worst = f"{max(errs.values()):.2g} / {r['tolerance']:.2g}" if errs else ""
            why = (r.get("error") or "").replace("|", "/").replace("\n", " ")[:200]
            lines.append(f"| {r['backend']} | {r['case']} | {r['status']} | {worst} | {why} |")
        lines.append("")
    variants = read_lines(folder / "variants.jsonl")
    if variants:
        lines += ["### Kernel variants against the heuristic (checked, then timed interleaved)", "",
                  "| case | status | heuristic µs | variant µs | speedup | variant GB/s | variant config / error |",
                  "|---|---|---|---|---|---|---|"]
        for r in variants:
            detail = (r.get("error") or r.get("variant") or "").replace("|", "/").replace("\n", " ")[:200]
            lines.append(f"| {r['case']} | {r['status']} | {r.get('heuristic_us', '')} | {r.get('variant_us', '')} | "
                         f"{r.get('speedup', '')} | {r.get('variant_gbps', '')} | {detail} |")
        lines.append("")
    return "\n".join(lines)

