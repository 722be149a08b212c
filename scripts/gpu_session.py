#!/usr/bin/env python3
"""One GPU session: the most valuable hardware evidence from a single call of a few minutes.

    python scripts/gpu_session.py --out OUT [--budget 510]     # on a GPU machine (autonorm installed)
    python scripts/gpu_session.py --out OUT --dry-run          # anywhere: CPU, Triton interpreter, Numba simulator
    python scripts/gpu_session.py import OUT                   # afterwards: database, report, search table

Phases, most valuable first, each in its own process (a sticky CUDA error ends only that
process) under its own share of the budget; a share a phase leaves unused goes to the next:

  env            versions, device, clocks, the device-to-device copy bandwidth (1 GiB, CUDA events)
  smoke-triton   ~33 correctness cases per backend, inputs and the fp64 reference on the device;
  smoke-cupy     the case list is `smoke_cases()`; pass/fail with the error
  smoke-numba
  bench          bf16 RMS/LN fwd/bwd at N = 4K..256K, M*N = 2^27: copy, torch, Liger, every
                 backend's heuristic (torch.compile after, if time is left)
  variants       each kernel variant against its backend's heuristic, checked, then timed interleaved:
                 CuPy's thread-block cluster forward (256K, 64K) and backward (64K; 128K with dW/dB in
                 shared memory), its dW/dB partials per row instead of in registers or shared memory,
                 Triton's and Numba's backward prefetch, Numba's scalar instead of 64-bit accesses and its
                 chunked forward reading the row back from L2 instead of shared memory
  tune           a small database: bf16 RMS/LN fwd/bwd at N=4096 (then 8192), 16K rows, <= 12 trials
  sweep          every Triton config of rmsnorm bwd bf16 N=4096 in random order until the budget ends

Every finished case is appended at once as one JSON line, so a run cut at any point keeps what
it finished. A phase process that dies (not cut) is restarted and skips its finished cases; the
case it died in is recorded as crashed. The human summary is printed last, also after a cut or
a signal. The out folder holds at most these 7 files:

  session.log    everything the phases printed
  session.jsonl  env facts (device, versions, clocks, copy bandwidth) and one line per phase run
  smoke.jsonl  bench.jsonl  variants.jsonl  tune.jsonl  sweep.jsonl   one line per finished case

The dry run walks every phase on the CPU at small sizes (Triton interpreter, Numba simulator,
CPU timers) and writes the same files; its device slug starts with `dry-run-`, and its
numbers prove the pipeline only, never speed. docs/GPU_RUNBOOK.md says how to run a session
and what to commit.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# (phase, weight): a phase's share is its weight's part of the budget left when it starts.
PHASES = (("env", 1), ("smoke-triton", 3), ("smoke-cupy", 2), ("smoke-numba", 2), ("bench", 5), ("variants", 2),
          ("tune", 4), ("sweep", 3))
DEFAULT_BUDGET = 510.0
SUMMARY_RESERVE_S = 5.0  # kept back for the summary
KILL_GRACE_S = 3.0  # a phase past its share gets SIGTERM, then SIGKILL after this
MAX_RESTARTS = 3
EXIT_OUT_OF_SHARE = 3  # a phase stopped before its next case for lack of time: cases are left
EXIT_CONTEXT_LOST = 70  # a phase exits with this after a sticky CUDA error: restarted fresh
FILES = ("session.log", "session.jsonl", "smoke.jsonl", "bench.jsonl", "variants.jsonl", "tune.jsonl", "sweep.jsonl")
CASE_MARK = "@case "  # a phase prints this before each case: the parent knows where a cut or crash hit


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def append_line(path: Path, obj: dict) -> None:
    """One finished case, on disk at once (a killed process loses nothing it finished)."""
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_lines(path: Path) -> list[dict]:
    """The JSON lines of a file; a line cut by a kill (the last one) is skipped."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def phase_file(out: Path, phase: str) -> Path:
    return out / ("smoke.jsonl" if phase.startswith("smoke-") else f"{phase}.jsonl" if phase != "env"
                  else "session.jsonl")


# ============================================================================================
# The parent: runs each phase in a process of its own, under its share, then the summary.
# It never imports torch, so nothing a phase does to the GPU can stop the summary.
# ============================================================================================

