"""The one interface every backend implements.

A backend knows how to render, compile and launch its kernels, and declares its
tunables (`config_cls`). Measuring, verifying, tuning and storing live outside
backends, in `autonorm/`.

Kernel calling convention (both ops, every backend). A compiled kernel is a
plain callable on torch tensors; `x`-like inputs are 2-D `(M, N)` with a unit
last stride and any row stride; `weight`/`bias` are contiguous `(N,)`.

  fwd: kernel(x, weight, bias, residual, eps, offset) -> (y, h, mean, rstd)
       y: (M, N) contiguous, x dtype.   h: x + residual, (M, N) contiguous, or None.
       mean: (M,) fp32 for LayerNorm, else None.   rstd: (M,) fp32.
  bwd: kernel(dy, x, weight, mean, rstd, dh, offset) -> (dx, dweight, dbias)
       x is the normalized input (h when the residual was fused); dh is the
       gradient flowing into h (or None). dx: (M, N) contiguous, x dtype (it is
       also the residual's gradient). dweight/dbias: (N,) in the weight dtype, or
       None; reduced deterministically (fp32 partials, then a fixed-order sum).

Scalars `eps` and `offset` are Python floats, used in fp32 inside kernels.
"""
from __future__ import annotations

import abc
import contextlib
import hashlib
import importlib.util
import linecache
import os
import sys
import tempfile
import threading
import types
import warnings
from pathlib import Path
from typing import Callable, ClassVar

import torch

from autonorm import settings
from autonorm.config import Config
from autonorm.device import device_key
from autonorm.errors import BackendUnavailableError, InvalidConfigError, KernelError
from autonorm.render import Source, render, template_hash
from autonorm.safe_files import read_regular_file
from autonorm.spec import NormSpec

Kernel = Callable[..., tuple]

# When set (tests, `autonorm check`), every output buffer a kernel allocates is
# filled with NaN first, so an element a kernel forgets to write fails the check.
_poison_outputs = False


def poison_outputs(enabled: bool) -> None:
    global _poison_outputs
    _poison_outputs = enabled


@contextlib.contextmanager
def poisoned_outputs():
    """Poisoning on for a block (verifying a candidate), then as it was. Process-wide: kernels other
    threads run meanwhile fill their outputs too, which costs time, never correctness."""
    previous = _poison_outputs
    poison_outputs(True)
    try:
        yield
    finally:
        poison_outputs(previous)


def new_empty_like_rows(x: torch.Tensor) -> torch.Tensor:
    """A row-major (M, N) output shaped like the 2-D kernel input `x`, NaN-filled when poisoning.

    `empty_like` is the cheapest allocation (0.75 vs 1.2 us for torch.empty at 1x64,
    which matters on the tiny-input path). The layout is asked for explicitly: by default
    empty_like copies the stride order of x, and overlapping rows (`unfold`: strides (1, 1))
    would get a column-major output that kernels, which write row i at i * N, scramble.
    """
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if _poison_outputs:
        out.fill_(float("nan"))
    return out


def new_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocate a kernel output (NaN-filled when poisoning is on)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison_outputs:
        out.fill_(float("nan"))
    return out


def forward_outputs(spec: NormSpec, x: torch.Tensor) -> tuple:
    """(y, h, mean, rstd) of the forward contract for the 2-D input `x`, unwritten (NaN when poisoning):
    y and h row-major in x's dtype (h only with a fused residual), mean (LayerNorm) and rstd fp32 per row."""
    m = x.shape[0]
    y = new_empty_like_rows(x)
    h = new_empty_like_rows(x) if spec.residual else None
    mean = new_empty((m,), torch.float32, x.device) if spec.is_layernorm else None
    rstd = new_empty((m,), torch.float32, x.device)
    return y, h, mean, rstd


def backward_outputs(spec: NormSpec, x: torch.Tensor) -> tuple:
    """(dx, dweight, dbias) of the backward contract for the 2-D input `x`: dx row-major in x's dtype,
    dweight / dbias (N,) in the weight dtype when the spec has them. Unwritten, except that with no
    rows the parameter gradients are zero, the sum over no rows, so a kernel returns at once."""
    m, n = x.shape
    dx = new_empty_like_rows(x)
    dw = new_empty((n,), spec.torch_w_dtype, x.device) if spec.weight else None
    db = new_empty((n,), spec.torch_w_dtype, x.device) if spec.bias else None
    if m == 0:
        for t in (dw, db):
            if t is not None:
                t.zero_()
    return dx, dw, db


