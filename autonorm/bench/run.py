"""Running benchmark cases: every provider of a case timed in one process, interleaved, with the tuner's
protocol (`autonorm.measure`), and one JSON row per (case, implementation).

On a CPU: warm-up, then rounds over the implementations on input sets rotated so
that one rotation is twice the last-level cache, each sample one call timed with
`perf_counter_ns`. On a GPU: CUDA events around each call, repetitions sized by
time, the L2 flushed before every call. Reported: median, p20 and p80; GB/s from
`NormSpec.bytes_moved` (the minimum DRAM traffic), compared with this machine's
measured copy bandwidth. Rows are written after every case, so a long grid
resumes (`done`) and can stop on a time limit.
"""
from __future__ import annotations

import datetime
import json
import os
import time

import torch

from .. import device as device_mod
from .. import measure
from .providers import build_case
from .report import ANCHORS, pct_text
from .rows import provider_of, read_bench_json

SCHEMA_VERSION = 1


def case_name(spec, rows: int) -> str:
    return f"{spec.op}.{spec.direction} {spec.x_dtype} {rows}x{spec.hidden}"


def timer_for(device: torch.device, reps: int, warmup: int):
    """The tuner's timer for `device`; on a CPU with exactly `reps` timed and at least `warmup` untimed
    calls per implementation (a GPU sizes both by time)."""
    if device.type == "cuda":
        return measure.CudaTimer(device)
    return measure.CpuTimer(warmup_s=0.0, warmup_calls=warmup, min_reps=reps, max_reps=reps)


def load_previous(path: str, slug: str) -> tuple[list, dict]:
    """The rows and skipped notes of an earlier run's JSON (for resuming); ValueError for another device's
    or for a file that is not bench rows."""
    doc = read_bench_json(path)
    if doc.get("device", {}).get("slug") != slug:
        raise ValueError(f"{path} holds rows of {doc.get('device', {}).get('slug')!r}, "
                         f"not of this device ({slug}); use another --json file")
    return doc.get("rows", []), doc.get("skipped", {})


def write_json(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def new_document(device: torch.device, timer, copy_gbps: float, providers: list[str], rows: list,
                 skipped: dict) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "device": device_mod.identity(device),
        "versions": device_mod.software_versions(),
        "date": _now(),
        "copy_bandwidth_gbps": copy_gbps,
        "providers": providers,
        "protocol": {**timer.describe(), "interleaved": True, "load_avg": os.getloadavg()},
        "rows": rows,
        "skipped": skipped,
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cache_resident(device: torch.device, footprint: int, gbps: float, copy_gbps: float) -> bool:
    """Whether a cell's inputs come (partly) from a cache, so that the DRAM copy probe is no roofline for it.

    On a CPU the timer rotates input sets to twice the last-level cache, but at most `max_sets` of them:
    a small shape's whole rotation (`footprint` bytes) can stay cached. On a GPU the L2 is flushed
    before every call. Either way a cell faster than the copy probe read some bytes from a cache."""
    if device.type == "cpu" and footprint < 2 * measure.llc_bytes():
        return True
    return gbps > copy_gbps


def compiles_so_far() -> int:
    """Frames Dynamo has compiled (or tried to) in this process: any change across a timed region means
    torch.compile compiled inside it, and its figure would time the compiler."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def case_rows(spec, rows: int, device: torch.device, timer, providers: list[str], copy_gbps: float,
              ident: dict) -> tuple[list[dict], dict]:
    """(the rows of one case, one note per provider skipped)."""
    n_sets = timer.n_sets(spec, rows)
    impls, choice, notes = build_case(spec, rows, device, n_sets, providers)
    if not impls:
        return [], notes
    compiled = compiles_so_far()
    timings = timer.time_calls(impls, n_sets)
    compiled = compiles_so_far() - compiled
    if compiled and "torch.compile" in timings:
        del timings["torch.compile"]
        notes["torch.compile"] = (f"skipped: Dynamo compiled {compiled} frame(s) inside the timed region "
                                  "(a recompile per input), so its time would be the compiler's")
    nbytes = spec.bytes_moved(rows)
    base = {name: t.median_us for name, t in timings.items()}
    anchors = [base[n] for n in base if provider_of(n) in ANCHORS]
    date = _now()
    out = []
    for name, t in timings.items():
        gbps = measure.gbps(spec, rows, t.median_us)
        resident = cache_resident(device, n_sets * nbytes, gbps, copy_gbps)
        mine = name.startswith("autonorm") and choice is not None
        out.append({
            "case": case_name(spec, rows), "impl": name, "provider": provider_of(name), "spec": spec.to_dict(),
            "rows": rows, "bytes_moved": nbytes, "input_sets": n_sets,
            "median_us": t.median_us, "p20_us": t.p20_us, "p80_us": t.p80_us, "samples": t.reps,
            "gbps": gbps, "cache_resident": resident, "pct_copy_bw": None if resident else 100 * gbps / copy_gbps,
            "speedup_vs_torch": base["torch"] / t.median_us if "torch" in base else None,
            "speedup_vs_compile": base["torch.compile"] / t.median_us if "torch.compile" in base else None,
            "speedup_vs_best_anchor": min(anchors) / t.median_us if anchors else None,
            "config": choice.config.to_dict() if mine else None,
            "rung": choice.rung if mine else None,
            "timer": "perf_counter_ns" if device.type == "cpu" else "cuda_event",
            "device": ident["slug"], "date": date,
        })
    return out, notes


def run_cases(cases, device: torch.device, timer, providers: list[str], doc: dict, *, json_path: str | None = None,
              time_limit: float | None = None, on_row=print) -> int:
    """Time every case not yet in `doc["rows"]`, appending rows (and writing `json_path` after every case);
    `on_row(line)` shows each row or skip note. Returns how many cases the time limit left."""
    started = time.monotonic()
    done = {r["case"] for r in doc["rows"]}
    left = 0
    for spec, rows in cases:
        case = case_name(spec, rows)
        if case in done:
            continue
        if time_limit is not None and time.monotonic() - started > time_limit:
            left += 1
            continue
        out, notes = case_rows(spec, rows, device, timer, providers, doc["copy_bandwidth_gbps"], doc["device"])
        for name, note in notes.items():
            on_row(f"{case:<42} {name:<20} {note}")
        if notes:
            doc["skipped"][case] = notes
        for row in out:
            doc["rows"].append(row)
            on_row(format_row(row))
        if json_path:
            write_json(json_path, doc)  # after every case: a killed run keeps what it measured
    return left


HEADER = (f"{'case':<42} {'impl':<20} {'median us':>10} {'p20':>9} {'p80':>9} {'GB/s':>7} {'%copy':>6} "
          f"{'x eager':>8} {'x compile':>9}")


def format_row(row: dict) -> str:
    st, sc = row["speedup_vs_torch"], row["speedup_vs_compile"]
    return (f"{row['case']:<42} {row['impl']:<20} {row['median_us']:>10.1f} {row['p20_us']:>9.1f} "
            f"{row['p80_us']:>9.1f} {row['gbps']:>7.1f} {pct_text(row):>6} "
            + (f"{st:>7.2f}x " if st is not None else f"{'-':>8} ")
            + (f"{sc:>8.2f}x" if sc is not None else f"{'-':>9}"))
