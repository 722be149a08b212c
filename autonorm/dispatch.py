"""Choose the kernel for a call, once per key, and remember it.

A key is built from cheap attributes of the call's tensors (no NormSpec is built
on the steady-state path); a miss resolves it into a `Choice` holding the
compiled kernel, and every later call with that key costs one dict lookup.

Resolution (the fallback ladder), first rung that yields a kernel wins:

  disabled       AUTONORM_DISABLE=1: torch eager
  forced         AUTONORM_BACKEND=<name>: that backend's heuristic config
  exact          this device's databases hold the key
  nearest-rows   same hidden, nearest rows bucket (log distance)
  nearest-hidden nearest hidden (then rows) whose config is valid for this spec
  same-arch      another GPU of the same compute capability, nearest valid record
  tuned          AUTONORM_TUNE_ON_MISS=1: tuned now by autonorm.tune (when installed)
  heuristic      the first available backend of DEFAULT_ORDER, its heuristic config
  torch          torch eager

A new choice is launched once on a 2-row input inside the ladder (Triton and
Numba compile at the first launch): a record or heuristic whose kernel fails to
compile or to launch is reported with a warning and the ladder goes on; it is
never used silently, and never fails in the caller's step. A kernel no tuning
run verified (every rung but exact, forced, disabled and torch) is then checked
on the first rows of its first real call (autonorm/first_use.py): a wrong one is
disabled with one warning and that call, like every later one, is served by the
next rung. Only resolution and that first call pay for this: a resolved key is
one dict lookup and the launch.
"""
from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from . import db_sources, dispatch_records, first_use, settings
from .backends import DEFAULT_ORDER
from .config import Config
from .errors import AutonormError, BackendUnavailableError
from .spec import DTYPE_NAMES, NormSpec

log = logging.getLogger("autonorm")


@dataclass(frozen=True)
class Choice:
    """What a key resolved to, and why (`rung`; `source` names the database record used, if any)."""

    spec: NormSpec
    backend: str
    config: Config
    rung: str
    kernel: object
    source: str = ""
    check: str = ""  # the verdict key while the kernel's first-use check is still to come

    def describe(self) -> str:
        text = f"{self.spec.short()} -> {self.backend} [{self.config.short()}] (rung: {self.rung})"
        return text + (f" from {self.source}" if self.source else "")

    __str__ = describe


_choices: dict[tuple, Choice] = {}
_lock = threading.RLock()


def reset(*, keep_databases: bool = False) -> None:
    """Forget every resolution (after changing settings or loading a database).

    Databases are re-read at the next resolution too (so a changed
    AUTONORM_DB_PATH takes effect); files given to `autonorm.load_db` stay.
    """
    with _lock:
        _choices.clear()
        first_use.forget()  # verdicts are read back from the cache, whose folder may have changed
    if not keep_databases:
        db_sources.forget()


db_sources.on_load(lambda: reset(keep_databases=True))  # a loaded database may answer keys resolved before


class CallKey(NamedTuple):
    """The fields of a memo key, by name. `make_key` builds a plain tuple in this order (a named tuple
    costs a measurable share of a tiny call); a resolution reads it through `CallKey._make(key)`."""

    op: str  # "rmsnorm", "layernorm", or "rmsnorm:<casting mode>"
    direction: str
    x_dtype: torch.dtype
    w_dtype: torch.dtype
    hidden: int
    has_weight: bool
    has_bias: bool
    has_residual: bool
    has_offset: bool
    device: torch.device
    rows_bucket: int


def make_key(op, direction, x, weight, bias, residual, offset) -> tuple:
    """The memo key of a call on a 2-D `x` (M, N), a tuple in `CallKey`'s order; on every call's path, so
    kept to cheap attribute reads."""
    m, n = x.shape
    # rows_bucket(m), inlined: a function call here is a measurable share of a tiny call.
    bucket = 1 if m <= 1 else 1 << (m - 1).bit_length()
    return (op, direction, x.dtype, x.dtype if weight is None else weight.dtype, n, weight is not None,
            bias is not None, residual is not None, offset != 0.0, x.device, bucket)