def sum_partials(partials: torch.Tensor | None, out: torch.Tensor | None) -> None:
    """dweight / dbias from a backward's (P, N) fp32 partial rows: their sum over P, written into `out`
    in the weight dtype. torch's reduction is a fixed-order tree over many threads (no atomics), so the
    result is deterministic for the same P, and parallel where one thread per column over P rows is not."""
    if out is None:
        return
    if out.dtype == torch.float32:
        torch.sum(partials, dim=0, out=out)
    else:
        out.copy_(partials.sum(dim=0))


class CurrentStream:
    """torch's current CUDA stream on `device`, as a backend's own stream object (`wrap(handle)`),
    wrapped once per stream handle, not per call. Launching on it keeps a kernel ordered with
    torch's work on that stream without a synchronization."""

    def __init__(self, wrap: Callable[[int], object], device):
        self.wrap, self.device = wrap, device
        self._wrapped: dict[int, object] = {}

    def __call__(self):
        handle = torch.cuda.current_stream(self.device).cuda_stream
        stream = self._wrapped.get(handle)
        if stream is None:
            stream = self._wrapped[handle] = self.wrap(handle)
        return stream


# Generated sources are tens of KiB; a cache entry far larger than that was not written by autonorm.
MAX_SOURCE_BYTES = 4 << 20
# A private temporary folder used instead of AUTONORM_CACHE_DIR once that proved unusable (this process only).
_fallback_cache: Path | None = None
_fallback_lock = threading.Lock()


