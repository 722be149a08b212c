"""A session's returned files, here afterwards: the tuning database, the report and the search table."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..audit import AuditToolError, Job, audit, check_backends
from ..backends import get_backend
from ..bench import report
from ..db import Record, TuningDB
from ..errors import AutonormError
from ..spec import NormSpec
from ..tune import SearchSpace, rank
from .records import FILES, env_facts, read_lines
from .summary import completeness, session_markdown, tuned_vs_sweep

MIN_RANKED = 3  # swept configs a rank correlation needs: with two, rho is +1 or -1 whatever the model


def import_session(folder: Path, db_dir: Path, docs_dir: Path) -> list[Path]:
    """Write <db_dir>/<slug>.json (validated), <docs_dir>/<slug>.md with its PNGs and rows, the search
    table and the returned lines themselves; the paths written."""
    facts = env_facts(folder)
    if "identity" not in facts:
        raise ValueError(f"{folder}/session.jsonl has no device identity (did the env phase run?)")
    ident, copy = facts["identity"], facts.get("copy bandwidth")
    copy_gbps = copy["copy_gbps"] if copy else None
    docs_dir.mkdir(parents=True, exist_ok=True)
    written = _copy_lines(folder, docs_dir / "sessions" / f"{ident['device']['slug']}-{ident['date'][:10]}")
    db_path = _write_database(folder, db_dir, ident, copy_gbps)
    written += [db_path] if db_path else []
    _print_tune_coverage(folder)
    written += _write_report(folder, docs_dir, ident, copy_gbps, db_path)
    table_path = _write_search_table(folder, docs_dir, ident, copy_gbps)
    written += [table_path] if table_path else []
    return written


def _copy_lines(folder: Path, raw: Path) -> list[Path]:
    """The returned lines themselves, next to what is made of them: the evidence behind every number."""
    raw.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FILES:
        if name.endswith(".jsonl") and (folder / name).exists():
            shutil.copyfile(folder / name, raw / name)
            written.append(raw / name)
    return written


def _write_database(folder: Path, db_dir: Path, ident: dict, copy_gbps: float | None) -> Path | None:
    tune = [t for t in read_lines(folder / "tune.jsonl") if t.get("record")]
    if not tune:
        return None
    device = ident["device"]
    info = {k: device[k] for k in ("name", "slug", "kind", "compute_capability", "sm_count", "l2_bytes")}
    db = TuningDB({**info, "copy_gbps": round(copy_gbps, 2) if copy_gbps else None}, ident["versions"],
                  {**tune[0]["protocol"], "session": ident["date"]},
                  {r.key: r for r in (Record.from_json(t["record"]) for t in tune)})
    db = TuningDB.from_json(db.to_json(), f"{folder}/tune.jsonl")  # the schema and every config, checked
    db_path = db_dir / f"{device['slug']}.json"
    db.save(db_path)
    return db_path


def _print_tune_coverage(folder: Path) -> None:
    """The specs the tune phase recorded, each with how complete its search was."""
    tuned = [t for t in read_lines(folder / "tune.jsonl") if t.get("record")]
    if tuned:
        print(f"gpu_session import: tune covered {len(tuned)} specs: "
              + ", ".join(f"{t['case']} ({completeness(t) or 'completeness not recorded'})" for t in tuned))


def _write_report(folder: Path, docs_dir: Path, ident: dict, copy_gbps: float | None,
                  db_path: Path | None) -> list[Path]:
    """<slug>-bench.json (the rows), the bench report with its PNGs, and the session's part of <slug>.md."""
    slug = ident["device"]["slug"]
    cases = [c for c in read_lines(folder / "bench.jsonl") if c.get("rows_out")]
    bench_doc = {"schema_version": 1, "device": ident["device"], "versions": ident["versions"], "date": ident["date"],
                 "copy_bandwidth_gbps": copy_gbps,
                 "providers": list(dict.fromkeys(r["provider"] for c in cases for r in c["rows_out"])),
                 "protocol": cases[0]["protocol"] if cases else {},
                 "rows": [r for c in cases for r in c["rows_out"]],
                 "skipped": {c["case"]: c["skipped"] for c in cases if c.get("skipped")}}
    bench_path = docs_dir / f"{slug}-bench.json"
    bench_path.write_text(json.dumps(bench_doc, indent=1) + "\n")
    written = [bench_path] + [Path(p) for p in report.write_report([str(bench_path)], str(docs_dir),
                                                                   db_path=str(db_path) if db_path else None)]
    md = docs_dir / f"{slug}.md"
    md.write_text(("> **Dry run on CPU** (Triton interpreter, Numba simulator): these numbers prove the pipeline "
                   "only, never speed.\n\n" if ident.get("dry_run") else "")
                  + md.read_text() + "\n" + session_markdown(folder, ident))
    return written


