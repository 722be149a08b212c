"""The first-use check: a kernel that no tuning run verified is checked once, on the real call,
before its result is returned.

Which kernels (the dispatcher decides): those of the heuristic rung, of the nearest-rows,
nearest-hidden and same-arch rungs (a config tuned for another shape or GPU) and of the tuned
rung (tune-on-miss hands its kernel over before its record is read back); with
AUTONORM_VERIFY_DB=1, those of every database rung. AUTONORM_SKIP_FIRST_USE_CHECK=1 turns
the check of the unverified rungs off.

How: the first call runs the kernel on the first `CHECK_ROWS` rows of the caller's own inputs
(same device, same strides) and compares every output, and the `y_only` entry point when the
kernel has one, with `autonorm.verify`'s fp64 reference and tolerances. When the kernel is off,
torch's kernel runs on the same rows: if it is off too, these rows cannot judge a kernel
(non-finite values, or data too ill-conditioned for the dtype's tolerance) and the kernel is
judged on verify's synthetic inputs instead, so every check ends in a verdict. A backward kernel
takes the forward's statistics, not eps: the reference gets the eps that reproduces the given
rstd (1/rstd² - variance) of the row of least variance, so both work from the same statistics.

Verdicts are kept per process and in one small JSON file each under
`AUTONORM_CACHE_DIR/verdicts/`, named by a hash of the backend, its compiler versions, the
kernel's source hash, its config and the device kind; a file is only ever a hint to skip a
check or a kernel, never code.
"""
from __future__ import annotations

import hashlib
import json
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor

from . import settings, verify
from .backends.base import write_atomically
from .device import device_key
from .safe_files import read_regular_file
from .spec import NormSpec

CHECK_ROWS = 8  # a few rows: enough to see a wrong row kernel, cheap next to any first call
MAX_VERDICT_BYTES = 4096

_verdicts: dict[str, bool] = {}


def verdict_key(backend, spec: NormSpec, config, device: torch.device) -> str:
    """The verdict's name: what the kernel is (backend, compiler versions, source, config) and where it runs."""
    source = backend.render(spec, config)
    text = "\n".join((backend.name, backend.version(), source.sha256, repr(config), device_key(device)))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def verdict_path(key: str) -> Path:
    """Where a verdict is kept: the compile cache's folder (AUTONORM_CACHE_DIR), `verdicts/<key>.json`."""
    return settings.cache_dir() / "verdicts" / f"{key}.json"


def lookup(key: str) -> tuple[bool | None, str]:
    """(verdict, the file it was read from: '' when this process knew it); (None, '') when unknown."""
    ok = _verdicts.get(key)
    if ok is not None:
        return ok, ""
    path = verdict_path(key)
    try:
        ok = json.loads(read_regular_file(path, MAX_VERDICT_BYTES)).get("ok")
    except (OSError, ValueError, AttributeError):  # none yet, unreadable or not ours: check again
        return None, ""
    if not isinstance(ok, bool):
        return None, ""
    _verdicts[key] = ok
    return ok, str(path)


def record(key: str, ok: bool, about: dict) -> None:
    """Keep a verdict for this process and, when the cache folder is writable, for later ones."""
    _verdicts[key] = ok
    try:
        write_atomically(verdict_path(key), json.dumps({"ok": ok, **about}, indent=1))
    except OSError:  # an unusable cache costs a check per process, never the call
        pass


def forget() -> None:
    """Forget this process's verdicts (`dispatch.reset`); the files stay."""
    _verdicts.clear()


# --- the check -------------------------------------------------------------------------------
def _first_rows(spec: NormSpec, args: tuple) -> verify.Inputs | None:
    """The first CHECK_ROWS rows of a kernel call as verify's inputs (views: the caller's strides); None
    without rows."""
    if spec.direction == "fwd":
        x, weight, bias, residual, eps, offset = args
        k = min(CHECK_ROWS, x.shape[0])
        return verify.Inputs(x[:k], weight, bias, None if residual is None else residual[:k], eps=eps,
                             offset=offset) if k else None
    dy, x, weight, mean, rstd, dh, offset = args
    k = min(CHECK_ROWS, x.shape[0])
    if not k:
        return None
    xs, rstd = x[:k], rstd[:k]
    centered = xs.double()
    if spec.is_layernorm:
        centered = centered - centered.mean(-1, keepdim=True)
    # The eps that gives the row of least variance its rstd back: the estimate's error (fp32 rstd) scales
    # with that variance, so it moves no row's recomputed rstd by more than the rounding of rstd itself.
    var = centered.square().mean(-1)
    row = int(var.argmin())
    eps = max(float(rstd[row].double().pow(-2) - var[row]), 0.0)
    # The backward's contract has no bias argument; the reference needs one only to produce dbias.
    bias = torch.zeros(x.shape[1], dtype=spec.torch_w_dtype, device=x.device) if spec.bias else None
    return verify.Inputs(xs, weight, bias, None, dy=dy[:k], dh=None if dh is None else dh[:k],
                         mean=None if mean is None else mean[:k], rstd=rstd, eps=eps, offset=offset)


