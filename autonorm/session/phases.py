"""The phases, each run in a process of its own by `run_phase_process`: every finished case is one line
in the phase's file at once; a phase returns False when it stopped for lack of time with cases left."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .. import bench, dispatch, measure, settings, tune
from ..backends import base, get_backend
from ..device import software_versions
from ..spec import NormSpec
from ..tune.options import budgeted
from .cases import bench_cases, smoke_cases, variant_cases
from .phase import Phase
from .records import EXIT_OUT_OF_SHARE, now_iso

# Seconds of the tune phase's share kept from the tuner's budget: the phase process's exit and the last line's
# write, after the run's own end (the budget already keeps what closing its compile workers takes).
BUDGET_MARGIN_S = 2.0


def phase_env(ph: Phase) -> bool:
    t0 = ph.start("identity")
    versions = {**software_versions(), "triton_default_fp_fusion": settings.pin_triton_fp_fusion()}
    clocks = None
    if ph.device.type == "cuda":
        query = "clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.draw,temperature.gpu,driver_version"
        try:
            r = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True,
                               text=True, timeout=20)
            clocks = r.stdout.strip() or r.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            clocks = f"nvidia-smi unavailable: {exc}"
    ph.finish("identity", t0, status="ok", device=ph.ident, versions=versions, clocks=clocks,
              dry_run=ph.dry_run, torch_threads=torch.get_num_threads())
    t0 = ph.start("copy bandwidth")
    nbytes, reps = ((8 << 20), 3) if ph.dry_run else ((1 << 30), 20)
    gbps = measure.copy_bandwidth(ph.device, nbytes=nbytes, reps=reps)
    ph.finish("copy bandwidth", t0, status="ok", copy_gbps=gbps, bytes=nbytes, reps=reps,
              method="tensor.copy_ of a float32 buffer (a same-dtype copy is a memcpy: dtype-independent); "
                     "bytes read + written over the median time; CUDA events on a GPU")
    return True


def phase_smoke(ph: Phase, backend_name: str) -> bool:
    backend = get_backend(backend_name)
    reason = ph.unavailable(backend)
    if reason is not None:
        if "unavailable" not in ph.done:
            ph.finish("unavailable", ph.start("unavailable"), backend=backend_name, status="unavailable",
                      error=reason)
        return True
    base.poison_outputs(True)  # every output starts as NaN: an element a kernel forgets fails its check
    for case in smoke_cases(ph.dry_run):
        if case.name in ph.done:
            continue
        if not ph.can_start():
            return False
        t0 = ph.start(case.name)
        fields = {"backend": backend_name, "spec": case.spec.to_dict(), "rows": case.rows, "strided": case.strided}
        try:
            config = backend.heuristic(case.spec)
            fields["config"] = config.to_dict()
            kernel = backend.compile(case.spec, config, ph.device)
            ph.finish(case.name, t0, **fields, **ph.check(case.spec, kernel, case.rows, case.strided))
        except Exception as exc:
            ph.fail(case.name, t0, exc, **fields)
    return True


# The dispatcher's choice without a database is the heuristic of the first of these that runs: its row is
# the report's "autonorm"; the others' rows are named by their backend.
GPU_ORDER = [b for b in dispatch.DEFAULT_ORDER["cuda"] if b != "torch"]


def _bench_impls(ph: Phase, spec, rows: int, providers: list[str], forced_backends: list[str]):
    """(impl -> call, provider -> why skipped, impl -> the dispatcher's choice): the providers, then autonorm
    with each backend forced in turn."""
    impls, notes, choices = {}, {}, {}
    for forced in [None] + forced_backends:
        if forced is not None:
            os.environ["AUTONORM_BACKEND"] = forced
            dispatch.reset(keep_databases=True)
        found, choice, skipped = bench.build_case(spec, rows, ph.device, 1,
                                                  providers if forced is None else ["autonorm"])
        for name, note in skipped.items():
            notes[name if forced is None else f"autonorm[{forced}]"] = note
        for impl, fn in found.items():
            impls.setdefault(impl, fn)
            if choice is not None and impl.startswith("autonorm"):
                choices[impl] = choice
    os.environ.pop("AUTONORM_BACKEND", None)
    dispatch.reset(keep_databases=True)
    return impls, notes, choices


def _bench_rows(ph: Phase, timer, spec, rows: int, providers: list[str], forced_backends: list[str],
                with_copy: bool, copy_gbps: float) -> tuple[list[dict], dict]:
    """One case timed interleaved: its rows in the `autonorm bench --json` format, and the skipped providers."""
    case = bench.case_name(spec, rows)
    impls, notes, choices = _bench_impls(ph, spec, rows, providers, forced_backends)
    if with_copy:
        src = torch.randn(rows, spec.hidden, device=ph.device).to(spec.torch_x_dtype)
        dst = torch.empty_like(src)
        impls["copy"] = lambda _i: dst.copy_(src)
    if not impls:
        return [], notes
    first = next((b for b in GPU_ORDER if f"autonorm[{b}]" in impls), None)
    out = []
    for impl, t in timer.time_calls(impls, 1).items():
        provider = ("autonorm" if impl == f"autonorm[{first}]" else impl if impl.startswith("autonorm")
                    else bench.provider_of(impl))
        nbytes = 2 * rows * spec.hidden * spec.x_itemsize if impl == "copy" else spec.bytes_moved(rows)
        gbps = nbytes / (t.median_us * 1e-6) / 1e9 if t.median_us > 0 else 0.0
        choice = choices.get(impl)
        out.append({"case": case, "impl": impl, "provider": provider, "spec": spec.to_dict(), "rows": rows,
                    "bytes_moved": nbytes, "median_us": t.median_us, "p20_us": t.p20_us, "p80_us": t.p80_us,
                    "samples": t.reps, "gbps": gbps, "pct_copy_bw": 100 * gbps / copy_gbps if copy_gbps else None,
                    "config": choice.config.to_dict() if choice else None, "rung": choice.rung if choice else None,
                    "timer": "cuda_event" if ph.device.type == "cuda" else "perf_counter_ns",
                    "device": ph.ident["slug"], "date": now_iso()})
    return out, notes


def phase_bench(ph: Phase) -> bool:
    copy_gbps = ph.copy_gbps() or measure.copy_bandwidth(ph.device)
    timer = ph.timer() if ph.device.type == "cuda" else bench.timer_for(ph.device, reps=3, warmup=1)
    cases = bench_cases(ph.dry_run)
    for spec, rows in cases:
        case = bench.case_name(spec, rows)
        if case in ph.done:
            continue
        if not ph.can_start(3.0):
            return False
        t0 = ph.start(case)
        try:
            rows_out, notes = _bench_rows(ph, timer, spec, rows, ["torch", "liger"], GPU_ORDER, True, copy_gbps)
            ph.finish(case, t0, status="ok", spec=spec.to_dict(), rows=rows, rows_out=rows_out, skipped=notes,
                      protocol=timer.describe(), copy_gbps=copy_gbps)
        except Exception as exc:
            ph.fail(case, t0, exc, spec=spec.to_dict(), rows=rows)
    for spec, rows in cases:  # torch.compile (minutes of compiling in all) only with the time left
        case = bench.case_name(spec, rows) + " torch.compile"
        if case in ph.done or ph.dry_run:
            continue
        if not ph.can_start(20.0):
            return True  # torch.compile is extra: the phase's own cases are done
        t0 = ph.start(case)
        try:
            rows_out, notes = _bench_rows(ph, timer, spec, rows, ["torch.compile"], [], False, copy_gbps)
            ph.finish(case, t0, status="ok", spec=spec.to_dict(), rows=rows, rows_out=rows_out, skipped=notes,
                      protocol={**timer.describe(), "interleaved": "timed after, apart from the others"},
                      copy_gbps=copy_gbps)
        except Exception as exc:
            ph.fail(case, t0, exc, spec=spec.to_dict(), rows=rows)
    return True


def _variant_result(ph: Phase, timer, case, backend, heuristic, variant) -> dict:
    """The variant checked, then timed interleaved with the heuristic: the fields of its line."""
    invalid = backend.config_cls.is_valid(case.spec, variant)
    if invalid:
        return {"status": "invalid", "error": invalid}
    kernels = [backend.compile(case.spec, c, ph.device) for c in (heuristic, variant)]
    check = ph.check(case.spec, kernels[1], min(case.rows, 2048))
    if check["status"] != "pass":
        return {"status": "wrong result", "errors": check["errors"]}
    base_t, var_t = timer.interleaved(case.spec, kernels, case.rows)
    nbytes = case.spec.bytes_moved(case.rows)
    return {"status": "ok", "heuristic_us": base_t.median_us, "variant_us": var_t.median_us,
            "speedup": round(base_t.median_us / var_t.median_us, 3),
            "variant_gbps": round(nbytes / var_t.median_us / 1e3, 1),
            "heuristic_gbps": round(nbytes / base_t.median_us / 1e3, 1), "copy_gbps": ph.copy_gbps(),
            "protocol": {**timer.describe(), "interleaved": True}}


def phase_variants(ph: Phase) -> bool:
    timer = ph.timer()
    for case in variant_cases(ph.dry_run):
        if case.name in ph.done:
            continue
        if not ph.can_start(3.0):
            return False
        t0 = ph.start(case.name)
        backend = get_backend(case.backend)
        fields = {"backend": case.backend, "spec": case.spec.to_dict(), "rows": case.rows}
        reason = ph.unavailable(backend)
        if reason is not None:
            ph.finish(case.name, t0, status="unavailable", error=reason, **fields)
            continue
        heuristic = backend.heuristic(case.spec)
        variant = heuristic.replace(**dict(case.changes))
        fields.update(heuristic=heuristic.short(), variant=variant.short())
        try:
            ph.finish(case.name, t0, **_variant_result(ph, timer, case, backend, heuristic, variant), **fields)
        except Exception as exc:
            ph.fail(case.name, t0, exc, **fields)
    return True


def phase_tune(ph: Phase) -> bool:
    """`autonorm tune --budget` on a small grid, its budget this phase's share: the planner divides it across the
    studies (anchors first, their neighbours seeded from their winners), prints its plan, and each study's line is
    written as the study ends, with how complete its search was."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if ph.dry_run:  # the interpreter stands in for the GPU backends (the tuner never records it otherwise)
        backends = {name: get_backend(name) for name in ("triton", "torch")}
        rows, trials, hidden = 4, 2, (32,)
    else:
        backends = tune.native_backends(ph.device, None)
        rows, trials, hidden = 16384, 12, (4096, 8192)
    specs = [s for s in (NormSpec(op, d, "bfloat16", "bfloat16", n) for n in hidden for op in ("rmsnorm", "layernorm")
                         for d in ("fwd", "bwd")) if _study_case(s, rows) not in ph.done]
    if not specs:
        return True
    if not ph.can_start(10.0):
        return False
    options = tune.StudyOptions(trials=trials, compile_workers=1 if ph.dry_run else 4, compile_baseline=False,
                                compile_processes=not ph.dry_run, **budgeted(ph.device.type))
    timer = ph.timer() if ph.dry_run else measure.timer_for(ph.device, options.windows)
    protocol = {**tune.protocol(timer, options), "trials": trials}
    began, started = time.monotonic(), {}

    def study_starts(total, case):  # tune_grid's progress hook: a study begins
        started[case] = ph.start(case)

    class Written(list):  # tune_grid's results: each study's line is on disk as soon as the study ends
        def append(self, result):
            super().append(result)
            case, record = _study_case(result.spec, result.rows), result.record
            ph.finish(case, started.get(case, time.monotonic() - result.wall_s),
                      status="ok" if record else "no valid candidate", spec=result.spec.to_dict(), rows=result.rows,
                      record=record.to_json() if record else None, completeness=result.completeness,
                      trials=result.trials, measured=result.measured, failed_count=len(result.failed),
                      failed=dict(list(result.failed.items())[:20]), space_size=result.space_size,
                      protocol=protocol)

    results = Written()
    budget = ph.left() - BUDGET_MARGIN_S
    with tempfile.TemporaryDirectory() as tmp:
        try:
            tune.tune_grid(specs, [rows], backends, ph.device, options, db_path=Path(tmp) / "db.json",
                           storage=tune.make_storage(None, Path(tmp) / "session.optuna.journal"), lock_path=None,
                           results=results, copy_gbps=ph.copy_gbps(), timer=timer, progress=study_starts,
                           budget_s=budget, elapsed=lambda: time.monotonic() - began,
                           show_plan=lambda text: print(text, flush=True))
        except Exception as exc:  # a study that raised: recorded, the studies that ended before it are on disk
            running = next((c for c in reversed(started) if c not in ph.done), "budgeted grid")
            ph.fail(running, started.get(running, began), exc)
            return True
    for spec in specs:  # the plan left these out (it printed why): a line each, so the summary counts them
        if _study_case(spec, rows) not in ph.done:
            ph.finish(_study_case(spec, rows), time.monotonic(), status="left out by the budget",
                      spec=spec.to_dict(), rows=rows, record=None, trials=0, failed_count=0)
    return True


def _study_case(spec: NormSpec, rows: int) -> str:
    """A tune line's case: the progress label `tune_grid` gives the study."""
    return f"{spec.short()} rows={rows}"


def phase_sweep(ph: Phase) -> bool:
    spec = NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 32 if ph.dry_run else 4096)
    rows, check_rows = (4, 3) if ph.dry_run else (16384, 2048)  # checked on rows > programs (DW_PARTIALS)
    backend = get_backend("triton")
    space = backend.space(spec)
    size = len(space)
    random.Random(0).shuffle(space)
    if ph.dry_run:
        space = space[:3]
    timer = ph.timer()
    fields = {"spec": spec.to_dict(), "spec_short": spec.short(), "rows": rows, "space": size,
              "protocol": timer.describe()}
    for config in space:
        key = tune.Candidate("triton", config).key
        if key in ph.done:
            continue
        if not ph.can_start():
            return False
        t0 = ph.start(key)
        try:
            kernel = backend.compile(spec, config, ph.device)
            check = ph.check(spec, kernel, check_rows)
            if check["status"] != "pass":
                ph.finish(key, t0, candidate=key, status="wrong result", errors=check["errors"], **fields)
                continue
            t = timer.measure(spec, kernel, rows)
            ph.finish(key, t0, candidate=key, status="ok", median_us=t.median_us, p20_us=t.p20_us, p80_us=t.p80_us,
                      reps=t.reps, **fields)
        except Exception as exc:
            ph.fail(key, t0, exc, candidate=key, **fields)
    return True


def run_phase_process(name: str, out: Path, until: float, dry_run: bool) -> int:
    """One phase, in this process, starting no case that would end after `until` (epoch seconds): exit
    status 0 when it finished, EXIT_OUT_OF_SHARE when it stopped for lack of time."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cut: what is on disk is what finished
    ph = Phase(name, out, until, dry_run)
    if name.startswith("smoke-"):
        finished = phase_smoke(ph, name[len("smoke-"):])
    else:
        finished = {"env": phase_env, "bench": phase_bench, "variants": phase_variants, "tune": phase_tune,
                    "sweep": phase_sweep}[name](ph)
    return 0 if finished else EXIT_OUT_OF_SHARE