def spec_from_key(key) -> NormSpec:
    k = CallKey._make(key)
    op, _, casting_mode = k.op.partition(":")  # "rmsnorm:llama": functional.rmsnorm_op
    return NormSpec(op, k.direction, DTYPE_NAMES[k.x_dtype], DTYPE_NAMES[k.w_dtype], k.hidden,
                    weight=k.has_weight, bias=k.has_bias, residual=k.has_residual, offset=k.has_offset,
                    casting_mode=casting_mode or "gemma")


def choice_for(key) -> Choice:
    """The memoized choice for a key (resolving it on first use)."""
    choice = _choices.get(key)
    if choice is None:
        with _lock:
            choice = _choices.get(key)
            if choice is None:
                fields = CallKey._make(key)
                choice = _resolve(spec_from_key(key), fields.device, fields.rows_bucket)
                if choice.check:
                    choice = _checked_at_first_use(key, choice)
                _choices[key] = choice
                if settings.log_choices():
                    log.warning("autonorm: %s (device %s, rows<=%d)", choice.describe(), fields.device,
                                fields.rows_bucket)
    return choice


def _make_choice(backend_name: str, spec: NormSpec, config: Config | None, device, rung: str,
                 source: str = "") -> Choice:
    from .backends import get_backend

    backend = get_backend(backend_name)
    config = config if config is not None else backend.heuristic(spec)
    return Choice(spec, backend_name, config, rung, backend.compile(spec, config, device), source)


def _first_call_error(choice: Choice, device) -> str | None:
    """Launch a new choice once on 2 rows: None when it runs, else why not (never raises).

    Triton JIT-compiles and Numba compiles at the first launch, so a config the
    hardware refuses (registers, shared memory) fails there, not in `compile`.
    On CUDA the probe synchronizes so that a failed launch surfaces here. Skipped
    while a CUDA graph is captured (no allocation or synchronization is allowed).
    """
    from .verify import make_inputs

    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    try:
        # Plain tensors even when the first call comes from inside torch.vmap or autograd.
        with torch._C._DisableFuncTorch(), torch.no_grad():
            inputs = make_inputs(choice.spec, 2, device)
            choice.kernel(*inputs.args(choice.spec))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # any failure of a candidate kernel sends the ladder to the next rung
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


def _try_choice(backend_name: str, spec: NormSpec, config: Config | None, device, rung: str,
                source: str = "") -> Choice | None:
    """`_make_choice` plus the first-call probe; None (with one warning) when either fails."""
    what = source or f"the {backend_name} {rung} config"
    try:
        choice = _make_choice(backend_name, spec, config, device, rung, source)
    except AutonormError as exc:
        warnings.warn(f"autonorm: skipping {what} for {spec.short()}: {exc}", RuntimeWarning, stacklevel=3)
        return None
    error = _first_call_error(choice, device)
    if error is not None:
        warnings.warn(f"autonorm: skipping {what} ({backend_name} [{choice.config.short()}]) for {spec.short()}: "
                      f"its first launch failed: {error}", RuntimeWarning, stacklevel=3)
        return None
    return _with_verdict(choice, device, what)


# Rungs whose kernels no tuning run verified on this shape and device: checked at their first call.
_UNVERIFIED_RUNGS = frozenset({"nearest-rows", "nearest-hidden", "same-arch", "tuned", "heuristic"})
_DATABASE_RUNGS = frozenset({"exact", "nearest-rows", "nearest-hidden", "same-arch"})


def _with_verdict(choice: Choice, device, what: str) -> Choice | None:
    """None (the ladder goes on) when the kernel failed a first-use check, whatever its rung now (a tuned
    kernel comes back as an exact record); else `choice`, marked for its first-use check when its rung
    needs one and it has no verdict yet."""
    if choice.backend == "torch":
        return choice
    from .backends import get_backend

    key = first_use.verdict_key(get_backend(choice.backend), choice.spec, choice.config, device)
    ok, where = first_use.lookup(key)
    if ok is None:
        checked = ((choice.rung in _UNVERIFIED_RUNGS and not settings.skip_first_use_check())
                   or (choice.rung in _DATABASE_RUNGS and settings.verify_db()))
        return replace(choice, check=key) if checked else choice
    if not ok and where:  # this process's own verdict was warned about when it was reached
        warnings.warn(f"autonorm: skipping {what} ({choice.backend} [{choice.config.short()}]) for "
                      f"{choice.spec.short()}: it gave a wrong result at its first use (verdict kept in {where}; "
                      "delete the file to check it again)", RuntimeWarning, stacklevel=4)
    return choice if ok else None


