"""Compilation off the timer's critical path: worker processes fill the backends' on-disk compile caches.

A compiled kernel cannot be pickled back to the timing process, so a worker compiles a
candidate and runs the reference check on it (which launches every variant at the row counts
the timing process's own check uses: each launch-time specialization gets compiled), and the
compilers write their results to disk. The timing process then compiles the same candidate
and finds each piece on disk. What persists, per backend:

- numba-cpu: Numba's `cache=True` writes `<cache dir>/numba_cpu/__pycache__/*.nbi` (index) and
  `*.nbc` (machine code), keyed by the generated source file (path, mtime, size) and the argument
  types, which the launcher keeps independent of the shape. Tested: the parent's dispatchers
  report cache hits and no misses.
- numba, Numba CUDA (GPU only): `cache=True` on the `@cuda.jit` kernel writes the same files, keyed by
  signature and compute capability.
- triton (GPU only): Triton's cache (`TRITON_CACHE_DIR`, default `~/.triton/cache`) holds the
  compiled cubin keyed by source, constexprs and argument specialization; the parent still runs
  Triton's Python-side binding, not its MLIR passes or ptxas. The worker also launches the kernel
  at the timer's specialization class when the check did not (`timed_rows_to_warm`).
- cupy (GPU only): CuPy's kernel cache (`CUPY_CACHE_DIR`, default `~/.cupy/kernel_cache`) holds
  NVRTC's cubin keyed by source, options, architecture and NVRTC version.
- the rendered sources (`<cache dir>/<backend>/<sha256>.py`, backends/base.py) are written by the
  worker and used as they are by the parent: a source file is never rewritten, so Numba's index
  stays valid.

The three GPU backends are warmed only on a CUDA device; under Triton's interpreter or Numba's
simulator nothing compiles to disk. Those, torch (nothing to compile) and any other backend
compile in a thread pool in the timing process, as before. Workers start with `spawn` (CUDA and
fork do not mix). On a GPU they compile while the timer runs; on a CPU they share the timer's
cores, so the timer waits until the batch is compiled (`prepare`).
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

import torch

from .. import settings
from .space import Candidate

log = logging.getLogger("autonorm.tune")

# The device type each backend's compile is warmed out of process for (the module docstring says why).
# By backend name (`autonorm.backends.BACKENDS`: "numba" is Numba CUDA).
WARMED_ON = {"numba-cpu": "cpu", "numba": "cuda", "triton": "cuda", "cupy": "cuda"}
# Backends whose compiled kernel does not depend on the row count: Numba CUDA specializes on the argument types
# (the row count is an int64 whatever its value), CuPy compiles the source as it is. One warm job per source and
# spec serves all of a spec's row counts (its later studies find the kernel compiled in the tuning process and
# check it there). Triton specializes integer arguments (`triton_int_class`): a job per specialization class of
# the row count (`triton_launches`), not per row count. Any other backend (numba-cpu): a job per row count.
SHAPE_FREE = frozenset({"numba", "cupy"})
ROW_CLASSED = frozenset({"triton"})
# The backward launcher sizes its persistent grid from the row count: the smallest row count of a class is looked
# for up to this many rows (a larger one is launched as the study's own).
SMALLEST_ROWS_SEARCHED = 4096


def triton_int_class(value: int) -> str:
    """What Triton's launcher specializes an integer kernel argument on (`native_specialize_impl`, Triton 3.x): 1 is a
    compile-time constant; any other value by its width (i32 or i64) and whether it is divisible by 16. Kernels
    launched with arguments of different classes are compiled separately; of the same class, compiled once."""
    if value == 1:
        return "1"
    return ("i32" if -2**31 <= value < 2**31 else "i64") + ("D" if value % 16 == 0 else "")


def triton_row_args(spec, config, rows: int) -> tuple:
    """The integer arguments the Triton launcher (templates/triton/*.py.j2, `_launch`) passes that depend on the
    row count: the forward's row count `M`; the backward's `M` and the rows per program of its persistent grid
    (at most DW_PARTIALS programs). Every other integer argument (the row strides) is the spec's."""
    if spec.direction == "fwd":
        return (rows,)
    programs = min(config.DW_PARTIALS, -(-rows // config.ROWS_PER_PROGRAM))
    per_program = -(-(-(-rows // programs)) // config.ROWS_PER_PROGRAM) * config.ROWS_PER_PROGRAM
    return (rows, per_program)


def triton_signature(spec, config, rows: int, strided: bool = False) -> tuple:
    """The specialization a Triton launch at `rows` compiles: row-strided inputs or not (their strides and the
    ROW_ALIGN constant differ), and the class of each row-dependent integer argument."""
    return strided, tuple(triton_int_class(v) for v in triton_row_args(spec, config, rows))


def triton_launches(spec, config, rows: int) -> tuple[tuple, set]:
    """(the timer's signature, every signature a study at `rows` compiles): the timer's launch at `rows`, and the
    reference check's (`verify.check_candidate`: at `verify_rows`, contiguous and row-strided, and at FEW_ROWS)."""
    from ..verify import FEW_ROWS, verify_rows

    checked = verify_rows(rows, spec.hidden)
    timed = triton_signature(spec, config, rows)
    return timed, {timed, triton_signature(spec, config, checked), triton_signature(spec, config, checked, True),
                   triton_signature(spec, config, FEW_ROWS)}


def timed_rows_to_warm(spec, config, rows: int) -> int | None:
    """The row count a worker launches a Triton kernel at so that the timer's specialization is compiled off its
    path: None when the reference check already launches one of its class (`rows` at or above VERIFY_MIN_ROWS,
    mostly), else the smallest row count of that class (16 for 256 rows: the inputs stay small)."""
    from ..verify import FEW_ROWS, verify_rows

    timed = triton_signature(spec, config, rows)
    checked = verify_rows(rows, spec.hidden)
    if timed in (triton_signature(spec, config, checked), triton_signature(spec, config, FEW_ROWS)):
        return None
    return next((m for m in range(1, min(rows, SMALLEST_ROWS_SEARCHED) + 1)
                 if triton_signature(spec, config, m) == timed), rows)


def _start_worker(cache_dir: str) -> None:
    # The parent's cache folder, whatever the environment the worker inherited: the caches must be shared.
    os.environ["AUTONORM_CACHE_DIR"] = cache_dir
    torch.set_num_threads(1)  # a worker's reference checks are small; the cores are the compilers'
    # A worker exits when the pool closes, with every job done: what it compiled is in the caches on disk. Its
    # interpreter's teardown (torch's, Numba's) frees nothing the machine needs back, and the tuning process waits
    # for it at the run's end, inside the budget: 1.9 s of the 4.1 s after a 176 s CPU run's last study. atexit
    # runs its handlers last-registered first, so this one, registered after the imports', ends the process first.
    atexit.register(_exit_now)


def _exit_now() -> None:
    for stream in (sys.stdout, sys.stderr):  # os._exit drops what is still buffered
        if stream is not None:
            stream.flush()
    os._exit(0)


def _warm(backend_name: str, spec, config, device: str, rows: int) -> tuple[float, str | None]:
    """Compile one candidate and check it (each variant launched, so each is compiled): its seconds and the
    reference check's verdict (None: correct), which the tuning process takes for this very config."""
    from ..backends import get_backend
    from ..verify import check_candidate

    started = time.perf_counter()
    backend = get_backend(backend_name)
    kernel = backend.compile(spec, config, device)
    reason = check_candidate(spec, kernel, rows, device)
    if backend_name in ROW_CLASSED:
        _launch_timed_class(spec, config, kernel, rows, device)
    return time.perf_counter() - started, reason


def _launch_timed_class(spec, config, kernel, rows: int, device: str) -> None:
    """Launch `kernel` once at a row count of the timer's specialization class, when the check did not: Triton
    compiles it now, in the worker, and the timer's first launch finds it in Triton's cache."""
    from ..verify import make_inputs

    launch_rows = timed_rows_to_warm(spec, config, rows)
    if launch_rows is None:
        return
    try:
        kernel(*make_inputs(spec, launch_rows, device, on_device=True).args(spec))
    except Exception as exc:  # the check's verdict stands; the timer's own launch meets the same error
        log.debug("launching a %s candidate at %d rows failed in a worker: %s", spec.short(), launch_rows, exc)


class CompilePool:
    """Compiles a study's candidates ahead of its timer; `compile` hands each one over, compiled.

    `compile_s` holds the seconds spent compiling per backend: the workers' (compile and check)
    plus the timing process's own compiles (cache loads, or the whole compile where not warmed). Numba
    and Triton compile at a kernel's first launch: compiled in threads, that is in the reference check,
    which is not counted here.

    Workers start with `spawn`, which imports the main script again: a script that tunes must keep its
    work under `if __name__ == "__main__":`, else its workers die at start and the tuning process
    compiles alone (with a warning).
    """

    def __init__(self, backends: dict, device, workers: int, *, processes: bool = True, context: str = "spawn"):
        self.backends, self.device, self.workers, self.context = backends, torch.device(device), workers, context
        self.processes = processes and workers > 0  # False: every backend compiles in threads
        self.compile_s: dict[str, float] = {}
        self._count_lock = threading.Lock()  # the thread pool's compiles count their seconds too
        self._threads = ThreadPoolExecutor(max_workers=max(1, workers))
        self._processes: ProcessPoolExecutor | None = None
        # Keyed by spec too: a grid's studies share the pool, and a candidate key names no spec.
        # Compile keys (`rank.compile_key`) of the sources the studies compiled so far: what a batch still has to
        # compile, for a study's estimate of it.
        self.compiled_sources: set[str] = set()
        # Seconds the timer waited for a batch that held a source new to the run (on a CPU it waits for the
        # workers before the batch, outside the candidates' seconds): a study charges a batch predicted to need
        # one their median, so it does not begin a compile its share cannot pay for. The run's, not a study's:
        # a study whose first sources an earlier study compiled has no wait of its own to go by.
        self.compile_waits: list[float] = []
        # Each study's seeds' batch: (whether it held a source new to the run, seconds the timer waited for it). A
        # batch of known sources still waits for the workers' reference checks (about 2 s at 1031 x 4096 on two
        # cores); what a CPU run charges every study for its seeds comes from both kinds (`run.seed_compile_charge`).
        self.seed_waits: list[tuple[bool, float]] = []
        # Compile keys of the sources the tuning process has launched. A source's first launch here loads what the
        # workers compiled from the compile cache, a cost of its compile that no later candidate sharing the source
        # pays (numba-cpu at 1024 x 1024 on two cores: its first candidate 0.35-0.6 s, the later ones 0.1-0.3 s).
        self.launched_sources: set[str] = set()
        self._jobs: dict[tuple, Future] = {}  # (backend, source sha256, spec, what it compiled for) -> the warm job
        self._warming: dict[tuple, tuple] = {}  # (backend, source sha256, spec, one of `_compiled_for`) -> its job
        self._counted: set[tuple] = set()  # the jobs whose seconds are in compile_s
        self._started_for: dict[tuple, tuple] = {}  # (spec, check rows, candidate key) -> the warm job started for it
        self._checks: dict[tuple, str | None] = {}  # warm job -> its reference check's verdict
        self._verdicts: dict[tuple, str | None] = {}  # (spec, check rows, candidate key) -> the tuning process's
        # own verdict (`remember`), on a GPU
        self._compiles: dict[tuple, Future] = {}  # (spec, candidate key) -> the thread pool's compile

    def note_batch(self, sources: set[str], waited_s: float, seeds: bool = False) -> None:
        """A batch of compile keys (`rank.compile_key`) is compiled, after the timer waited `waited_s` for it: a wait
        counts in `compile_waits` only when the batch held a source new to the run; a study's `seeds` batch's in
        `seed_waits` either way."""
        new = bool(sources - self.compiled_sources)
        if seeds:
            self.seed_waits.append((new, waited_s))
        if new:
            self.compile_waits.append(waited_s)
            self.compiled_sources |= sources

    def warmed(self, backend_name: str) -> bool:
        """Whether `backend_name`'s candidates compile in worker processes on this device."""
        return self.processes and WARMED_ON.get(backend_name) == self.device.type

    def prepare(self, spec, rows: int, cands: list[Candidate], meanwhile=None) -> None:
        """Start compiling `cands`, then call `meanwhile()` (work of the tuning process that is not timing). Returns
        at once on a GPU (workers compile while the timer runs), after the workers finished on a CPU (they would
        share the timer's cores)."""
        started = []
        for cand in cands:
            if self.warmed(cand.backend):
                started.append(self._warm_job(spec, rows, cand))
            elif (spec, cand.key) not in self._compiles:
                self._compiles[spec, cand.key] = self._threads.submit(self._compile_here, spec, cand)
        if meanwhile is not None:
            meanwhile()
        if self.device.type == "cpu":
            for job in started:
                self._wait(job)
            wait([self._compiles[spec, c.key] for c in cands if (spec, c.key) in self._compiles])

    def compile(self, spec, rows: int, cand: Candidate):
        """(kernel, None), or (None, why it failed to compile); waits for the candidate's compile."""
        future = self._compiles.pop((spec, cand.key), None)
        if future is not None:
            return future.result()
        if self.warmed(cand.backend):
            self._wait(self._warm_job(spec, rows, cand))
        return self._compile_here(spec, cand)

    def checked(self, spec, rows: int, cand: Candidate) -> tuple[bool, str | None]:
        """(True, the verdict) when a worker compiled exactly `cand` and ran the reference check on it at `rows`
        (the check the tuning process would run: the same call, on the same source from the same compiler
        cache), so the tuning process need not run it again, or (on a GPU) the tuning process checked it before
        (`remember`); at `rows` means, on a GPU, at the same rows checked (`_check_rows`). (False, None) otherwise:
        a config that shares another's source was warmed as that one, whose launch knobs differ."""
        at = (spec, self._check_rows(spec, rows), cand.key)
        key = self._started_for.get(at)
        if key is not None and key in self._checks:
            return True, self._checks[key]
        if at in self._verdicts:
            return True, self._verdicts[at]
        return False, None

    def remember(self, spec, rows: int, cand: Candidate, verdict: str | None) -> None:
        """Keep the tuning process's own check of `cand` at `rows`, for the spec's later studies (`checked`)."""
        if self.device.type == "cuda":
            self._verdicts[spec, self._check_rows(spec, rows), cand.key] = verdict

    def _check_rows(self, spec, rows: int):
        """What a candidate's reference check depends on besides it: on a GPU the rows it is verified at
        (`verify.verify_rows`: a row count below VERIFY_MIN_ROWS is checked at that minimum, the same launches
        and inputs), so a spec's studies at such row counts share each candidate's verdict; on the CPU, whose
        budgeted search is measured as it is, the study's row count."""
        if self.device.type != "cuda":
            return rows
        from ..verify import verify_rows

        return verify_rows(rows, spec.hidden)

    def executor(self) -> ProcessPoolExecutor | None:
        """The worker processes (started now), for other work of the tuning process to spread over them before
        the studies compile (`space.build_spaces`); None when candidates compile in threads."""
        return self._process_pool()

    def close(self) -> None:
        """Stop the workers; jobs not begun are dropped, the finished ones' seconds counted."""
        self._threads.shutdown(wait=True, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=True, cancel_futures=True)
        for key, job in self._jobs.items():
            if job.done() and not job.cancelled():
                self._wait(key)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- mechanics --
    def _compile_here(self, spec, cand: Candidate):
        started = time.perf_counter()
        try:
            return self.backends[cand.backend].compile(spec, cand.config, self.device), None
        except Exception as exc:  # a config that does not compile is a failed candidate
            return None, f"compile failed: {type(exc).__name__}: {exc}"
        finally:
            self._count(cand.backend, time.perf_counter() - started)

    def _count(self, backend_name: str, seconds: float) -> None:
        with self._count_lock:
            self.compile_s[backend_name] = self.compile_s.get(backend_name, 0.0) + seconds

    @staticmethod
    def _compiled_for(spec, rows: int, cand: Candidate) -> tuple:
        """(what the timer's kernel is compiled for, everything a study at `rows` compiles of `cand`): nothing of the
        row count for SHAPE_FREE's backends, Triton's specialization classes (`triton_launches`), else the row
        count."""
        if cand.backend in SHAPE_FREE:
            return None, {None}
        if cand.backend in ROW_CLASSED:
            return triton_launches(spec, cand.config, rows)
        return rows, {rows}

    def _warm_job(self, spec, rows: int, cand: Candidate) -> tuple | None:
        """The key of the worker job that warms `cand`'s source for the timer's launch at `rows` (configs that
        differ only in launch knobs share a source), started now when the spec's earlier jobs did not compile
        all a study at `rows` compiles (`_compiled_for`); None when none runs (the parent compiles alone)."""
        try:
            source = self.backends[cand.backend].render(spec, cand.config).sha256
            timed, needs = self._compiled_for(spec, rows, cand)
        except Exception:
            return None  # an invalid config: the parent's compile reports it
        base = (cand.backend, source, spec)
        if any((*base, need) not in self._warming for need in needs):
            key = (*base, frozenset(needs) if len(needs) > 1 else next(iter(needs)))
            pool = self._process_pool()
            if pool is None:
                return None
            try:
                self._jobs[key] = pool.submit(_warm, cand.backend, spec, cand.config, str(self.device), rows)
            except (BrokenProcessPool, RuntimeError) as exc:  # RuntimeError: submitted after a shutdown
                self._give_up(exc)
                return None
            for need in needs:
                self._warming.setdefault((*base, need), key)
            self._started_for.setdefault((spec, self._check_rows(spec, rows), cand.key), key)
        return self._warming[(*base, timed)]

    def _process_pool(self) -> ProcessPoolExecutor | None:
        if self._processes is None and self.processes:
            self._processes = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context(self.context),
                                                  initializer=_start_worker, initargs=(str(settings.cache_dir()),))
        return self._processes

    def _wait(self, key: tuple | None) -> None:
        """Wait for a warm job and count its seconds once; a worker that died leaves the parent to compile."""
        if key is None or key in self._counted:
            return
        self._counted.add(key)
        try:
            seconds, self._checks[key] = self._jobs[key].result()
            self._count(key[0], seconds)
        except BrokenProcessPool as exc:
            self._give_up(exc)
        except Exception as exc:  # the parent's own compile meets the same error and reports it
            log.debug("warming a %s candidate failed in a worker: %s", key[0], exc)

    def _give_up(self, exc: BaseException) -> None:
        """No more worker processes (one died, or they could not start): the parent compiles on its own."""
        log.warning("compile workers stopped (%s: %s); compiling in the tuning process", type(exc).__name__, exc)
        self.processes = False
        if self._processes is not None:
            self._processes.shutdown(wait=False, cancel_futures=True)
        self._processes = None
