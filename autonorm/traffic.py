"""Global-memory traffic of one kernel call, counted on CPU without a GPU.

The Triton interpreter and Numba's CUDA simulator run kernels on host memory.
`count()` hooks their load and store primitives and records, for every access,
the address it touched and the bytes it moved (lanes a mask switches off move
nothing and are not counted). `measure()` runs one compiled kernel on inputs
from `verify.make_inputs` and splits the bytes by tensor: the call's inputs and
outputs by their address ranges, everything else (fp32 dW/dB partials a kernel
allocates for itself) as scratch.

The count is what the kernel asks for, not what DRAM serves: a re-read that hits
L2 on a GPU is counted again. That is the point: it shows how many passes a
kernel makes over each tensor, against the ideal of one (the row tensors of `NormSpec.bytes_moved`).
Torch ops a launcher runs around the kernel (the final sum of the partials) are
not counted; `Traffic.scratch` shows what they will read.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from autonorm import verify
from autonorm.spec import NormSpec


@dataclass
class Traffic:
    """Every access of the counted calls: (start address, bytes, is_store)."""

    accesses: list[tuple[int, int, bool]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, address: int, nbytes: int, store: bool) -> None:
        if nbytes:
            with self._lock:  # the Numba simulator runs each CUDA thread in a Python thread
                self.accesses.append((address, nbytes, store))

    @property
    def read(self) -> int:
        return sum(n for _, n, store in self.accesses if not store)

    @property
    def written(self) -> int:
        return sum(n for _, n, store in self.accesses if store)

    @property
    def total(self) -> int:
        return self.read + self.written

    def reread_start(self, tensor: torch.Tensor) -> float | None:
        """Where the second pass over `tensor`'s first row begins (a re-read, or the read back of what was
        written), as a fraction of the row: 0.0 at its first element, near 1.0 in its last chunk; None if
        the row is touched only once.

        A second pass that starts where the first ended finds the row's most recent bytes still in L2; one
        that starts at the beginning meets the bytes the first pass touched longest ago."""
        start, row = tensor.data_ptr(), tensor.shape[-1] * tensor.element_size()
        touched = 0
        for address, nbytes, _ in self.accesses:
            if start <= address < start + row:
                if touched >= row:
                    return (address - start) / row
                touched += min(nbytes, start + row - address)  # a run past the row's end is the next row's
        return None

    def by_tensor(self, tensors: dict[str, torch.Tensor | None]) -> dict[str, int]:
        """Bytes per named tensor (by its storage's address range); the rest under "scratch"."""
        ranges = []
        for name, t in tensors.items():
            if t is not None and t.numel():
                start = t.data_ptr()
                end = start + t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
                ranges.append((start, end, name))
        out = {name: 0 for _, _, name in ranges}
        out["scratch"] = 0
        for address, nbytes, _ in self.accesses:
            name = next((n for lo, hi, n in ranges if lo <= address < hi), "scratch")
            out[name] += nbytes
        return out


# --- hooks ------------------------------------------------------------------------------------

def _triton_hooks(traffic: Traffic) -> contextlib.AbstractContextManager:
    """Wrap the interpreter builder's masked load/store (plain ones delegate to them)."""
    from triton.runtime.interpreter import InterpreterBuilder

    load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store

    def account(ptrs, mask, is_store):
        addresses, active = np.broadcast_arrays(ptrs.data, mask.data)
        itemsize = ptrs.get_element_ty().primitive_bitwidth // 8
        hit = np.sort(addresses[active], axis=None)
        # One access per contiguous run of addresses, so that a tile over several rows is one access per row
        # (a lane that repeats an address stays in its run and is counted, as before).
        for run in np.split(hit, np.flatnonzero(np.diff(hit) > itemsize) + 1) if hit.size else ():
            traffic.record(int(run[0]), int(run.size) * itemsize, is_store)

    # The cache/eviction arguments after these differ between Triton releases: passed through untouched.
    def counted_load(self, ptrs, mask, *args, **kwargs):
        account(ptrs, mask, False)
        return load(self, ptrs, mask, *args, **kwargs)

    def counted_store(self, ptrs, value, mask, *args, **kwargs):
        account(ptrs, mask, True)
        return store(self, ptrs, value, mask, *args, **kwargs)

    return _patched(InterpreterBuilder, create_masked_load=counted_load, create_masked_store=counted_store)


def _numba_hooks(traffic: Traffic) -> contextlib.AbstractContextManager:
    """Wrap element reads and writes of the simulator's global arrays (shared/local arrays are plain numpy).

    The simulator copies each host array to a "device" array at launch; accesses are
    recorded at the host array's address, so that they map back to the caller's tensors.
    """
    from numba.cuda.simulator.cudadrv import devicearray
    from numba.cuda.simulator.cudadrv.devicearray import FakeWithinKernelCUDAArray

    getitem, setitem = FakeWithinKernelCUDAArray.__getitem__, FakeWithinKernelCUDAArray.__setitem__
    to_device = devicearray.to_device
    copies: list[tuple[int, int, int]] = []  # (device start, device end, host start)

    def address_of(ary: np.ndarray) -> int:
        return ary.__array_interface__["data"][0]

    def counted_to_device(ary, *args, **kwargs):
        dev = to_device(ary, *args, **kwargs)
        start = address_of(dev._ary)
        copies.append((start, start + dev._ary.nbytes, address_of(np.asarray(ary))))
        return dev

    def account(array, idx, is_store):
        ary = array._item._ary
        view = ary[idx]
        if isinstance(view, np.ndarray):
            count, address = view.size, address_of(view)
        else:  # one element: numpy hands back a scalar, so its address comes from the index and the strides
            index = idx if isinstance(idx, tuple) else (idx,)
            count = 1
            address = address_of(ary) + sum((int(i) % n) * step for i, n, step in zip(index, ary.shape, ary.strides))
        host = next((h + address - lo for lo, hi, h in reversed(copies) if lo <= address < hi), address)
        traffic.record(host, count * ary.itemsize, is_store)

    def counted_getitem(self, idx):
        value = getitem(self, idx)
        if not isinstance(value, FakeWithinKernelCUDAArray):  # a sub-array view moves nothing until indexed
            account(self, idx, False)
        return value

    def counted_setitem(self, idx, val):
        account(self, idx, True)
        return setitem(self, idx, val)

    stack = contextlib.ExitStack()
    stack.enter_context(_patched(devicearray, to_device=counted_to_device))
    stack.enter_context(_patched(FakeWithinKernelCUDAArray, __getitem__=counted_getitem, __setitem__=counted_setitem))
    return stack


@contextlib.contextmanager
def _patched(cls, **methods) -> Iterator[None]:
    saved = {name: vars(cls)[name] for name in methods}
    for name, fn in methods.items():
        setattr(cls, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(cls, name, fn)


HOOKS = {"triton": _triton_hooks, "numba": _numba_hooks}  # backend names (numba = Numba CUDA)


@contextlib.contextmanager
def count(backend: str) -> Iterator[Traffic]:
    """Record the global-memory accesses of `backend`'s kernels run inside the block (on CPU)."""
    if backend not in HOOKS:
        raise ValueError(f"traffic is counted for {sorted(HOOKS)} only, not {backend!r}")
    traffic = Traffic()
    with HOOKS[backend](traffic):
        yield traffic


# --- one kernel call against the ideal ---------------------------------------------------------

# Tensors with one element per row element (or per row): the traffic that scales with M. The
# weight and bias are re-read by every program, from L2 on a GPU; they are counted apart.
ROW_TENSORS = ("x", "residual", "y", "h", "mean", "rstd", "dy", "dh", "dx")
PARAMS = ("weight", "bias")


@dataclass(frozen=True)
class Measurement:
    spec: NormSpec
    rows: int
    per_tensor: dict    # bytes moved per tensor name, plus "scratch" (buffers the kernel allocated itself)
    sizes: dict         # bytes of each tensor: the ideal is one read or one write of each
    reread_start: dict  # per tensor: where the second pass over its first row begins (`Traffic.reread_start`)

    def _sum(self, table: dict, names) -> int:
        return sum(table.get(name, 0) for name in names)

    @property
    def row_bytes(self) -> int:
        return self._sum(self.per_tensor, ROW_TENSORS)

    @property
    def row_ideal(self) -> int:
        return self._sum(self.sizes, ROW_TENSORS)

    @property
    def row_ratio(self) -> float:
        """Passes over the row tensors: 1.0 when each is read or written exactly once."""
        return self.row_bytes / self.row_ideal

    @property
    def param_reads(self) -> float:
        """How many times the weight (and bias) were read: about once per program."""
        size = self._sum(self.sizes, PARAMS)
        return self._sum(self.per_tensor, PARAMS) / size if size else 0.0

    @property
    def scratch(self) -> int:
        return self.per_tensor["scratch"]


def measure(backend, spec: NormSpec, config, rows: int) -> Measurement:
    """Bytes one call of `backend`'s kernel for `spec`/`config` moves on `rows` rows (on CPU)."""
    kernel = backend.compile(spec, config, torch.device("cpu"))
    inputs = verify.make_inputs(spec, rows, "cpu")
    with count(backend.name) as traffic:
        outputs = kernel(*inputs.args(spec))
    if spec.direction == "fwd":
        names = {"x": inputs.x, "residual": inputs.residual, "weight": inputs.weight, "bias": inputs.bias,
                 **dict(zip(("y", "h", "mean", "rstd"), outputs))}
    else:
        names = {"dy": inputs.dy, "x": inputs.x, "weight": inputs.weight, "mean": inputs.mean,
                 "rstd": inputs.rstd, "dh": inputs.dh, "dx": outputs[0]}
    sizes = {name: t.numel() * t.element_size() for name, t in names.items() if t is not None}
    reread = {name: traffic.reread_start(t) for name, t in names.items() if t is not None and t.dim() == 2}
    return Measurement(spec, rows, traffic.by_tensor(names), sizes, reread)
