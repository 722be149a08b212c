"""How the tuner measures: injectable timers, the copy-bandwidth probe, verify-before-time.

A timer turns a compiled kernel into a `Timing` (median, p20, p80 in µs). Two
real protocols:

- `CudaTimer`: CUDA events around each repetition; warm-up and repetition counts
  sized by time (like Triton's `do_bench`); the L2 is flushed before every
  repetition by zeroing a buffer twice the size of the device's real L2 (not a
  fixed 256 MB: triton#3943); inputs are random-normal, drawn on the device
  by a CUDA generator. A kernel may carry `prepare()`: untimed work before each
  repetition, before the flush (restoring an input the kernel overwrites).
- `CpuTimer`: `perf_counter_ns` per call; warm-up by time; rotating input sets
  whose total size exceeds the last-level cache, so no repetition finds its
  inputs cached.

Both also time several kernels interleaved (`interleaved`), which the tuner uses
to re-time its finalists so that drift (clocks, other tenants) hits all alike.
The tuner takes any object with `measure`, `interleaved` and `describe`, which is
how tests run the search with a fake timer of known optimum.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from .spec import NormSpec
from .verify import check_candidate, make_inputs


@dataclass(frozen=True)
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    reps: int

    @classmethod
    def of(cls, samples_us: Sequence[float]) -> "Timing":
        s = sorted(samples_us)
        q = statistics.quantiles(s, n=5, method="inclusive") if len(s) > 1 else [s[0]] * 4
        return cls(statistics.median(s), q[0], q[3], len(s))

    def to_json(self) -> dict:
        return {"median_us": self.median_us, "p20_us": self.p20_us, "p80_us": self.p80_us}


class Timer(Protocol):
    def measure(self, spec: NormSpec, kernel: Callable, rows: int) -> Timing: ...

    def interleaved(self, spec: NormSpec, kernels: Sequence[Callable], rows: int) -> list[Timing]: ...

    def describe(self) -> dict: ...


def verify(spec: NormSpec, kernel: Callable, rows: int, device, *, full: bool = True) -> str | None:
    """None when `kernel`, to be timed at `rows` rows, matches the reference, else why not (never raises).

    The cases it checks (row counts, strides, eps, variants, poisoned outputs) are in
    `verify.check_candidate`."""
    try:
        return check_candidate(spec, kernel, rows, device, full=full)
    except Exception as exc:  # a candidate that crashes is a failed candidate, not a tuner crash
        return f"{type(exc).__name__}: {exc}"


def llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), or 64 MiB when unknown (errs on the big side: more input sets)."""
    best = 0
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 64 << 20


def _input_bytes(spec: NormSpec, rows: int) -> int:
    return max(spec.bytes_moved(rows), 1)


