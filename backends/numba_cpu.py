"""numba-cpu: fused RMSNorm / LayerNorm kernels for any CPU, via `numba.njit(parallel=True)`.

Rendered from templates/numba_cpu. Kernels work on the torch tensors' own memory:
the launcher passes each operand's address (`data_ptr()`) and row stride, the
kernel rebuilds a 1-D array spanning its rows (`numba.carray`, fp16/bf16 as
uint16 bits) and converts bit patterns to fp32 per element. Addresses instead of
numpy views because building a view costs more than a small norm (scripts/overhead.py).
Each source holds a parallel and a serial variant of the kernel; calls on fewer
than SERIAL_BELOW elements take the serial one (no thread-pool wake-up). The parallel
variant runs on torch's own OpenMP threads where torch runs on GNU OpenMP (`_TorchTeam`),
else on Numba's thread pool (`_Pool`).
Generated source is written once to `<cache_dir>/numba_cpu/<sha256>.py` and imported from there, so Numba's
`cache=True` keeps the machine code in that folder's `__pycache__` and a second
process loads it instead of compiling again.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
import threading
from dataclasses import dataclass
from typing import ClassVar

import torch

from autonorm.config import Config, knob
from autonorm.spec import NormSpec

from .base import Backend, backward_outputs, forward_outputs, import_generated, new_empty_like_rows


def _max_threads() -> int:
    try:
        import numba
        return int(numba.config.NUMBA_NUM_THREADS)
    except ImportError:
        return os.cpu_count() or 1


# The rows_per_task of a launch on one thread: the fewest tasks. A forward's tasks only group rows run in order
# (with a residual each allocates a row buffer), so this one stands for all; a backward's tasks each zero, fill
# and sum one fp32 dW (dB) partial row, so fewer is less traffic (one thread, after a torch op, 2-core Zen 3:
# 256 or 128 best in all 8 backward specs at 1024 rows, 32 1.4 to 6.6% slower; docs/benchmarks/cpu-numba.md).
SERIAL_ROWS_PER_TASK = 256


@dataclass(frozen=True)
class NumbaCpuConfig(Config):
    """Launch knobs of the numba-cpu kernels (rows_per_task and threads are runtime, not in the source)."""

    backend: ClassVar[str] = "numba-cpu"

    rows_per_task: int = knob((1, 2, 4, 8, 16, 32, 64, 128, 256),
                              doc="rows per parallel task (also the dW/dB partial granularity)")
    vector_width: int = knob((1, 4, 8, 16), doc="lane accumulators of the row reductions (inner blocking)")
    threads: int = knob((0, 1, 2, 4, 8, 16, 32, 64),
                        doc="threads for the call (of torch's OpenMP team, else of Numba's pool); 0 = the "
                            "caller's setting (torch.get_num_threads(), else Numba's)")
    fastmath: bool = knob((False, True), doc="reassoc/contract/nsz (never nnan/ninf/arcp)")

    @classmethod
    def is_valid(cls, spec: NormSpec, config: "NumbaCpuConfig") -> str | None:
        if config.threads > _max_threads():
            return f"threads {config.threads} exceeds this machine's Numba thread pool ({_max_threads()})"
        # Two configs that launch the same work are one candidate timed twice: a search that keeps both spends
        # its time on the noise between them. (With a single-thread pool, threads=0 is the parallel variant
        # on one thread and threads=1 the serial one: not the same launch.)
        if 1 < config.threads == _max_threads():
            return (f"threads {config.threads} is this machine's whole Numba thread pool: the launch threads=0 "
                    "makes (the caller's setting, all of the pool unless lowered)")
        if spec.direction == "fwd" and config.threads == 1 and config.rows_per_task != SERIAL_ROWS_PER_TASK:
            return (f"a forward on one thread runs its rows in order whatever rows_per_task is: "
                    f"rows_per_task={SERIAL_ROWS_PER_TASK} stands for all of them")
        if spec.direction == "bwd" and spec.weight and config.rows_per_task < 4:
            # one fp32 dW partial row per task: fewer than 4 rows per task costs more partial
            # traffic than the row itself for bf16 inputs
            return "backward with a weight needs rows_per_task >= 4 (dW partials per task)"
        return None

    @classmethod
    def heuristic(cls, spec: NormSpec) -> "NumbaCpuConfig":
        # fastmath with vector_width=1: reassociation lets LLVM vectorize the plain reduction loops, which
        # beat hand-unrolled lanes and strict order alike (docs/benchmarks/cpu-numba.md, "Constants").
        # Tasks of ~256 KiB of input: each is a call of the serial kernel on a thread of torch's team. At 1024
        # rows on 2 cores this size was within 5% of the best rows_per_task in 15 of the 16 specs of the budget
        # evidence's grid (at most 1.09), where ~32 KiB (what suited Numba's pool) left the forwards 1.06 to 1.28
        # times the best (docs/benchmarks/cpu-numba.md, `scripts/rows_per_task.py`).
        row_bytes = spec.hidden * spec.x_itemsize
        rpt = 1
        while rpt < 256 and rpt * row_bytes < 256 * 1024:
            rpt *= 2
        if spec.direction == "bwd" and spec.weight:
            # one fp32 dW (dB) partial row per task, zeroed, updated per row and summed at the end:
            # ~1/rpt extra traffic per input row, so at least 32 rows a task (no slower than more in
            # docs/benchmarks/cpu-numba.md, "Constants"), which still keeps >= 2 tasks per thread from 128 rows.
            rpt = max(rpt, 32)
        # Nothing rendered depends on N, so one compiled kernel serves every hidden size.
        return cls(rows_per_task=rpt, vector_width=1, threads=0, fastmath=True)


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _row_stride(t: torch.Tensor, m: int, n: int) -> int:
    return t.stride(0) if m > 1 else n


# Below this many elements (rows * N) a call runs `kernel_serial`: waking Numba's thread
# pool costs more than splitting the rows saves. The serial and parallel variants cross over at
# about 32K elements (docs/benchmarks/cpu-numba.md, "Constants"); the backward, with twice the bytes
# per element, uses half.
SERIAL_BELOW = 1 << 15


class _ThreadCount:
    """Set Numba's thread count for one call and restore it afterwards (it is per calling thread).

    Only for configs with threads > 0: the calls cost ~3.5 us together, and setting the
    count inside the kernel instead makes Numba refuse to cache it (dynamic globals).
    """

    def __init__(self, threads: int):
        self.threads = min(threads, _max_threads())

    def __enter__(self):
        import numba
        self.saved = numba.get_num_threads()
        numba.set_num_threads(self.threads)

    def __exit__(self, *exc):
        import numba
        numba.set_num_threads(self.saved)


def _with_threads(fn, threads: int):
    """`fn` run with `threads` Numba threads (threads 0: as is, the caller's setting)."""
    if threads == 0:
        return fn

    def call(*args):
        with _ThreadCount(threads):
            return fn(*args)
    return call


def _tbb_pool_loads() -> bool:
    """Whether Numba's TBB pool imports, finding a TBB that pip installed into this environment.

    Numba loads TBB by name (`libtbb.so.12`); PyPI's `tbb` wheel puts that library in `<prefix>/lib`,
    which the loader does not search in a virtual environment, so the import fails there. Loading
    the library by its full path first lets the name resolve to it. Nothing else changes: TBB is
    fork-safe and thread-safe (unlike GNU OpenMP), and `LD_LIBRARY_PATH` is left alone.
    """
    def loads():
        try:
            import numba.np.ufunc.tbbpool  # noqa: F401  (fails without the TBB library)

            # Numba refuses a TBB older than 2021.6 only when its pool starts, where a layer chosen
            # as "tbb" would then fail instead of falling back: check the version here.
            from numba.np.ufunc import parallel
            getattr(parallel, "_check_tbb_version_compatible", lambda: None)()
            return True
        except ImportError:
            return False

    if loads():
        return True
    lib = os.path.join(sys.prefix, "lib", "libtbb.so.12")
    if not os.path.isfile(lib):
        return False
    try:
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return loads()


class _Pool:
    """Numba's thread pool (its threading layer), where the parallel kernels run when torch has no GNU OpenMP
    team (`_TorchTeam`): which layer runs, and what this process may do with it.

    - Layer: TBB when it loads, else `workqueue`, unless the user chose one (NUMBA_THREADING_LAYER)
      or the pool already started. Numba's own default would take GNU OpenMP before workqueue, and
      a process whose GNU OpenMP pool ran cannot fork safely: a forked child (a DataLoader worker)
      is aborted by Numba ("fork() called from a process already using GNU OpenMP") and torch's own
      parallel ops hang in it.
    - `workqueue` aborts the process on concurrent launches from two threads: under it a launch
      that finds another one running takes the serial variant instead (the same values up to the
      last bit: fastmath lets the compiler order each variant's row sums its own way). Which layer
      runs is known only once the pool started, so the first launch is exclusive too.
    - A forked child of a process whose pool started runs the serial variants: that pool's
      threads do not exist in the child.
    """

    started = False  # this process has run a parallel kernel
    exclusive = True  # launches must not overlap (until the layer is known not to be workqueue)
    serial_only = False  # forked after the parent started its pool
    lock = threading.Lock()

    @classmethod
    def choose_layer(cls):
        import numba

        if cls.started or os.environ.get("NUMBA_THREADING_LAYER") or numba.config.THREADING_LAYER != "default":
            return
        numba.config.THREADING_LAYER = "tbb" if _tbb_pool_loads() else "workqueue"

    @classmethod
    def after_fork_in_child(cls):
        cls.lock = threading.Lock()  # a lock held by another thread at the fork stays held forever
        if cls.started:
            cls.serial_only = True

    @classmethod
    def note_started(cls):
        import numba
        cls.exclusive = numba.threading_layer() == "workqueue"
        cls.started = True


os.register_at_fork(after_in_child=_Pool.after_fork_in_child)


def _loaded_libgomp() -> str | None:
    """The path of the GNU OpenMP runtime this process loaded (torch's, when torch runs on it), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line}
    except OSError:
        return None
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    ranked = sorted(paths, key=lambda p: not p.startswith(torch_lib))  # torch's own first
    return ranked[0] if ranked else None


class _TorchTeam:
    """torch's OpenMP thread team, where the parallel kernels run when torch runs on GNU OpenMP.

    After each op torch's OpenMP threads keep spinning for a while (libgomp's default wait policy), so a
    torch program holds its cores hot for its own team: Numba's pool, started after a torch op, competes
    with those threads (its 2-thread kernels ran up to 1.5 times slower after a torch op than timed alone on
    a 2-core VM). `GOMP_parallel` of the runtime torch loaded hands the work to that same team (the calling thread
    is its thread 0, as in torch's own ops), whose threads pick it up at once (docs/benchmarks/cpu-numba.md).
    Each thread runs one of the module's team workers, which claim tasks and run the serial kernel's code on
    them.

    A forked child runs the serial variants: it inherits libgomp's record of a team whose threads it does not
    have, and a parallel region there waits for them forever (torch's own parallel ops hang in such a child;
    its DataLoader workers run on one thread for that reason).
    """

    parallel = None  # GOMP_parallel(fn, data, num_threads, flags) of torch's runtime, once found
    looked = False
    forked = False

    @classmethod
    def entry(cls):
        """GOMP_parallel of torch's OpenMP runtime, or None (torch on another thread pool, not found, or a forked
        child)."""
        if cls.forked:
            return None
        if not cls.looked:
            cls.looked = True
            path = _loaded_libgomp() if "parallel backend: OpenMP" in torch.__config__.parallel_info() else None
            if path is not None:
                try:
                    fn = ctypes.CDLL(path).GOMP_parallel
                except (OSError, AttributeError):
                    fn = None
                if fn is not None:
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                    fn.restype = None
                    cls.parallel = fn
        return cls.parallel

    @classmethod
    def after_fork_in_child(cls):
        cls.forked = True


os.register_at_fork(after_in_child=_TorchTeam.after_fork_in_child)


def parallel_pool() -> str | None:
    """Where this process's parallel numba-cpu kernels run: "torch OpenMP team", Numba's threading layer once
    its pool started, or None (none has run). For benchmark records."""
    if _TorchTeam.entry() is not None:
        return "torch OpenMP team"
    try:
        import numba
        return f"numba {numba.threading_layer()}"
    except (ImportError, ValueError):  # ValueError: Numba's pool has not started
        return None


def _team_launches(module, spec: NormSpec, threads: int, serial):
    """The kernel launched on torch's OpenMP team (`threads` of it, or torch's count when 0): each of the
    module's team workers on every thread of the team in turn, given the kernel's arguments as int64 words
    after the counter its threads claim tasks from. The serial kernel where there is no team to run on."""
    import numpy as np

    def words(ints, reals=(), tail=()):
        packed = np.zeros(1 + len(ints) + len(reals) + len(tail), np.int64)  # word 0: the next task
        packed[1:1 + len(ints)] = ints
        packed[1 + len(ints):1 + len(ints) + len(reals)].view(np.float64)[:] = reals
        packed[1 + len(ints) + len(reals):] = tail
        return packed

    def launch(worker, packed, team):
        _TorchTeam.entry()(worker.address, packed.ctypes.data, team, 0)

    def forward(*args):
        team = threads or torch.get_num_threads()
        if _TorchTeam.entry() is None or team == 1:
            return serial(*args)
        launch(module.team_rows, words(args[:12], args[12:14], args[14:]), team)  # reals: eps, offset

    def backward(dya, dys, xa, xs, wa, ma, rsa, dha, dhs, dxa, dwa, dba, m, n, offset, rpt):
        team = threads or torch.get_num_threads()
        if _TorchTeam.entry() is None or team == 1:
            return serial(dya, dys, xa, xs, wa, ma, rsa, dha, dhs, dxa, dwa, dba, m, n, offset, rpt)
        # each task's fp32 dW (dB) partial row, as kernel_serial keeps them, summed in task order at the end
        ntasks = (m + rpt - 1) // rpt
        dwp, dbp = (torch.empty(ntasks * n, dtype=torch.float32) if a else None for a in (dwa, dba))
        launch(module.team_tasks, words((dya, dys, xa, xs, wa, ma, rsa, dha, dhs, dxa, _addr(dwp), _addr(dbp), m, n),
                                        (offset,), (rpt,)), team)
        if dwa:
            launch(module.team_sums, words((_addr(dwp), _addr(dbp), dwa, dba, ntasks, n)), team)

    return forward if spec.direction == "fwd" else backward


def _pool_guarded(parallel, serial):
    """`parallel`, run only when this process's thread pool can run it safely, else `serial`."""
    def call(*args):
        if _Pool.serial_only:
            return serial(*args)
        if not _Pool.exclusive:
            return parallel(*args)
        if not _Pool.lock.acquire(blocking=False):
            return serial(*args)
        try:
            result = parallel(*args)
            if not _Pool.started:
                _Pool.note_started()
            return result
        finally:
            _Pool.lock.release()
    return call


