"""What every phase process shares: the device, the deadline, its output file and finished cases, the
timer, and the on-device correctness check of one kernel (through autonorm.verify)."""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from .. import measure, verify
from ..device import identity
from .records import CASE_MARK, EXIT_CONTEXT_LOST, append_line, env_facts, error_text, now_iso, phase_file, read_lines


class Phase:
    def __init__(self, name: str, out: Path, until: float, dry_run: bool):
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

    def fail(self, case: str, started: float, exc: BaseException, **fields) -> None:
        """Record a case that raised; after a sticky CUDA error the process ends, and the session restarts
        the phase in a fresh one that skips what is finished."""
        self.finish(case, started, status="error", error=error_text(exc), **fields)
        self.exit_if_context_lost(case)

    def exit_if_context_lost(self, case: str) -> None:
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.synchronize(self.device)
            torch.ones(1, device=self.device).add_(1).item()
        except Exception:
            print(f"{self.name}: the CUDA context is lost after {case}: a fresh process goes on", flush=True)
            sys.exit(EXIT_CONTEXT_LOST)

    def unavailable(self, backend) -> str | None:
        """Why `backend`'s kernels cannot run here, or None."""
        reason = backend.unavailable_reason()
        if reason is None and not backend.supports_device(self.device):
            reason = f"{backend.name} kernels do not run on {self.device.type} here"
        return reason

    def timer(self):
        """The tuner's timer on the device; on the CPU, two quick repetitions (the dry run proves the pipeline)."""
        if self.device.type == "cuda":
            return measure.CudaTimer(self.device, warmup_ms=10, rep_ms=50)
        return measure.CpuTimer(warmup_s=0.0, rep_s=0.0, min_reps=2, max_reps=2, max_sets=2)

    def copy_gbps(self) -> float | None:
        copy = env_facts(self.out).get("copy bandwidth")
        return copy["copy_gbps"] if copy else None

    def check(self, spec, kernel, rows: int, strided: bool = False, seed: int = 0) -> dict:
        """Run `kernel` once on device-drawn inputs and compare on the device: {'status', 'errors', 'tolerance'}."""
        inputs = verify.make_inputs(spec, rows, self.device, seed=seed, strided=strided, on_device=True)
        outputs = kernel(*inputs.args(spec))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        result = device_errors(spec, inputs, outputs, 1 << (7 if self.dry_run else 22))
        return {"status": "pass" if result.ok else "fail", "errors": result.errors, "tolerance": result.tolerance}


_PER_ROW = ("x", "residual", "dy", "dh", "mean", "rstd")  # the inputs with one row (or value) per row


def _rows(inputs: verify.Inputs, rows: slice) -> verify.Inputs:
    """The inputs of some rows (weight and bias belong to every row)."""
    return dataclasses.replace(inputs, **{f: getattr(inputs, f)[rows] for f in _PER_ROW
                                          if getattr(inputs, f) is not None})


def _keep_worst(worst: verify.CheckResult, result: verify.CheckResult) -> None:
    worst.tolerance = result.tolerance
    for name, error in result.errors.items():
        worst.errors[name] = max(worst.errors.get(name, 0.0), error)


def device_errors(spec, inputs: verify.Inputs, outputs: tuple, chunk_elements: int) -> verify.CheckResult:
    """verify.compare of every output against the fp64 reference, on the device, by row chunks.

    A chunk's fp64 reference is all that is ever held (a 2^31-element case would need 16 GiB per
    tensor at once), and the worst chunk counts, so a bug in a few rows is not averaged away. On
    tensors past 2^28 elements only the first, the last and the chunk at element 2^31 are compared
    (their comparison copies fp64 to the host); dweight/dbias always sum the reference of every row.
    """
    rows, n = inputs.x.shape
    step = max(1, chunk_elements // n)
    starts = list(range(0, rows, step))
    compared = set(starts)
    huge = rows * n > 1 << 28
    if huge:
        compared = {starts[0], starts[-1], ((1 << 31) // n) // step * step} & compared
    worst = verify.CheckResult()
    column_sums: dict = {}  # dweight, dbias: the reference summed over every row's chunk
    for lo in starts:
        chunk = slice(lo, lo + step)
        if spec.direction == "fwd" and lo not in compared:
            continue
        chunk_inputs = _rows(inputs, chunk)
        expected = verify.expected_outputs(spec, chunk_inputs)
        if spec.direction == "bwd":
            for name in ("dweight", "dbias"):
                part, total = expected.pop(name), column_sums.get(name)
                column_sums[name] = part if total is None or part is None else total + part
            if lo not in compared:
                continue
        # Only dx of a backward's outputs has rows; its dweight and dbias are compared once, below.
        per_row = tuple(None if t is None else t[chunk] for t in outputs) if spec.direction == "fwd" \
            else (outputs[0][chunk], *outputs[1:])
        _keep_worst(worst, verify.compare(spec, chunk_inputs, per_row, expected))
    if spec.direction == "bwd":
        # verify may size a sum's error by the terms it adds up (their fp64 copies of every row, computed from
        # the inputs passed): past 2^28 elements the first chunk's rows stand in, whose terms are fewer, so
        # the check is no looser and the fp64 copies stay a chunk's.
        sum_inputs = _rows(inputs, slice(0, step)) if huge else inputs
        _keep_worst(worst, verify.compare(spec, sum_inputs, outputs, column_sums))
    return worst