class Session:
    def __init__(self, out: Path, budget: float, dry_run: bool, phases: list[str]):
        self.out, self.budget, self.dry_run, self.phases = out, budget, dry_run, phases
        self.started = time.monotonic()
        self.deadline = self.started + budget
        self.child: subprocess.Popen | None = None
        self.stopped_by: str | None = None
        self.log = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        line = f"[session {time.monotonic() - self.started:6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def _on_signal(self, signum, _frame):
        self.stopped_by = signal.Signals(signum).name
        self._stop_child()

    def _stop_child(self):
        child = self.child
        if child is not None and child.poll() is None:
            try:
                os.killpg(child.pid, signal.SIGTERM)  # the phase's process group: its compilers too
            except ProcessLookupError:
                pass  # it ended meanwhile

    def _env(self) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.dry_run:
            env.update(TRITON_INTERPRET="1", NUMBA_ENABLE_CUDASIM="1")
        return env

    def _run_child(self, phase: str, until: float) -> tuple[int, str | None]:
        """(exit status, the case it was in when it ended) of one phase process."""
        cmd = [sys.executable, os.path.abspath(__file__), "phase", phase, "--out", str(self.out),
               "--until", f"{time.time() + until - time.monotonic():.3f}"] + (["--dry-run"] if self.dry_run else [])
        # A process group of its own (killed as one, compilers included), but not a session of its own:
        # whatever ends this command (a remote runner's timeout) still ends the phase with it.
        self.child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=self._env(), preexec_fn=os.setpgrp, errors="replace")
        current = [None]

        def pump():
            for line in self.child.stdout:
                if line.startswith(CASE_MARK):
                    current[0] = line[len(CASE_MARK):].strip()
                sys.stdout.write(line)
                sys.stdout.flush()
                self.log.write(line)
                self.log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            self.child.wait(timeout=max(0.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._stop_child()
            try:
                self.child.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.child.pid, signal.SIGKILL)
                self.child.wait()
        reader.join(timeout=2)
        rc, self.child = self.child.returncode, None
        return rc, current[0]

    def run_phase(self, phase: str, weight: float, weights_left: float) -> None:
        share = max(0.0, self.left() - SUMMARY_RESERVE_S) * weight / weights_left
        until = time.monotonic() + share
        started = time.monotonic()
        self.say(f"phase {phase}: share {share:.0f}s of {self.left():.0f}s left")
        restarts, status, rc, case = 0, "done", 0, None
        while True:
            if share < 1.0:
                status = "skipped: no time left"
                break
            rc, case = self._run_child(phase, until)
            if self.stopped_by:
                status = f"stopped by {self.stopped_by}"
                break
            if rc == 0:
                status = "done"
                break
            if rc == EXIT_OUT_OF_SHARE or time.monotonic() >= until - 0.5:
                status = "cut at the end of its share"
                break
            status = f"exit status {rc}"
            finished = {r.get("case") for r in read_lines(phase_file(self.out, phase)) if r.get("phase") == phase}
            if case is not None and case not in finished:
                # The process died inside this case: record it so that the restart skips it.
                crashed = {"phase": phase, "case": case, "status": "crashed",
                           "error": f"the phase process died (exit status {rc})", "date": now_iso()}
                if phase.startswith("smoke-"):
                    crashed["backend"] = phase[len("smoke-"):]
                append_line(phase_file(self.out, phase), crashed)
            if restarts >= MAX_RESTARTS:
                break
            restarts += 1
            self.say(f"phase {phase}: {status} in case {case!r}; restarting, finished cases are kept")
        event = {"phase": phase, "case": f"phase {phase}", "event": "phase", "status": status, "exit_status": rc,
                 "seconds": round(time.monotonic() - started, 1), "share_s": round(share, 1),
                 "restarts": restarts, "date": now_iso()}
        if status != "done" and case is not None:
            event["last_case"] = case
        append_line(self.out / "session.jsonl", event)
        self.say(f"phase {phase}: {status} after {event['seconds']}s")

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "session.log", "a")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.say(f"out {self.out}, budget {self.budget:.0f}s, phases {', '.join(self.phases)}"
                 + (", DRY RUN (CPU)" if self.dry_run else ""))
        weights = dict(PHASES)
        try:
            for i, phase in enumerate(self.phases):
                if self.stopped_by:
                    break
                self.run_phase(phase, weights[phase], sum(weights[p] for p in self.phases[i:]))
        finally:
            self._stop_child()
            try:
                text = summary(self.out)
            except Exception as exc:  # the files are on disk whatever happens here
                text = (f"gpu_session: the summary failed ({type(exc).__name__}: {exc}); "
                        f"the files in {self.out} are complete")
            self.log.write(text + "\n")
            self.log.close()
            print(text, flush=True)
        if self.stopped_by:
            return 128 + getattr(signal, self.stopped_by)
        return 0


# ============================================================================================
# The summary (pure JSON reading: printed by the parent, embedded in the imported report)
# ============================================================================================

def _phase_events(out: Path) -> list[dict]:
    return [e for e in read_lines(out / "session.jsonl") if e.get("event") == "phase"]


def env_facts(out: Path) -> dict:
    """{'identity': ..., 'copy': ...} from the env phase's lines (missing keys: not measured)."""
    facts = {}
    for line in read_lines(out / "session.jsonl"):
        if line.get("case") in ("identity", "copy bandwidth") and line.get("status") == "ok":
            facts[line["case"]] = line
    return facts


def _fmt_gbps(row: dict | None) -> str:
    return "-" if row is None else f"{row['gbps']:.0f} ({row['pct_copy_bw']:.0f}%)"