def _write_search_table(folder: Path, docs_dir: Path, ident: dict, copy_gbps: float | None) -> Path | None:
    """The sweep in the table format scripts/search_efficiency.py reads, with the audit's pruning verdict, the
    cost model's rank correlation on it and, where the tune phase tuned the same spec, the tuned winner against
    the sweep's best."""
    sweep = [s for s in read_lines(folder / "sweep.jsonl") if s.get("candidate")]
    if not sweep:
        return None
    first, device, slug = sweep[0], ident["device"], ident["device"]["slug"]
    spec = first["spec"]
    table = {s["candidate"]: s["median_us"] for s in sweep if s["status"] == "ok"}
    verdict = pruning_verdict(spec, table, device)
    ranks = rank_correlation(spec, first["rows"], table, device, copy_gbps)
    tuned = tuned_vs_sweep(folder)
    table_path = docs_dir / f"search-efficiency-table-{slug}-{spec['op']}-{spec['direction']}-{spec['hidden']}.json"
    table_path.write_text(json.dumps({
        "spec": spec, "rows": first["rows"], "device": device["name"], "device_slug": slug,
        "date": ident["date"], "versions": ident["versions"], "protocol": first["protocol"], "space": first["space"],
        "complete": len(sweep) == first["space"],
        "failed": {s["candidate"]: s.get("error") or s["status"] for s in sweep if s["status"] != "ok"},
        "table": table, "pruning": verdict, "rank_correlation": ranks,
        **({"budgeted_tune": tuned} if tuned else {})}, indent=1) + "\n")
    print(f"gpu_session import: audit pruning on {verdict['arch']}: " + (
        verdict["error"] if "error" in verdict else
        f"{verdict['kept']} kept, {len(verdict['pruned'])} pruned; best kept {verdict['best_kept_us']} µs, "
        f"best pruned {verdict['best_pruned_us']} µs: "
        + ("pruning would have removed the best" if verdict["removes_best"] else "no pruned config was faster")))
    print("gpu_session import: rank correlation on the sweep: " + (
        ranks["error"] if "error" in ranks else
        f"{ranks['candidates']} configs, rho(model) {ranks['model']:+.2f}, rho(heuristic distance) "
        f"{ranks['distance']:+.2f}; {ranks['verdict']}"))
    if tuned:
        swept = (f"a swept config ({tuned['winner_swept_us']} µs there)" if tuned["winner_swept_us"] is not None
                 else "a swept config that failed there" if tuned["winner_in_sweep"] else "not a swept config")
        print(f"gpu_session import: tuned {tuned['case']} ({tuned['completeness'] or 'completeness not recorded'}): "
              f"winner {tuned['winner_us']} µs = {tuned['ratio']:.3f}x the sweep's best {tuned['sweep_best_us']} µs; "
              f"the winner is {swept}")
    return table_path


def rank_correlation(spec_dict: dict, rows: int, table: dict, device: dict, copy_gbps: float | None) -> dict:
    """Spearman's rho of the swept medians (`table`: candidate key -> µs) against the cost model's order and
    against the distance from the heuristic alone, with the model's keep-or-drop verdict
    (`autonorm.tune.rank`). The space is enumerated and ranked for the session's GPU without one here."""
    try:
        backends = {name: get_backend(name) for name in sorted({json.loads(key)[0] for key in table})}
        space = SearchSpace(NormSpec(**spec_dict), backends, torch.device("cuda"))
    except (AutonormError, TypeError, ValueError) as exc:
        return {"candidates": 0, "error": f"no search space for the sweep's configs: {exc}"}
    measured = {key: us for key, us in table.items() if space.named(key) is not None}
    if len(measured) < MIN_RANKED:
        return {"candidates": len(measured),
                "error": f"{len(measured)} swept configs measured ok (and in this Triton's space): "
                         f"a rank correlation needs at least {MIN_RANKED}"}
    facts = rank.DeviceFacts.of(device, copy_gbps)
    row = rank.spec_rho(space, rows, facts, measured)
    # Where every swept config has one predicted time (parallel units enough to fill every SM, whatever their
    # rows per program), the model's order is the heuristic distance's with ties in enumeration order: the two
    # columns then differ by how ties fall, and no verdict on the model follows.
    predicted = len({round(rank.predict_us(space.spec, rows, space.named(k), facts), 6) for k in measured})
    return {"candidates": row.candidates, "model": round(row.model, 3), "distance": round(row.distance, 3),
            "predicted_times": predicted,
            "verdict": rank.verdict([row]) if predicted > 1 else
            "no verdict: the model predicts one time for every swept config (its order is the heuristic distance's)"}


def pruning_verdict(spec_dict: dict, table: dict, device: dict) -> dict:
    """Would the tuner's audit pruning have dropped the sweep's best config? The swept configs are
    cross-compiled here for the device's architecture (no GPU time) and split into kept and pruned."""
    cc = device.get("compute_capability")
    arch = f"sm_{cc.replace('.', '')}" if cc else "sm_90"  # a dry run on CPU has none: audited for sm_90
    spec = NormSpec(**spec_dict)
    cands = [json.loads(key) for key in table]
    try:
        check_backends(sorted({b for b, _ in cands}))
        jobs = [Job(b, spec, get_backend(b).config_cls.from_dict(c), arch) for b, c in cands]
        profiles = audit(jobs)
    except (AuditToolError, KeyError, ValueError) as exc:
        return {"arch": arch, "error": str(exc)}
    kept = {k: us for (k, us), p in zip(table.items(), profiles) if p.fits()}
    pruned = {k: us for (k, us), p in zip(table.items(), profiles) if not p.fits()}
    best_kept = min(kept.values(), default=None)
    best_pruned = min(pruned.values(), default=None)
    return {"arch": arch, "kept": len(kept), "pruned": sorted(pruned), "best_kept_us": best_kept,
            "best_pruned_us": best_pruned,
            "removes_best": best_pruned is not None and (best_kept is None or best_pruned < best_kept)}

