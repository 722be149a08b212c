"""How autonorm measures, in the tuner and in `autonorm bench` alike: the one timing stack.

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
  inputs cached; each call timed as it runs in a torch program, right after a
  torch op that used torch's intra-op threads (`AfterTorchOp`).

Both also time several kernels interleaved (`interleaved`), which the tuner uses
to re-time its finalists so that drift (clocks, other tenants) hits all alike, and
time any callables that take an input-set index the same way (`time_calls`), which
is how `autonorm bench` times its providers (torch, Liger, ...) with this protocol.
The tuner takes any object with `measure`, `interleaved` and `describe`, which is
how tests run the search with a fake timer of known optimum; `ReplayTimer` answers
from a table of earlier timings (the search replays of scripts/search_efficiency.py).
A timer with `start` (both real ones) also hands out a `TimingRun`, a warmed-up kernel
sampled a few repetitions at a time, which the tuner races candidates with.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from .spec import NormSpec
from .verify import make_inputs


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


class TimingRun:
    """One kernel's samples under a timer's protocol, taken a few at a time: the tuner's race
    (autonorm/tune/race.py) looks at a candidate first and extends only the close ones.

    `cap` is the repetition count the timer's fixed protocol would take (sized by time in its
    warm-up), so a race never times a candidate longer than `measure` would.
    """

    def __init__(self, clock_one: Callable[[int], float], n_sets: int, cap: int):
        self._clock_one, self._n_sets, self.cap = clock_one, n_sets, cap
        self.samples: list[float] = []

    def extend(self, reps: int) -> Timing:
        """`reps` more samples (input sets rotating on from where the last ones stopped); all of them so far."""
        start = len(self.samples)
        self.samples += [self._clock_one((start + i) % self._n_sets) for i in range(reps)]
        return self.timing()

    def timing(self) -> Timing:
        return Timing.of(self.samples)


class Timer(Protocol):
    def measure(self, spec: NormSpec, kernel: Callable, rows: int) -> Timing: ...

    def interleaved(self, spec: NormSpec, kernels: Sequence[Callable], rows: int) -> list[Timing]: ...

    def describe(self) -> dict: ...


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


def _timed_rounds(calls: Sequence[Callable[[int], object]], n_sets: int, reps: int, clock, block: int) -> list:
    """Samples (µs) of each call, `reps` apiece, interleaved: rounds over the calls, in each round a call
    runs once untimed (a thread pool that slept while another library's ran wakes up), then up to
    `block` timed calls on rotating input sets."""
    samples = [[] for _ in calls]
    for start in range(0, reps, block):
        count = min(block, reps - start)
        for i, call in enumerate(calls):
            call((start + count) % n_sets)
            samples[i] += [clock(call, (start + j) % n_sets) for j in range(count)]
    return samples


# at::internal::GRAIN_SIZE: the fewest elements a torch CPU op hands to each of its intra-op threads.
TORCH_GRAIN = 32768


class AfterTorchOp:
    """A torch op that runs on every one of torch's intra-op threads, for the CPU timer to run before each call.

    In a torch program a norm kernel follows torch ops, and after each one torch's OpenMP threads keep spinning
    for a while (libgomp's default wait policy) on the cores another library's thread pool wants. A Numba kernel
    on two threads timed alone and timed after a torch op are different kernels: 1,980 against 3,080 µs (a
    4096-wide fp32 LayerNorm forward, 1024 rows, on two cores), while the serial launch and torch's own kernel
    do not change. The tuner timed candidates alone in its search and beside torch in its finish, and chose
    kernels that ran 1.5 times slower in a model than the torch one it passed over
    (docs/benchmarks/budget-vs-exhaustive.md). The op: an in-place add of TORCH_GRAIN elements per thread,
    split over all the threads, about 15 µs on two cores."""

    def __init__(self):
        self.buffer = torch.zeros(TORCH_GRAIN * max(torch.get_num_threads(), 1))

    def __call__(self) -> None:
        self.buffer.add_(1.0)


class CpuTimer:
    """perf_counter_ns timing with rotating input sets larger than the LLC.

    Repetitions are sized by time (`rep_s`, within `min_reps`..`max_reps`; equal
    bounds fix the count) after a warm-up of `warmup_s` and at least `warmup_calls`.
    `context` runs before every call, untimed (default `AfterTorchOp`).
    """

    def __init__(self, warmup_s: float = 0.05, rep_s: float = 0.25, min_reps: int = 5, max_reps: int = 200,
                 max_sets: int = 16, warmup_calls: int = 2, context: Callable[[], object] | None = None):
        self.warmup_s, self.rep_s, self.min_reps, self.max_reps, self.max_sets = (
            warmup_s, rep_s, min_reps, max_reps, max_sets)
        self.warmup_calls = warmup_calls
        self.context = context or AfterTorchOp()
        self._sets: dict = {}

    def describe(self) -> dict:
        return {"timer": "cpu perf_counter_ns", "statistic": "median (p20, p80)", "warmup_s": self.warmup_s,
                "rep_s": self.rep_s, "min_reps": self.min_reps, "max_reps": self.max_reps,
                "cache": f"rotating input sets > LLC ({llc_bytes()} B)", "inputs": "random normal",
                "torch_threads": torch.get_num_threads(), "context": "each call after a torch op on every torch thread"}

    def n_sets(self, spec: NormSpec, rows: int) -> int:
        """Input sets to rotate so that one rotation is twice the last-level cache."""
        return min(self.max_sets, max(2, -(-2 * llc_bytes() // _input_bytes(spec, rows))))

    def _inputs(self, spec: NormSpec, rows: int) -> list[tuple]:
        key = (spec, rows)
        if key not in self._sets:
            self._sets = {key: [make_inputs(spec, rows, "cpu", seed=i).args(spec)
                                for i in range(self.n_sets(spec, rows))]}
        return self._sets[key]

    def clock(self, call, set_index: int) -> float:
        """µs of one call, the context op run first, outside the timed window."""
        self.context()
        t0 = time.perf_counter_ns()
        call(set_index)
        return (time.perf_counter_ns() - t0) / 1e3

    def _reps(self, call, n_sets: int) -> int:
        # Every input set once first: some kernels (torch.compile) are slow on the first call per new tensor.
        for i in range(n_sets):
            self.context()
            call(i)
        t0 = time.perf_counter()
        calls = 0
        while calls < self.warmup_calls or time.perf_counter() - t0 < self.warmup_s:
            self.context()
            call(calls % n_sets)
            calls += 1
        per_call = (time.perf_counter() - t0) / max(calls, 1)
        return int(min(self.max_reps, max(self.min_reps, self.rep_s / max(per_call, 1e-9))))

    def start(self, spec, kernel, rows) -> TimingRun:
        """A warmed-up kernel whose samples are taken on demand (`TimingRun.extend`)."""
        sets = self._inputs(spec, rows)

        def call(i):
            return kernel(*sets[i])
        reps = self._reps(call, len(sets))
        return TimingRun(lambda i: self.clock(call, i), len(sets), reps)

    def measure(self, spec, kernel, rows) -> Timing:
        run = self.start(spec, kernel, rows)
        return run.extend(run.cap)

    def time_calls(self, calls: dict[str, Callable[[int], object]], n_sets: int) -> dict[str, Timing]:
        """Time callables that take an input-set index (`autonorm bench`'s providers), interleaved."""
        reps = min(self._reps(c, n_sets) for c in calls.values())
        samples = _timed_rounds(list(calls.values()), n_sets, reps, self.clock, block=3)
        return {name: Timing.of(s) for name, s in zip(calls, samples)}

    def interleaved(self, spec, kernels, rows) -> list[Timing]:
        sets = self._inputs(spec, rows)
        calls = {str(i): (lambda j, k=k: k(*sets[j])) for i, k in enumerate(kernels)}
        return list(self.time_calls(calls, len(sets)).values())


# CudaTimer's warm-up and repetition windows by name (`StudyOptions.windows`). "full": every timing's default.
# "short": `autonorm tune --budget`'s. A short window is enough there because the tuner races (tune/race.py):
# a candidate's first look is a few repetitions and a close contender's repetitions are doubled until its
# p20-p80 interval separates from the best one's, up to `max_reps`; 200 flushed samples give a median and
# quantiles that one stray sample does not move, and the GPU's clocks are already up from the candidates
# before (the warm-up only has to reach the kernel's steady state, not the device's).
CUDA_WINDOWS = {"full": {"warmup_ms": 25, "rep_ms": 100, "min_reps": 10, "max_reps": 1000},
                "short": {"warmup_ms": 3, "rep_ms": 15, "min_reps": 20, "max_reps": 200}}


class CudaTimer:
    """CUDA-event timing, L2 flushed before every repetition (Triton do_bench style)."""

    def __init__(self, device="cuda", warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 10,
                 max_reps: int = 1000):  # CUDA_WINDOWS["full"]
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

    def n_sets(self, spec: NormSpec, rows: int) -> int:
        return 1  # the L2 is flushed before every call instead

    def _args(self, spec, rows):
        key = (spec, rows)
        if key not in self._inputs:
            self._inputs = {}  # the previous spec's tensors go before the next ones are drawn
            self._inputs[key] = make_inputs(spec, rows, self.device, on_device=True).args(spec)
        return self._inputs[key]

    def clock(self, call, set_index: int) -> float:
        """µs of one call between CUDA events; its `prepare` (untimed work, e.g. restoring an input the
        call overwrites) and the L2 flush run first."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        prepare = getattr(call, "prepare", None)
        if prepare is not None:
            prepare()
        self.flush.zero_()
        start.record()
        call(set_index)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3

    def _reps(self, call) -> int:
        torch.cuda.synchronize(self.device)
        est = sorted(self.clock(call, 0) for _ in range(5))[2] / 1e3  # ms, flush excluded
        warm = int(max(1, self.warmup_ms / max(est, 1e-3)))
        for _ in range(min(warm, self.max_reps)):
            call(0)
        return int(min(self.max_reps, max(self.min_reps, self.rep_ms / max(est, 1e-3))))

    def _call(self, kernel, args):
        def call(_set_index):
            return kernel(*args)
        if hasattr(kernel, "prepare"):
            call.prepare = kernel.prepare
        return call

    def start(self, spec, kernel, rows) -> TimingRun:
        """A warmed-up kernel whose samples are taken on demand (`TimingRun.extend`), each after the flush."""
        call = self._call(kernel, self._args(spec, rows))
        return TimingRun(lambda i: self.clock(call, 0), 1, self._reps(call))

    def measure(self, spec, kernel, rows) -> Timing:
        run = self.start(spec, kernel, rows)
        return run.extend(run.cap)

    def time_calls(self, calls: dict[str, Callable[[int], object]], n_sets: int) -> dict[str, Timing]:
        """Time callables that take an input-set index (each gets set 0: the flush replaces rotation),
        interleaved one call at a time."""
        reps = min(self._reps(c) for c in calls.values())
        samples = _timed_rounds(list(calls.values()), 1, reps, self.clock, block=1)
        return {name: Timing.of(s) for name, s in zip(calls, samples)}

    def interleaved(self, spec, kernels, rows) -> list[Timing]:
        args = self._args(spec, rows)
        calls = {str(i): self._call(k, args) for i, k in enumerate(kernels)}
        return list(self.time_calls(calls, 1).values())


def timer_for(device, windows: str = "full") -> Timer:
    """The device's timer with the named windows (`CUDA_WINDOWS`). The CPU timer keeps its own windows under
    either name: its repetitions are milliseconds of a loaded, shared CPU, whose noise racing cannot
    separate in fewer samples (the budgeted CPU search is measured with them, docs/benchmarks/planner.md)."""
    if windows not in CUDA_WINDOWS:
        raise ValueError(f"timer windows {windows!r}: must be one of {', '.join(CUDA_WINDOWS)}")
    device = torch.device(device)
    return CudaTimer(device, **CUDA_WINDOWS[windows]) if device.type == "cuda" else CpuTimer()


# The CPU copy probe's buffers: big enough to leave the last-level cache (4x it), never more than this
# each nor more than PROBE_MEMORY_SHARE of the memory left (a tuning worker in a small container must not be
# killed by its own probe before tuning begins), and sampled for at most PROBE_TIME_S.
PROBE_MAX_BYTES = 512 << 20
PROBE_MEMORY_SHARE = 16
PROBE_TIME_S = 3.0


def available_memory() -> int | None:
    """Bytes of memory this process may still take: the smaller of /proc/meminfo's MemAvailable and the
    cgroup's limit less its use (a container), None when neither is readable."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            found.append(max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def probe_bytes(llc: int, available: int | None) -> int:
    """Size of each of the CPU copy probe's two buffers (see PROBE_MAX_BYTES)."""
    nbytes = min(max(64 << 20, 4 * llc), PROBE_MAX_BYTES)
    if available is not None:
        nbytes = min(nbytes, available // PROBE_MEMORY_SHARE)
    return max(nbytes, 1 << 20)


def copy_bandwidth(device="cpu", nbytes: int | None = None, reps: int = 20, max_s: float = PROBE_TIME_S) -> float:
    """GB/s of a large tensor copy on `device`, counting read + write (the roofline every report divides by);
    at least 5 samples, then no more than `reps` and none started after `max_s` seconds."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (256 << 20) if device.type == "cuda" else probe_bytes(llc_bytes(), available_memory())
    src = torch.ones(nbytes // 4, device=device)  # the values do not matter, and randn of 512 MiB takes seconds
    dst = torch.empty_like(src)
    samples = []
    t_start = time.perf_counter()
    for i in range(reps + 3):
        if i >= 8 and time.perf_counter() - t_start > max_s:
            break
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