def summary(out: Path) -> str:
    facts = env_facts(out)
    ident = facts.get("identity", {})
    dev = ident.get("device", {})
    lines = ["", "=" * 100,
             f"autonorm GPU session: {dev.get('name', '?')} ({dev.get('slug', '?')}), {ident.get('date', '?')}"
             + (" -- DRY RUN on CPU: pipeline only, never speed" if ident.get("dry_run") else "")]
    vers = ident.get("versions", {})
    if vers:
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v))
    copy = facts.get("copy bandwidth")
    lines.append(f"copy bandwidth: {copy['copy_gbps']:.0f} GB/s ({copy['bytes'] / 2**30:.2f} GiB, median of "
                 f"{copy['reps']})" if copy else "copy bandwidth: not measured")
    lines.append("phases: " + " | ".join(f"{e['phase']} {e['status']} {e['seconds']:.0f}s" for e in _phase_events(out)))

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

    variants = read_lines(out / "variants.jsonl")
    if variants:
        lines.append("variants (speedup over the heuristic; > 1: the variant is faster):")
        for v in variants:
            if v["status"] == "ok":
                result = f"{v['speedup']:.2f}x, {v['variant_gbps']:.0f} GB/s"
            elif v["status"] == "unavailable":
                result = v["status"]
            else:
                result = f"{v['status']}: {str(v.get('error') or v.get('errors'))[:100]}"
            lines.append(f"  {v['case'][:46]:<46} {result}")

    tune = read_lines(out / "tune.jsonl")
    if tune:
        lines.append(f"tune: {sum(t['status'] == 'ok' for t in tune)}/{len(tune)} studies recorded")
        for t in tune:
            w = (t.get("record") or {}).get("winner")
            lines.append(f"  {t['case']}: " + (f"{w['backend']} {w['median_us']:.1f} us {w['gbps']:.0f} GB/s, "
                                               f"{t['trials']} trials ({t['failed_count']} failed)"
                                               if w else t["status"]))

    sweep = read_lines(out / "sweep.jsonl")
    if sweep:
        ok = [s for s in sweep if s["status"] == "ok"]
        best = min(ok, key=lambda s: s["median_us"]) if ok else None
        about = next(s for s in sweep if "space" in s) if any("space" in s for s in sweep) else {}
        lines.append(f"sweep {about.get('spec_short', '?')} rows={about.get('rows', '?')}: {len(sweep)}/"
                     f"{about.get('space', '?')} "
                     f"configs, {len(ok)} measured, {len(sweep) - len(ok)} failed"
                     + (f"; best {best['median_us']:.1f} us {best['candidate']}" if best else ""))
    present = [f for f in FILES if (out / f).exists()]
    lines.append(f"files in {out}: {', '.join(present)}")
    lines.append("=" * 100)
    return "\n".join(lines)


# ============================================================================================
# The phases (each runs in its own process: `gpu_session.py phase NAME ...`)
# ============================================================================================

@dataclass(frozen=True)
class SmokeCase:
    name: str
    spec: object  # NormSpec
    rows: int
    strided: bool = False


def smoke_cases(dry_run: bool) -> list[SmokeCase]:
    """The smoke list, most valuable first. The dry run keeps every case at a small size."""
    from autonorm.spec import NormSpec

    out = []

    def add(op, direction, x, w, n, rows, strided=False, **features):
        # Named by the GPU size in the dry run too, where it runs small (odd sizes stay odd).
        name = f"{op}.{direction} {x}" + (f" w={w}" if w != x else "") + f" {rows}x{n}"
        name += "".join(f" +{f}" for f, on in features.items() if on) + (" strided" if strided else "")
        if dry_run:
            n, rows = min(n, 32) + n % 2, min(rows, 2)
        out.append(SmokeCase(name, NormSpec(op, direction, x, w, n, **features), rows, strided))

    both = [(op, d) for op in ("rmsnorm", "layernorm") for d in ("fwd", "bwd")]
    for op, d in both:  # the usual LLM case
        add(op, d, "bfloat16", "bfloat16", 4096, 4096)
    for op, d in both:
        add(op, d, "float32", "float32", 5120, 2048)
    for op, d in both:  # an N that is no power of two and not a multiple of 16 bytes
        add(op, d, "float16", "float16", 1128, 4096)
    for op, d in both:  # mixed precision, strided rows, every feature of the op
        add(op, d, "bfloat16", "float32", 4096, 1024, strided=True, residual=True,
            **({"offset": True} if op == "rmsnorm" else {"bias": True}))
    for n, rows in ((65537, 64), (262144, 16)):  # rows beyond any on-chip tile: the chunked loops
        for op, d in both:
            add(op, d, "bfloat16", "bfloat16", n, rows)
    for op in ("rmsnorm", "layernorm"):  # backward with rows far above the number of programs
        add(op, "bwd", "bfloat16", "bfloat16", 256, 20000)
    # Heuristics a static check of the compiled kernels (registers, spills) predicts to fail on sm_90.
    for op in ("rmsnorm", "layernorm"):
        add(op, "fwd", "bfloat16", "bfloat16", 65536, 256)
        add(op, "bwd", "bfloat16", "bfloat16", 16384, 1024)
    add("rmsnorm", "bwd", "float32", "float32", 4096, 2048)
    add("layernorm", "bwd", "float32", "float32", 8192, 1024)
    # rows * N > 2^31: offsets need 64 bits; a fifth of the rows lie past 2^31 elements.
    for d in ("fwd", "bwd"):
        add("rmsnorm", d, "bfloat16", "bfloat16", 4096, (1 << 19) + (1 << 17))
    return out