def _holds(path: Path, source: Source) -> bool:
    """Whether `path` is a regular file whose content hashes to the name it is filed under."""
    try:
        data = read_regular_file(path, MAX_SOURCE_BYTES)
    except OSError:  # missing, or planted: a FIFO, a device, too large
        return False
    return hashlib.sha256(data).hexdigest() == source.sha256


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, so that a concurrent reader sees
    the old file or the new one, never half of one (its folder is made when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # a concurrent reader never sees half a file; a planted entry is replaced
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _cached_source_path(source: Source, folder_name: str) -> Path:
    """`<cache>/<folder_name>/<sha256>.py` holding exactly `source` (verified, else rewritten).

    A cache folder that cannot be written (a file in its place, read-only, full) is
    replaced for the rest of the process by a private temporary folder, with one
    warning: a broken cache must not fail every kernel call.
    """
    global _fallback_cache
    while True:
        fallback = _fallback_cache
        path = (fallback or settings.cache_dir()) / folder_name / f"{source.sha256}.py"
        if _holds(path, source):
            return path
        try:
            write_atomically(path, source.text)
            return path
        except OSError as exc:
            if fallback is not None:
                raise KernelError(f"{folder_name}: cannot write generated source to {path}: {exc}") from exc
            with _fallback_lock:
                if _fallback_cache is None:
                    _fallback_cache = Path(tempfile.mkdtemp(prefix="autonorm-cache-"))
                    warnings.warn(f"autonorm: the compile cache AUTONORM_CACHE_DIR={settings.cache_dir()} is unusable "
                                  f"({exc}); this process compiles into {_fallback_cache} instead",
                                  RuntimeWarning, stacklevel=4)


def import_generated(source: Source, folder_name: str) -> types.ModuleType:
    """Write generated Python source to `<cache_dir>/<folder_name>/<sha256>.py` and import it.

    A real file (not exec of a string) because Triton's @jit reads its kernel's
    source with inspect and Numba's `cache=True` keys its on-disk cache by file:
    a second process then reuses compiled code instead of paying the JIT again.
    The file is used only when its content hashes to its name; what runs, and what
    inspect reads, is `source.text` itself (primed into linecache), never bytes
    re-read from a folder someone else could write to.
    """
    name = f"autonorm_{folder_name}_{source.sha256[:24]}"
    module = sys.modules.get(name)
    if module is None:
        path = _cached_source_path(source, folder_name)
        linecache.cache[str(path)] = (len(source.text), None, source.text.splitlines(True), str(path))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # Triton resolves a kernel's globals through its module
        try:
            exec(compile(source.text, str(path), "exec"), module.__dict__)
        except Exception as exc:
            del sys.modules[name]
            raise KernelError(f"{folder_name}: generated source {path} failed to load: {exc}") from exc
    return module


class Backend(abc.ABC):
    """A code generator + compiler + launcher for one kernel language."""

    name: ClassVar[str]
    config_cls: ClassVar[type[Config]]
    # Folder under templates/ holding this backend's Jinja sources (None: no templates).
    template_dir: ClassVar[str | None] = None
    # False for a backend whose kernels call ops compiled ahead (torch's): the tuner plans no compile for them.
    compiles: ClassVar[bool] = True

    def __init__(self):
        self._cache: dict[tuple, Kernel] = {}
        self._lock = threading.Lock()

    # --- what each backend provides ---------------------------------------------
    @abc.abstractmethod
    def unavailable_reason(self) -> str | None:
        """None when this backend can run here, else why not (with an install hint)."""

    @abc.abstractmethod
    def version(self) -> str:
        """Versions of the compiler stack, part of every compile-cache key."""

    @abc.abstractmethod
    def supports_device(self, device: torch.device) -> bool:
        """Whether kernels of this backend launch on tensors of `device`."""

    @abc.abstractmethod
    def template_name(self, spec: NormSpec) -> str:
        """Path under templates/ of the template that renders `spec`."""

    @abc.abstractmethod
    def build(self, source: Source, spec: NormSpec, config: Config, device: torch.device) -> Kernel:
        """Compile rendered source into a kernel callable (called once per cache key)."""

    def render_context(self, spec: NormSpec, config: Config) -> dict:
        """Extra names a template sees besides `spec` and `config`."""
        return {}

    # --- shared mechanics --------------------------------------------------------
    def is_available(self) -> bool:
        return self.unavailable_reason() is None

    def check_available(self) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"backend {self.name!r} is unavailable: {reason}")

    def heuristic(self, spec: NormSpec) -> Config:
        return self.config_cls.heuristic(spec)

    def seed_configs(self, spec: NormSpec) -> list[Config]:
        """The configs a study times first for this backend: its heuristic, and any launch of it whose merit
        depends on the machine more than the heuristic can know."""
        return [self.heuristic(spec)]

    def space(self, spec: NormSpec) -> list[Config]:
        return self.config_cls.space(spec)

    def validate(self, spec: NormSpec, config: Config) -> None:
        """Raise InvalidConfigError unless `config` is this backend's and valid for `spec`."""
        if type(config) is not self.config_cls:
            raise InvalidConfigError(f"{self.name} expects a {self.config_cls.__name__}, got {type(config).__name__}")
        reason = self.config_cls.is_valid(spec, config)
        if reason is not None:
            raise InvalidConfigError(f"{self.name} config {config.short()} is invalid for {spec.short()}: {reason}")

    def render(self, spec: NormSpec, config: Config) -> Source:
        self.validate(spec, config)
        return render(self.template_name(spec), spec, config, **self.render_context(spec, config))

    def template_hash(self) -> str:
        """Identity of the code this backend generates and launches (databases record it).

        Covers the templates, the backend's own module and its config's (when apart), whose launch code,
        geometry and `render_context` shape the kernels as much as the templates do.
        """
        if self.template_dir is None:
            return f"{self.name}-{self.version()}"
        modules = dict.fromkeys((type(self).__module__, self.config_cls.__module__))
        return template_hash(self.template_dir, *(sys.modules[m].__file__ for m in modules))

    def compile(self, spec: NormSpec, config: Config, device: torch.device | str = "cpu") -> Kernel:
        """Render and compile, memoized by source hash, config, backend version and device.

        The config is part of the key, not only the source it renders: launchers bake in
        knobs the source leaves out (numba-cpu's rows_per_task and threads, launch grids),
        so two configs sharing a source still get their own kernel. They share the
        imported module (`import_generated` is keyed by the hash), so nothing compiles twice.
        """
        device = torch.device(device)
        self.check_available()
        source = self.render(spec, config)
        key = (source.sha256, config, self.version(), device_key(device))
        kernel = self._cache.get(key)
        if kernel is None:
            with self._lock:  # the tuner compiles candidates from several threads
                kernel = self._cache.get(key)
                if kernel is None:
                    kernel = self.build(source, spec, config, device)
                    self._cache[key] = kernel
        return kernel
