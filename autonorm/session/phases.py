"""The phases, each run in a process of its own by `run_phase_process`: every finished case is one line
in the phase's file at once; a phase returns False when it stopped for lack of time with cases left."""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .. import bench, dispatch, measure, settings, tune
from ..backends import base, get_backend
from ..device import software_versions
from ..spec import NormSpec
from .cases import bench_cases, smoke_cases, variant_cases
from .phase import Phase
from .records import EXIT_OUT_OF_SHARE, now_iso


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
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if ph.dry_run:  # the interpreter stands in for the GPU backends (the tuner never records it otherwise)
        backends = {name: get_backend(name) for name in ("triton", "torch")}
        rows, trials, hidden = 4, 2, (32,)
    else:
        backends = tune.native_backends(ph.device, None)
        rows, trials, hidden = 16384, 12, (4096, 8192)
    timer = ph.timer()
    copy_gbps = ph.copy_gbps()
    options = tune.StudyOptions(trials=trials, compile_workers=1 if ph.dry_run else 4, compile_baseline=False)
    protocol = {**tune.protocol(timer, options), "trials": trials}
    studies = [NormSpec(op, d, "bfloat16", "bfloat16", n) for n in hidden for op in ("rmsnorm", "layernorm")
               for d in ("fwd", "bwd")]
    with tempfile.TemporaryDirectory() as tmp:
        storage = tune.make_storage(None, Path(tmp) / "session.optuna.journal")
        for i, spec in enumerate(studies):
            case = f"{spec.short()} rows={rows}"
            if case in ph.done:
                continue
            if not ph.can_start(5.0):
                return False
            # This N's studies share what is left evenly; the next N gets only what they leave.
            left_in_round = sum(1 for s in studies[i:] if s.hidden == spec.hidden)
            budget = max(3.0, 0.8 * ph.left() / left_in_round)
            t0 = ph.start(case)
            runner = tune.StudyRunner(
                spec, rows, backends, timer, dataclasses.replace(options, time_budget=budget), storage=storage,
                name=tune.study_name(ph.ident["slug"], spec, rows, backends), device=ph.device,
                seeds=[tune.Candidate(n, b.heuristic(spec)) for n, b in backends.items()], copy_gbps=copy_gbps)
            try:
                result = runner.run()
            except Exception as exc:
                ph.fail(case, t0, exc, spec=spec.to_dict(), rows=rows)
                continue
            failed = dict(list(result.failed.items())[:20])
            ph.finish(case, t0, status="ok" if result.record else "no valid candidate", spec=spec.to_dict(),
                      rows=rows, record=result.record.to_json() if result.record else None, trials=result.trials,
                      measured=result.measured, failed_count=len(result.failed), failed=failed,
                      space_size=result.space_size, time_budget_s=round(budget, 1), protocol=protocol)
    return True


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