def bench_cases(dry_run: bool) -> list:
    """(spec, rows): bf16 RMS/LN fwd/bwd, M*N = 2^27, N outermost so that a cut run has every op at small N."""
    from autonorm.spec import NormSpec

    hidden, elements = ((32,), 1 << 7) if dry_run else ((4096, 8192, 16384, 65536, 262144), 1 << 27)
    return [(NormSpec(op, d, "bfloat16", "bfloat16", n), elements // n)
            for n in hidden for op in ("rmsnorm", "layernorm") for d in ("fwd", "bwd")]


@dataclass(frozen=True)
class VariantCase:
    name: str
    backend: str
    spec: object  # NormSpec
    rows: int
    changes: tuple  # (knob, value) pairs applied to the backend's heuristic


def variant_cases(dry_run: bool) -> list[VariantCase]:
    """Kernel variants the heuristic does not choose (or chose without a GPU), each to be timed against it."""
    from autonorm.spec import NormSpec

    out = []

    def add(name, backend, op, direction, n, m, dry=None, **changes):
        # Named by the GPU size (m rows of n); the dry run runs every case at 2 x 64 (interpreter, simulator),
        # with `dry` changes too where the variant would otherwise be the heuristic's kernel at that size.
        name = f"{op} {direction} {m}x{n} {backend} {name}"
        if dry_run:
            n, m = 64, 2
            changes.update(dry or {})
        spec = NormSpec(op, direction, "bfloat16", "bfloat16", n, bias=op == "layernorm", residual=direction == "fwd")
        out.append(VariantCase(name, backend, spec, m, tuple(changes.items())))

    for op in ("rmsnorm", "layernorm"):
        # The row on chip across a cluster, against the heuristic's two passes (256K) or its one block (64K).
        for n, m, sizes in ((262144, 512, (4, 8)), (65536, 2048, (2, 4, 8))):
            for c in sizes:
                add(f"cluster{c}", "cupy", op, "fwd", n, m, row_cache=f"cluster{c}", threads=1024, rows=1, unroll=1)
        # The backward's row on chip across a cluster (dW/dB in registers: a slice of <= 8 or 16 elements a
        # thread), against the heuristic's two passes over global memory with column-outer partials.
        add("cluster8", "cupy", op, "bwd", 65536, 2048, row_cache="cluster8", threads=1024, rows=1, unroll=1,
            partials="registers")
        # Past the registers' dW/dB budget (C x 16K RMS, C x 8K LN with a bias): the sums in shared memory beside
        # the slice, against the heuristic's two passes over global memory with column-outer partials.
        add("cluster8 shared partials", "cupy", op, "bwd", 131072, 1024, row_cache="cluster8", threads=1024, rows=1,
            unroll=1, partials="shared")
        add("prefetch", "triton", op, "bwd", 4096, 16384, BWD_PREFETCH=1)
        add("prefetch", "cupy", op, "bwd", 4096, 16384, prefetch=1)
        add("prefetch", "numba", op, "bwd", 4096, 16384, prefetch=1)
        add("scalar accesses", "numba", op, "fwd", 4096, 16384, vec=1)
        # The heuristic's chunked Numba forward keeps the row in shared memory; the variant reads it back from L2.
        add("row read back", "numba", op, "fwd", 16384, 8192, row_cache="global",
            dry=dict(threads=32, items=1, rows=1, vec=1))
    # The heuristic sums these dW partials in registers; the variant read-modify-writes them per row.
    add("partials per row", "cupy", "rmsnorm", "bwd", 16384, 8192, partials="global")
    # Rows re-read from global memory: the heuristic's column-outer second pass against per-row partials.
    add("partials per row", "cupy", "layernorm", "bwd", 65536, 2048, partials="global")
    # The heuristic sums these dW/dB in shared memory beside the row; the variant read-modify-writes them per row.
    add("partials per row", "cupy", "layernorm", "bwd", 12288, 8192, partials="global")
    # The heuristic's shared-memory row (LN bwd 16K): the next row copied in by cp.async during this one.
    add("prefetch", "cupy", "layernorm", "bwd", 16384, 8192, prefetch=1)
    return out


class Phase:
    """What every phase process shares: the device, the deadline, its output file, finished cases."""

    def __init__(self, name: str, out: Path, until: float, dry_run: bool):
        import torch

        from autonorm.device import identity

        self.name, self.out, self.until, self.dry_run = name, out, until, dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        if not dry_run and not torch.cuda.is_available():
            raise SystemExit("gpu_session: no CUDA GPU visible (use --dry-run on a machine without one)")
        self.ident = dict(identity(self.device))
        if dry_run:
            self.ident["slug"] = "dry-run-" + self.ident["slug"]
        self.file = phase_file(out, name)
        self.done = {r.get("case") for r in read_lines(self.file) if r.get("phase") == name}
        self.longest = 0.0
        self.parent = os.getppid()

    def left(self) -> float:
        return self.until - time.time()

    def can_start(self, floor: float = 1.0) -> bool:
        """Whether a case that takes as long as the longest so far still fits."""
        if os.getppid() != self.parent:
            print(f"{self.name}: the session process is gone: stopping", flush=True)
            return False
        if self.left() < max(floor, 1.2 * self.longest):
            print(f"{self.name}: {self.left():.1f}s left in this phase's share: stopping before the next case",
                  flush=True)
            return False
        return True

    def start(self, case: str) -> float:
        print(f"{CASE_MARK}{case}", flush=True)
        return time.monotonic()

    def finish(self, case: str, started: float, **fields) -> dict:
        seconds = time.monotonic() - started
        self.longest = max(self.longest, seconds)
        line = {"phase": self.name, "case": case, **fields, "seconds": round(seconds, 3), "date": now_iso()}
        append_line(self.file, line)
        self.done.add(case)
        print(f"{self.name}: {case}: {fields.get('status')} ({seconds:.1f}s)", flush=True)
        return line

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def context_lost(self) -> bool:
        """After a failed case: whether CUDA still works in this process (a sticky error ends it)."""
        import torch

        if self.device.type != "cuda":
            return False
        try:
            torch.cuda.synchronize(self.device)
            torch.ones(1, device=self.device).add_(1).item()
            return False
        except Exception:
            return True

    def copy_gbps(self) -> float | None:
        copy = env_facts(self.out).get("copy bandwidth")
        return copy["copy_gbps"] if copy else None


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 600 else text[:600] + " ..."


def _rel(actual, expected) -> float:
    """reference.rel_l2 of one output, with verify.compare's rules for missing and extra outputs."""
    from autonorm import reference

    if expected is None:
        return float("inf") if actual is not None and actual.numel() != 0 else 0.0
    if actual is None or tuple(actual.shape) != tuple(expected.shape):
        return float("inf")
    return reference.rel_l2(actual, expected)


def device_errors(spec, inputs, outputs, chunk_elements: int) -> dict:
    """Relative L2 error of every output against the fp64 reference, computed on the device by row chunks.

    A chunk's fp64 reference is all that is ever held (a 2^31-element case would need 16 GiB per
    tensor at once), and the worst chunk counts, so a bug in a few rows is not averaged away. On
    tensors past 2^28 elements only the first, the last and the chunk at element 2^31 are compared
    (their comparison copies fp64 to the host); dweight/dbias always sum the reference of every row.
    """
    from autonorm import reference

    rows, n = inputs.x.shape
    step = max(1, chunk_elements // n)
    starts = list(range(0, rows, step))
    compared = set(starts)
    if rows * n > 1 << 28:
        compared = {starts[0], starts[-1], ((1 << 31) // n) // step * step} & compared
    errors: dict[str, float] = {}

    def worst(name, actual, expected):
        errors[name] = max(errors.get(name, 0.0), _rel(actual, expected))

    def part(t, c):
        return None if t is None else t[c]

    sums = [None, None]  # dweight, dbias
    for lo in starts:
        c = slice(lo, lo + step)
        if spec.direction == "fwd":
            if lo not in compared:
                continue
            ref = reference.forward(spec.op, inputs.x[c], inputs.weight, inputs.bias, part(inputs.residual, c),
                                    inputs.eps, inputs.offset)
            for name, actual, expected in zip(("y", "h", "mean", "rstd"), outputs, ref):
                worst(name, part(actual, c), expected)
        else:
            rdx, rdw, rdb = reference.backward(spec.op, inputs.dy[c], inputs.x[c], inputs.weight, inputs.bias,
                                               part(inputs.dh, c), inputs.eps, inputs.offset)
            if lo in compared:
                worst("dx", outputs[0][c], rdx)
            sums = [r if s is None else s + r for s, r in zip(sums, (rdw, rdb))]
    if spec.direction == "bwd":
        worst("dweight", outputs[1], sums[0])
        worst("dbias", outputs[2], sums[1])
    return errors


def check_case(ph: Phase, spec, kernel, rows: int, strided: bool = False, seed: int = 0) -> dict:
    """Run `kernel` once on device-drawn inputs and compare on the device: {'status', 'errors', 'tolerance'}."""
    from autonorm import reference, verify

    inputs = verify.make_inputs(spec, rows, ph.device, seed=seed, strided=strided, on_device=True)
    outputs = kernel(*inputs.args(spec))
    ph.sync()
    errors = device_errors(spec, inputs, outputs, 1 << (7 if ph.dry_run else 22))
    tol = reference.tolerance(spec.torch_x_dtype)
    ok = all(e <= tol for e in errors.values())  # NaN and inf fail
    return {"status": "pass" if ok else "fail", "errors": errors, "tolerance": tol}


def phase_env(ph: Phase) -> None:
    import torch

    from autonorm import knobs, measure
    from autonorm.device import software_versions

    t0 = ph.start("identity")
    versions = {**software_versions(), "triton_default_fp_fusion": knobs.pin_triton_fp_fusion()}
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


def phase_smoke(ph: Phase, backend_name: str) -> None:
    from autonorm.backends import base, get_backend

    backend = get_backend(backend_name)
    reason = backend.unavailable_reason() or (None if backend.supports_device(ph.device) else
                                              f"{backend_name} does not run on {ph.device} here")
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
            fields.update(check_case(ph, case.spec, kernel, case.rows, case.strided))
        except Exception as exc:
            fields.update(status="error", error=error_text(exc))
        ph.finish(case.name, t0, **fields)
        if fields["status"] == "error" and ph.context_lost():
            print(f"{ph.name}: the CUDA context is lost after {case.name}: a fresh process goes on", flush=True)
            sys.exit(EXIT_CONTEXT_LOST)
    return True


def _bench_row(ph: Phase, case: str, spec, rows: int, impl: str, provider: str, timing, nbytes: int,
               copy_gbps: float | None, choice) -> dict:
    gbps = nbytes / (timing.median_us * 1e-6) / 1e9 if timing.median_us > 0 else 0.0
    return {"case": case, "impl": impl, "provider": provider, "spec": spec.to_dict(), "rows": rows,
            "bytes_moved": nbytes, "median_us": timing.median_us, "p20_us": timing.p20_us, "p80_us": timing.p80_us,
            "samples": timing.reps, "gbps": gbps, "pct_copy_bw": 100 * gbps / copy_gbps if copy_gbps else None,
            "config": choice.config.to_dict() if choice else None, "rung": choice.rung if choice else None,
            "timer": "cuda_event" if ph.device.type == "cuda" else "perf_counter_ns", "device": ph.ident["slug"],
            "date": now_iso()}


def phase_bench(ph: Phase) -> None:
    import torch

    from autonorm import bench, dispatch, measure

    copy_gbps = ph.copy_gbps() or measure.copy_bandwidth(ph.device)
    if ph.device.type == "cuda":
        timer = measure.CudaTimer(ph.device, warmup_ms=10, rep_ms=50)
    else:
        timer = bench.timer_for(ph.device, reps=3, warmup=1)
    # The dispatcher's choice without a database is the heuristic of the first of these that runs: its
    # row is the report's "autonorm"; the others' rows are named by their backend.
    gpu_order = [b for b in dispatch.DEFAULT_ORDER["cuda"] if b != "torch"]

    def measure_case(spec, rows, providers, forced_backends):
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

    def run(spec, rows, case, providers, forced_backends, with_copy):
        impls, notes, choices = measure_case(spec, rows, providers, forced_backends)
        if with_copy:
            src = torch.randn(rows, spec.hidden, device=ph.device).to(spec.torch_x_dtype)
            dst = torch.empty_like(src)
            impls["copy"] = lambda _i: dst.copy_(src)
        if not impls:
            return [], notes
        timings = timer.time_calls(impls, 1)
        first = next((b for b in gpu_order if f"autonorm[{b}]" in impls), None)
        out = []
        for impl, t in timings.items():
            provider = ("autonorm" if impl == f"autonorm[{first}]" else impl if impl.startswith("autonorm")
                        else bench.provider_of(impl))
            nbytes = 2 * rows * spec.hidden * spec.x_itemsize if impl == "copy" else spec.bytes_moved(rows)
            out.append(_bench_row(ph, case, spec, rows, impl, provider, t, nbytes, copy_gbps, choices.get(impl)))
        return out, notes

    cases = bench_cases(ph.dry_run)
    for spec, rows in cases:
        case = bench.case_name(spec, rows)
        if case in ph.done:
            continue
        if not ph.can_start(3.0):
            return False
        t0 = ph.start(case)
        try:
            rows_out, notes = run(spec, rows, case, ["torch", "liger"], gpu_order, True)
            ph.finish(case, t0, status="ok", spec=spec.to_dict(), rows=rows, rows_out=rows_out, skipped=notes,
                      protocol=timer.describe(), copy_gbps=copy_gbps)
        except Exception as exc:
            ph.finish(case, t0, status="error", spec=spec.to_dict(), rows=rows, error=error_text(exc))
            if ph.context_lost():
                sys.exit(EXIT_CONTEXT_LOST)
    for spec, rows in cases:  # torch.compile (minutes of compiling in all) only with the time left
        case = bench.case_name(spec, rows) + " torch.compile"
        if case in ph.done or ph.dry_run:
            continue
        if not ph.can_start(20.0):
            return True  # torch.compile is extra: the phase's own cases are done
        t0 = ph.start(case)
        try:
            rows_out, notes = run(spec, rows, bench.case_name(spec, rows), ["torch.compile"], [], False)
            ph.finish(case, t0, status="ok", spec=spec.to_dict(), rows=rows, rows_out=rows_out, skipped=notes,
                      protocol={**timer.describe(), "interleaved": "timed after, apart from the others"},
                      copy_gbps=copy_gbps)
        except Exception as exc:
            ph.finish(case, t0, status="error", spec=spec.to_dict(), rows=rows, error=error_text(exc))
    return True


def phase_variants(ph: Phase) -> None:
    from autonorm import measure
    from autonorm.backends import get_backend

    if ph.device.type == "cuda":
        timer = measure.CudaTimer(ph.device, warmup_ms=10, rep_ms=50)
    else:
        timer = measure.CpuTimer(warmup_s=0.0, rep_s=0.0, min_reps=2, max_reps=2, max_sets=2)
    for case in variant_cases(ph.dry_run):
        if case.name in ph.done:
            continue
        if not ph.can_start(3.0):
            return False
        t0 = ph.start(case.name)
        backend = get_backend(case.backend)
        fields = {"backend": case.backend, "spec": case.spec.to_dict(), "rows": case.rows}
        reason = backend.unavailable_reason()
        if reason is None and not backend.supports_device(ph.device):
            reason = f"{case.backend} kernels do not run on {ph.device.type}"
        if reason is not None:
            ph.finish(case.name, t0, status="unavailable", error=reason, **fields)
            continue
        heuristic = backend.heuristic(case.spec)
        variant = heuristic.replace(**dict(case.changes))
        fields.update(heuristic=heuristic.short(), variant=variant.short())
        try:
            invalid = backend.config_cls.is_valid(case.spec, variant)
            if invalid:
                ph.finish(case.name, t0, status="invalid", error=invalid, **fields)
                continue
            kernels = [backend.compile(case.spec, c, ph.device) for c in (heuristic, variant)]
            check = check_case(ph, case.spec, kernels[1], min(case.rows, 2048))
            if check["status"] != "pass":
                ph.finish(case.name, t0, status="wrong result", errors=check["errors"], **fields)
                continue
            base, var = timer.interleaved(case.spec, kernels, case.rows)
            nbytes = case.spec.bytes_moved(case.rows)
            ph.finish(case.name, t0, status="ok", heuristic_us=base.median_us, variant_us=var.median_us,
                      speedup=round(base.median_us / var.median_us, 3),
                      variant_gbps=round(nbytes / var.median_us / 1e3, 1),
                      heuristic_gbps=round(nbytes / base.median_us / 1e3, 1), copy_gbps=ph.copy_gbps(),
                      protocol={**timer.describe(), "interleaved": True}, **fields)
        except Exception as exc:
            ph.finish(case.name, t0, status="error", error=error_text(exc), **fields)
            if ph.context_lost():
                sys.exit(EXIT_CONTEXT_LOST)
    return True


def phase_tune(ph: Phase) -> None:
    import tempfile

    import optuna

    from autonorm import measure, tune
    from autonorm.backends import get_backend
    from autonorm.spec import NormSpec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if ph.dry_run:  # the interpreter stands in for the GPU backends (the tuner never records it otherwise)
        backends = {name: get_backend(name) for name in ("triton", "torch")}
        timer = measure.CpuTimer(warmup_s=0.0, rep_s=0.0, min_reps=2, max_reps=2, max_sets=2)
        rows, trials, hidden = 4, 2, (32,)
    else:
        backends = tune.native_backends(ph.device, None)
        timer, rows, trials, hidden = measure.CudaTimer(ph.device, warmup_ms=10, rep_ms=50), 16384, 12, (4096, 8192)
    copy_gbps = ph.copy_gbps()
    protocol = {**timer.describe(), "verify": "reference check before timing", "finalists": 3,
                "finalists_retimed": "interleaved, with torch eager", "trials": trials}
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
                spec, rows, backends, timer, ph.device, storage=storage,
                name=tune.study_name(ph.ident["slug"], spec, rows, backends), n_trials=trials, time_budget=budget,
                seeds=[tune.Candidate(n, b.heuristic(spec)) for n, b in backends.items()],
                compile_workers=1 if ph.dry_run else 4, compile_baseline=False, copy_gbps=copy_gbps)
            try:
                result = runner.run()
            except Exception as exc:
                ph.finish(case, t0, status="error", spec=spec.to_dict(), rows=rows, error=error_text(exc))
                if ph.context_lost():
                    sys.exit(EXIT_CONTEXT_LOST)
                continue
            failed = dict(list(result.failed.items())[:20])
            ph.finish(case, t0, status="ok" if result.record else "no valid candidate", spec=spec.to_dict(),
                      rows=rows, record=result.record.to_json() if result.record else None, trials=result.trials,
                      measured=result.measured, failed_count=len(result.failed), failed=failed,
                      space_size=result.space_size, time_budget_s=round(budget, 1), protocol=protocol)
    return True


def phase_sweep(ph: Phase) -> None:
    from autonorm import measure
    from autonorm.backends import get_backend
    from autonorm.spec import NormSpec
    from autonorm.tune import Candidate

    spec = NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 32 if ph.dry_run else 4096)
    rows, check_rows = (4, 3) if ph.dry_run else (16384, 2048)  # checked on rows > programs (DW_PARTIALS)
    backend = get_backend("triton")
    space = backend.space(spec)
    size = len(space)
    random.Random(0).shuffle(space)
    if ph.dry_run:
        space = space[:3]
        timer = measure.CpuTimer(warmup_s=0.0, rep_s=0.0, min_reps=2, max_reps=2, max_sets=2)
    else:
        timer = measure.CudaTimer(ph.device, warmup_ms=10, rep_ms=50)
    fields = {"spec": spec.to_dict(), "spec_short": spec.short(), "rows": rows, "space": size,
              "protocol": timer.describe()}
    for config in space:
        key = Candidate("triton", config).key
        if key in ph.done:
            continue
        if not ph.can_start():
            return False
        t0 = ph.start(key)
        try:
            kernel = backend.compile(spec, config, ph.device)
            check = check_case(ph, spec, kernel, check_rows)
            if check["status"] != "pass":
                ph.finish(key, t0, candidate=key, status="wrong result", errors=check["errors"], **fields)
                continue
            t = timer.measure(spec, kernel, rows)
            ph.finish(key, t0, candidate=key, status="ok", median_us=t.median_us, p20_us=t.p20_us, p80_us=t.p80_us,
                      reps=t.reps, **fields)
        except Exception as exc:
            ph.finish(key, t0, candidate=key, status="error", error=error_text(exc), **fields)
            if ph.context_lost():
                sys.exit(EXIT_CONTEXT_LOST)
    return True


def run_phase_process(name: str, out: Path, until: float, dry_run: bool) -> int:
    ph = Phase(name, out, until, dry_run)
    if name.startswith("smoke-"):
        finished = phase_smoke(ph, name[len("smoke-"):])
    else:
        finished = {"env": phase_env, "bench": phase_bench, "variants": phase_variants, "tune": phase_tune,
                    "sweep": phase_sweep}[name](ph)
    return 0 if finished else EXIT_OUT_OF_SHARE


# ============================================================================================
# Import, here: the returned files into the database, the report and the search table
# ============================================================================================

def import_session(folder: Path, db_dir: Path, docs_dir: Path) -> list[Path]:
    """Write tuning_db/<slug>.json (validated), docs/benchmarks/<slug>.md + PNGs and the search table."""
    from autonorm.bench import report
    from autonorm.db import Record, TuningDB

    facts = env_facts(folder)
    if "identity" not in facts:
        raise SystemExit(f"gpu_session import: {folder}/session.jsonl has no device identity (did env run?)")
    ident, copy = facts["identity"], facts.get("copy bandwidth")
    device, versions, slug = ident["device"], ident["versions"], ident["device"]["slug"]
    copy_gbps = copy["copy_gbps"] if copy else None
    docs_dir.mkdir(parents=True, exist_ok=True)
    # The returned lines themselves, next to what is made of them: the evidence behind every number.
    raw = docs_dir / "sessions" / f"{slug}-{ident['date'][:10]}"
    raw.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FILES:
        if name.endswith(".jsonl") and (folder / name).exists():
            shutil.copyfile(folder / name, raw / name)
            written.append(raw / name)

    db_path = None
    tune = [t for t in read_lines(folder / "tune.jsonl") if t.get("record")]
    if tune:
        info = {k: device[k] for k in ("name", "slug", "kind", "compute_capability", "sm_count", "l2_bytes")}
        db = TuningDB({**info, "copy_gbps": round(copy_gbps, 2) if copy_gbps else None}, versions,
                      {**tune[0]["protocol"], "session": ident["date"]},
                      {r.key: r for r in (Record.from_json(t["record"]) for t in tune)})
        db = TuningDB.from_json(db.to_json(), f"{folder}/tune.jsonl")  # the schema and every config, checked
        db_path = db_dir / f"{slug}.json"
        db.save(db_path)
        written.append(db_path)

    cases = [c for c in read_lines(folder / "bench.jsonl") if c.get("rows_out")]
    bench_doc = {"schema_version": 1, "device": device, "versions": versions, "date": ident["date"],
                 "copy_bandwidth_gbps": copy_gbps,
                 "providers": list(dict.fromkeys(r["provider"] for c in cases for r in c["rows_out"])),
                 "protocol": cases[0]["protocol"] if cases else {},
                 "rows": [r for c in cases for r in c["rows_out"]],
                 "skipped": {c["case"]: c["skipped"] for c in cases if c.get("skipped")}}
    bench_path = docs_dir / f"{slug}-bench.json"
    bench_path.write_text(json.dumps(bench_doc, indent=1) + "\n")
    written.append(bench_path)
    written += [Path(p) for p in report.write_report([str(bench_path), ], str(docs_dir),
                                                     db_path=str(db_path) if db_path else None)]
    md = docs_dir / f"{slug}.md"
    md.write_text(("> **Dry run on CPU** (Triton interpreter, Numba simulator): these numbers prove the pipeline "
                   "only, never speed.\n\n" if ident.get("dry_run") else "")
                  + md.read_text() + "\n" + session_markdown(folder, ident))

    sweep = [s for s in read_lines(folder / "sweep.jsonl") if s.get("candidate")]
    if sweep:
        first = sweep[0]
        table_path = docs_dir / (f"search-efficiency-table-{slug}-{first['spec']['op']}-{first['spec']['direction']}-"
                                 f"{first['spec']['hidden']}.json")
        table_path.write_text(json.dumps({
            "spec": first["spec"], "rows": first["rows"], "device": device["name"], "device_slug": slug,
            "date": ident["date"], "versions": versions, "protocol": first["protocol"], "space": first["space"],
            "complete": len(sweep) == first["space"],
            "failed": {s["candidate"]: s.get("error") or s["status"] for s in sweep if s["status"] != "ok"},
            "table": {s["candidate"]: s["median_us"] for s in sweep if s["status"] == "ok"},
            "pruning": pruning_verdict(first["spec"], {s["candidate"]: s["median_us"] for s in sweep
                                                       if s["status"] == "ok"}, device)}, indent=1) + "\n")
        written.append(table_path)
        verdict = json.loads(table_path.read_text())["pruning"]
        print(f"gpu_session import: audit pruning on {verdict['arch']}: " + (
            verdict["error"] if "error" in verdict else
            f"{verdict['kept']} kept, {len(verdict['pruned'])} pruned; best kept {verdict['best_kept_us']} µs, "
            f"best pruned {verdict['best_pruned_us']} µs: "
            + ("pruning would have removed the best" if verdict["removes_best"] else "no pruned config was faster")))
    return written


def pruning_verdict(spec_dict: dict, table: dict, device: dict) -> dict:
    """Would the tuner's audit pruning have dropped the sweep's best config? The swept configs are
    cross-compiled here for the device's architecture (no GPU time) and split into kept and pruned."""
    from autonorm.audit import AuditToolError, Job, audit, check_backends
    from autonorm.backends import get_backend
    from autonorm.spec import NormSpec

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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["phase"]:
        p = argparse.ArgumentParser(prog="gpu_session.py phase")
        p.add_argument("name", choices=[n for n, _ in PHASES])
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--until", type=float, required=True, help="epoch seconds: start no case that ends later")
        p.add_argument("--dry-run", action="store_true")
        a = p.parse_args(argv[1:])
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cut: what is on disk is what finished
        return run_phase_process(a.name, a.out, a.until, a.dry_run)
    if argv[:1] == ["import"]:
        p = argparse.ArgumentParser(prog="gpu_session.py import",
                                    description="turn a session's files into the database, report and search table")
        p.add_argument("folder", type=Path)
        p.add_argument("--db-dir", type=Path, help="default: tuning_db")
        p.add_argument("--docs-dir", type=Path, help="default: docs/benchmarks")
        a = p.parse_args(argv[1:])
        if env_facts(a.folder).get("identity", {}).get("dry_run") and (a.db_dir is None or a.docs_dir is None):
            p.error("these files come from a dry run, which measures nothing: give --db-dir and --docs-dir outside "
                    "the repository's tuning_db/ and docs/")
        for path in import_session(a.folder, a.db_dir or Path("tuning_db"), a.docs_dir or Path("docs/benchmarks")):
            print(f"wrote {path}")
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-session")),
                   help="output folder (default: $OUT, else ./gpu-session)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="total seconds (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="CPU: Triton interpreter, Numba simulator, small sizes")
    p.add_argument("--phases", default=",".join(n for n, _ in PHASES), help="comma list (default: all, in order)")
    a = p.parse_args(argv)
    phases = [x for x in a.phases.split(",") if x]
    unknown = set(phases) - dict(PHASES).keys()
    if unknown:
        p.error(f"unknown phase(s) {sorted(unknown)}; phases: {', '.join(n for n, _ in PHASES)}")
    return Session(a.out, a.budget, a.dry_run, phases).run()


if __name__ == "__main__":
    sys.exit(main())