def _error(spec: NormSpec, kernel, inputs: verify.Inputs) -> str | None:
    """None when `kernel` (and its `y_only` entry) is right on `inputs`, else what is wrong."""
    try:
        expected = verify.expected_outputs(spec, inputs)
        results = [("", verify.compare(spec, inputs, kernel(*inputs.args(spec)), expected))]
        y_only = getattr(kernel, "y_only", None) if spec.direction == "fwd" and not spec.residual else None
        if y_only is not None:
            y = y_only(inputs.x, inputs.weight, inputs.bias, inputs.eps, inputs.offset)
            results.append((" (y_only)", verify.compare(spec, inputs, (y,), {"y": expected["y"]})))
    except Exception as exc:  # a kernel that raises on a few rows is as wrong as one that miscomputes
        return f"{type(exc).__name__}: {exc}"
    for where, result in results:
        if not result.ok:
            worst = max(result.errors, key=result.errors.get)
            return (f"{worst}{where} rel. error {result.errors[worst]:.3g} > tolerance {result.tolerance:.3g} "
                    f"on {inputs.x.shape[0]} rows")
    return None


def check_call(spec: NormSpec, kernel, torch_kernel, args: tuple, device: torch.device) -> str | None:
    """None when `kernel` is right on the first rows of this call, else what is wrong (see the module)."""
    # Plain tensors even when the first call comes from inside torch.func or autograd.
    with torch._C._DisableFuncTorch(), torch.no_grad():
        inputs = _first_rows(spec, args)
        if inputs is not None:
            error = _error(spec, kernel, inputs)
            if error is None or _error(spec, torch_kernel, inputs) is None:
                return error
        synthetic = verify.make_inputs(spec, CHECK_ROWS, device)
        error = _error(spec, kernel, synthetic)
        return None if error is None else f"{error} (synthetic inputs)"


def _no_values(args: tuple) -> bool:
    """Whether the call's tensors hold no values to check: meta or fake tensors, or a tracer's (any other
    tensor subclass, an nn.Parameter passed as the input say, holds values and is checked)."""
    x = args[0]
    return x.device.type == "meta" or isinstance(x, FakeTensor) or torch.compiler.is_compiling()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class FirstUseCheck:
    """Stands for an unchecked kernel in the dispatcher's memo until its first call has checked it.

    `settle(ok)` tells the dispatcher the verdict and returns the kernel that serves this call and,
    for a caller that kept this object, every later one: the kernel itself when it passed (the
    dispatcher's memo then holds the bare kernel: one dict lookup and the launch again), else the
    next rung's kernel. During CUDA graph capture nothing can be checked (no synchronization):
    the captured call runs `torch_kernel`, and the check waits for the next eager call.
    """

    def __init__(self, spec: NormSpec, kernel, torch_kernel, key: str, label: str,
                 settle: Callable[[bool], object]):
        self.spec, self.kernel, self.torch_kernel, self.key, self.label = spec, kernel, torch_kernel, key, label
        self._settle, self._settled, self._lock = settle, None, threading.Lock()

    def __call__(self, *args):
        if self._settled is not None:
            return self._settled(*args)
        if _no_values(args):  # nothing computed, nothing to check or to get wrong
            return self.kernel(*args)
        device = (args[1] if self.spec.direction == "bwd" else args[0]).device
        if _capturing(device):
            return self.torch_kernel(*args)
        with self._lock:
            if self._settled is None:
                error = check_call(self.spec, self.kernel, self.torch_kernel, args, device)
                record(self.key, error is None, {"kernel": self.label, "error": error})
                if error is not None:
                    warnings.warn(f"autonorm: {self.label} gave a wrong result at its first use ({error}); "
                                  "it is disabled and the dispatcher's next rung serves this call",
                                  RuntimeWarning, stacklevel=2)
                self._settled = self._settle(error is None)
        return self._settled(*args)