def _checked_at_first_use(key, choice: Choice) -> Choice:
    """`choice` with its kernel behind a `first_use.FirstUseCheck`, which settles the memo once it has run."""
    def settle(ok: bool):
        with _lock:
            current = _choices.get(key) is pending
            if ok:
                if current:
                    _choices[key] = replace(choice, check="")
                return choice.kernel
            if current:
                del _choices[key]  # resolved again below: the ladder now skips the failed kernel
        return choice_for(key).kernel

    torch_kernel = _make_choice("torch", choice.spec, None, CallKey._make(key).device, "torch").kernel
    label = f"{choice.backend} [{choice.config.short()}] for {choice.spec.short()} (rung: {choice.rung})"
    pending = replace(choice, kernel=first_use.FirstUseCheck(choice.spec, choice.kernel, torch_kernel,
                                                              choice.check, label, settle))
    return pending


def _from_databases(spec: NormSpec, device, bucket) -> Choice | None:
    for rung, k, record, table in dispatch_records.candidates(spec, device, bucket):
        winner = record.winner
        source = f"{table.device.get('slug')} record {k.short()}"
        choice = _try_choice(winner.backend, spec, winner.config, device, rung, source)
        if choice is not None:
            return choice
    return None


def _tuned(spec: NormSpec, device, bucket) -> Choice | None:
    """AUTONORM_TUNE_ON_MISS=1: a `--quick` study now, saved for next time (`autonorm.tune.tune_one`, needs optuna:
    the protocol of `autonorm tune`, the torch.compile baseline left out so as not to reset this program's Dynamo).

    The record goes to `db_sources.tuned_path(slug)` under AUTONORM_CACHE_DIR, which
    is read as a database (after the shipped ones) whenever the knob is set.
    Skipped when Optuna is not installed, or nothing native can run.
    """
    try:
        import optuna  # noqa: F401  (the tuner's search)
    except ImportError:
        return None
    from .device import identity
    from .tune import tune_one

    ident = identity(device)
    path = db_sources.tuned_path(ident["slug"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # nowhere to keep the record: tuning now would be lost work on every miss
        warnings.warn(f"autonorm: AUTONORM_TUNE_ON_MISS: cannot keep tuned records in {path.parent} ({exc}); "
                      "not tuning", RuntimeWarning, stacklevel=2)
        return None
    log.warning("autonorm: AUTONORM_TUNE_ON_MISS: tuning %s rows<=%d on %s", spec.short(), bucket, ident["name"])
    record = tune_one(spec, bucket, device, path)
    if record is None:
        return None
    db_sources.forget()  # the next key sees the new record through the ladder
    winner = record.winner
    return _try_choice(winner.backend, spec, winner.config, device, "tuned", f"tuned now, saved to {path}")


def _resolve(spec: NormSpec, device: torch.device, bucket: int) -> Choice:
    from .backends import get_backend

    if settings.disabled():
        return _make_choice("torch", spec, None, device, "disabled")
    forced = settings.backend()
    if forced is not None:
        backend = get_backend(forced)  # unknown names raise with the list of known ones
        backend.check_available()
        if not backend.supports_device(device):
            raise BackendUnavailableError(
                f"AUTONORM_BACKEND={forced} cannot run on {device} tensors"
                + (" (set TRITON_INTERPRET=1 before importing autonorm to run Triton on CPU)"
                   if forced == "triton" and device.type == "cpu" else ""))
        return _make_choice(forced, spec, None, device, "forced")
    choice = _from_databases(spec, device, bucket)
    if choice is None and settings.tune_on_miss():
        choice = _tuned(spec, device, bucket)
    if choice is not None:
        return choice
    for name in DEFAULT_ORDER.get(device.type, ("torch",)):
        try:
            backend = get_backend(name)
        except BackendUnavailableError:
            continue
        if name != "torch" and backend.is_available() and backend.supports_device(device):
            choice = _try_choice(name, spec, None, device, "heuristic")
            if choice is not None:
                return choice
    return _make_choice("torch", spec, None, device, "torch")


def choice_for_tensors(op, direction, x, weight=None, bias=None, residual=None, offset=0.0) -> Choice:
    """The choice a kernel call on these 2-D tensors would use (low level: kernel arguments)."""
    return choice_for(make_key(op, direction, x, weight, bias, residual, offset))