def _on_team(config: NumbaCpuConfig) -> bool:
    """Whether the kernel's parallel variant runs on torch's OpenMP team (else on Numba's pool)."""
    return config.threads != 1 and _TorchTeam.entry() is not None


def _variants(module, spec: NormSpec, config: NumbaCpuConfig):
    """(parallel kernel, serial kernel); with threads=1 both are the serial one (the pool would only
    add its wake-up). The parallel kernel runs on torch's OpenMP team where there is one, else on
    Numba's pool."""
    serial = module.kernel_serial
    if config.threads == 1:
        return serial, serial
    if _on_team(config):
        return _team_launches(module, spec, config.threads, serial), serial
    return _pool_guarded(_with_threads(module.kernel, config.threads), serial), serial


# `parallel_from` of a launcher that always takes the serial variant
SERIAL_ALWAYS = 1 << 62


def _forward_launcher(spec: NormSpec, config: NumbaCpuConfig, module, parallel_from: int = SERIAL_BELOW):
    """The forward kernel: calls on at least `parallel_from` elements take the parallel variant."""
    residual_, rpt = spec.residual, config.rows_per_task
    parallel, serial = _variants(module, spec, config)

    def kernel(x, weight, bias, residual, eps, offset):
        m, n = x.shape
        y, h, mean, rstd = forward_outputs(spec, x)
        if m == 0:
            return y, h, mean, rstd
        (serial if m * n < parallel_from else parallel)(
            x.data_ptr(), _row_stride(x, m, n),
            residual.data_ptr() if residual_ else 0, _row_stride(residual, m, n) if residual_ else 0,
            _addr(weight), _addr(bias), y.data_ptr(), _addr(h), _addr(mean), rstd.data_ptr(),
            m, n, eps, offset, rpt)
        return y, h, mean, rstd

    def y_only(x, weight, bias, eps, offset):
        """y alone, for inference without a residual: no mean/rstd buffers (two allocations,
        ~2 of the ~5.5 us a 1x64 LayerNorm call cost). Kept flat: each helper call costs ~0.1 us."""
        m, n = x.shape
        y = new_empty_like_rows(x)
        if m:
            (serial if m * n < parallel_from else parallel)(
                x.data_ptr(), x.stride(0) if m > 1 else n, 0, 0,
                0 if weight is None else weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                y.data_ptr(), 0, 0, 0, m, n, eps, offset, rpt)
        return y

    if not residual_:
        kernel.y_only = y_only
    return kernel