class CpuTimer:
    """perf_counter_ns timing with rotating input sets larger than the LLC."""

    def __init__(self, warmup_s: float = 0.05, rep_s: float = 0.25, min_reps: int = 5, max_reps: int = 200,
                 max_sets: int = 16):
        self.warmup_s, self.rep_s, self.min_reps, self.max_reps, self.max_sets = (
            warmup_s, rep_s, min_reps, max_reps, max_sets)
        self._sets: dict = {}

    def describe(self) -> dict:
        return {"timer": "cpu perf_counter_ns", "statistic": "median (p20, p80)", "warmup_s": self.warmup_s,
                "rep_s": self.rep_s, "min_reps": self.min_reps, "max_reps": self.max_reps,
                "cache": f"rotating input sets > LLC ({llc_bytes()} B)", "inputs": "random normal"}

    def _inputs(self, spec: NormSpec, rows: int) -> list[tuple]:
        key = (spec, rows)
        if key not in self._sets:
            n_sets = min(self.max_sets, max(2, -(-2 * llc_bytes() // _input_bytes(spec, rows))))
            self._sets = {key: [make_inputs(spec, rows, "cpu", seed=i).args(spec) for i in range(n_sets)]}
        return self._sets[key]

    def _run(self, kernel, sets, count, start):
        samples = []
        for i in range(count):
            args = sets[(start + i) % len(sets)]
            t0 = time.perf_counter_ns()
            kernel(*args)
            samples.append((time.perf_counter_ns() - t0) / 1e3)
        return samples

    def _reps(self, kernel, sets) -> int:
        # Every input set once first: some kernels (torch.compile) are slow on the first call per new tensor.
        for args in sets:
            kernel(*args)
        t0 = time.perf_counter()
        calls = 0
        while calls < 2 or time.perf_counter() - t0 < self.warmup_s:
            kernel(*sets[calls % len(sets)])
            calls += 1
        per_call = (time.perf_counter() - t0) / calls
        return int(min(self.max_reps, max(self.min_reps, self.rep_s / max(per_call, 1e-9))))

    def measure(self, spec, kernel, rows) -> Timing:
        sets = self._inputs(spec, rows)
        return Timing.of(self._run(kernel, sets, self._reps(kernel, sets), 0))

    def interleaved(self, spec, kernels, rows) -> list[Timing]:
        """Rounds over the kernels; in each round a kernel runs once untimed, then `block` timed calls.

        The untimed call lets a kernel's thread pool wake up after another library's
        pool ran (OpenMP threads of torch and Numba's workers compete for the cores).
        """
        sets = self._inputs(spec, rows)
        block = 3
        reps = min(self._reps(k, sets) for k in kernels)
        samples = [[] for _ in kernels]
        for r in range(max(1, reps // block)):
            for i, kernel in enumerate(kernels):
                kernel(*sets[(r * block + block) % len(sets)])
                samples[i] += self._run(kernel, sets, block, r * block)
        return [Timing.of(s) for s in samples]


class CudaTimer:
    """CUDA-event timing, L2 flushed before every repetition (Triton do_bench style)."""

    def __init__(self, device="cuda", warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 10,
                 max_reps: int = 1000):
        from .device import identity

        self.device = torch.device(device)
        self.warmup_ms, self.rep_ms, self.min_reps, self.max_reps = warmup_ms, rep_ms, min_reps, max_reps
        l2 = identity(self.device)["l2_bytes"] or (64 << 20)
        # Twice the L2 so that no line of the kernel's inputs survives the flush.
        self.flush = torch.empty(2 * l2 // 4, dtype=torch.int32, device=self.device)
        self._inputs: dict = {}

    def describe(self) -> dict:
        return {"timer": "cuda events", "statistic": "median (p20, p80)", "warmup_ms": self.warmup_ms,
                "rep_ms": self.rep_ms, "min_reps": self.min_reps, "max_reps": self.max_reps,
                "l2_flush_bytes": self.flush.numel() * 4, "inputs": "random normal, drawn on the device"}

    def _args(self, spec, rows):
        key = (spec, rows)
        if key not in self._inputs:
            self._inputs = {}  # the previous spec's tensors go before the next ones are drawn
            self._inputs[key] = make_inputs(spec, rows, self.device, on_device=True).args(spec)
        return self._inputs[key]

    def _one(self, kernel, args) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        prepare = getattr(kernel, "prepare", None)
        if prepare is not None:
            prepare()
        self.flush.zero_()
        start.record()
        kernel(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3

    def _reps(self, kernel, args) -> int:
        torch.cuda.synchronize(self.device)
        est = sorted(self._one(kernel, args) for _ in range(5))[2] / 1e3  # ms, flush excluded
        warm = int(max(1, self.warmup_ms / max(est, 1e-3)))
        for _ in range(min(warm, self.max_reps)):
            kernel(*args)
        return int(min(self.max_reps, max(self.min_reps, self.rep_ms / max(est, 1e-3))))

    def measure(self, spec, kernel, rows) -> Timing:
        args = self._args(spec, rows)
        return Timing.of([self._one(kernel, args) for _ in range(self._reps(kernel, args))])

    def interleaved(self, spec, kernels, rows) -> list[Timing]:
        args = self._args(spec, rows)
        reps = min(self._reps(k, args) for k in kernels)
        samples = [[] for _ in kernels]
        for _ in range(reps):
            for i, kernel in enumerate(kernels):
                samples[i].append(self._one(kernel, args))
        return [Timing.of(s) for s in samples]


def timer_for(device) -> Timer:
    device = torch.device(device)
    return CudaTimer(device) if device.type == "cuda" else CpuTimer()


def copy_bandwidth(device="cpu", nbytes: int | None = None, reps: int = 20) -> float:
    """GB/s of a large tensor copy on `device`, counting read + write (the roofline every report divides by)."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (256 << 20) if device.type == "cuda" else max(64 << 20, 4 * llc_bytes())
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    samples = []
    for i in range(reps + 3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter_ns()
            dst.copy_(src)
            seconds = (time.perf_counter_ns() - t0) / 1e9
        if i >= 3:  # the first copies fault pages in
            samples.append(seconds)
    return 2 * nbytes / statistics.median(samples) / 1e9


def gbps(spec: NormSpec, rows: int, median_us: float) -> float:
    return spec.bytes_moved(rows) / (median_us * 1e-6) / 1e9 if median_us > 0 else 0.0