def _backward_launcher(spec: NormSpec, config: NumbaCpuConfig, module, parallel_from: int = SERIAL_BELOW // 2):
    """The backward kernel; it reads ~2x the forward's bytes per element: the same time threshold."""
    rpt = config.rows_per_task
    parallel, serial = _variants(module, spec, config)

    def kernel(dy, x, weight, mean, rstd, dh, offset):
        m, n = x.shape
        dx, dw, db = backward_outputs(spec, x)
        if m == 0:
            return dx, dw, db
        # Saved tensors may come back non-contiguous only in unusual autograd paths; contiguous()
        # returns the tensor itself when it already is.
        weight = weight.contiguous() if weight is not None else None
        mean = mean.contiguous() if mean is not None else None
        rstd = rstd.contiguous()
        (serial if m * n < parallel_from else parallel)(
            dy.data_ptr(), _row_stride(dy, m, n), x.data_ptr(), _row_stride(x, m, n),
            _addr(weight), _addr(mean), rstd.data_ptr(),
            _addr(dh), _row_stride(dh, m, n) if dh is not None else 0,
            dx.data_ptr(), _addr(dw), _addr(db), m, n, offset, rpt)
        return dx, dw, db

    return kernel


class NumbaCpuBackend(Backend):
    name = "numba-cpu"
    config_cls = NumbaCpuConfig
    template_dir = "numba_cpu"

    def unavailable_reason(self):
        try:
            import numba  # noqa: F401
        except ImportError:
            return "numba is not installed (pip install autonorm[cpu])"
        return None

    def version(self):
        import numba
        return f"numba-{numba.__version__}"

    def supports_device(self, device):
        return torch.device(device).type == "cpu"

    def template_name(self, spec):
        return f"numba_cpu/{spec.direction}.py.j2"

    def seed_configs(self, spec):
        """The heuristic and a second launch of its source (a timing, not a compile), where the best launches were.

        - On torch's OpenMP team: the fewest tasks (256 rows each). At 1024 rows on 2 cores, after a torch op, that
          launch was within 1.4% of the best rows_per_task in 13 of 16 specs, and 2-thread launches with 64 to 256
          rows a task won most studies of two exhaustive runs, while the serial launch ran 1.2 to 2.3 times the best
          (docs/benchmarks/cpu-numba.md, docs/benchmarks/budget-vs-exhaustive.md).
        - On Numba's pool: the launch on one thread. After a torch op the serial launch won every numba-cpu study
          of that grid on 2 cores (docs/benchmarks/cpu-numba.md).
        A budget that times a study's seeds alone still asks the question."""
        heuristic = self.heuristic(spec)
        serial = dataclasses.replace(heuristic, threads=1, rows_per_task=SERIAL_ROWS_PER_TASK)
        fewest_tasks = dataclasses.replace(heuristic, rows_per_task=SERIAL_ROWS_PER_TASK)
        seconds = ([fewest_tasks] if _on_team(heuristic) else []) + [serial]
        second = next((c for c in seconds if c != heuristic and not NumbaCpuConfig.is_valid(spec, c)), None)
        return [heuristic] if second is None else [heuristic, second]

    def build(self, source, spec, config, device):
        # The file is never rewritten: Numba's cache index is keyed by the file's mtime and size.
        module = import_generated(source, self.template_dir)
        _Pool.choose_layer()  # before this process's first parallel launch
        launcher = _forward_launcher if spec.direction == "fwd" else _backward_launcher
        kernel = launcher(spec, config, module)
        # Which variant runs depends on the call's size: verifiers run each one on every case.
        kernel.variants = (launcher(spec, config, module, 0), launcher(spec, config, module, SERIAL_ALWAYS))
        # what Numba compiled for the parallel variant, then the serial one (compile stats, cache hits): the
        # team's worker (a cfunc, `cache_hits` only) or the prange kernel, then the serial kernel
        team_worker = module.team_rows if spec.direction == "fwd" else module.team_tasks
        kernel.dispatchers = (team_worker if _on_team(config) else module.kernel, module.kernel_serial)
        return kernel
