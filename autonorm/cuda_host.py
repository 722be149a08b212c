"""The CuPy backend's CUDA C++ kernels on the CPU: CUDA's execution model as a host harness.

The rendered source is the one the GPU compiles (rendered without the CUDA headers); g++ builds it
against cuda_host.h, which defines AN_HOST and runs every thread of a block as a fiber that switches at
barriers, warp shuffles, cluster barriers and cp.async waits, in an order a seed picks. The launch goes
through the backend's own launcher (backends/cupy.py `CupyLauncher`): the same grid, entry point (chosen on
the real pointers), dynamic shared memory and persistent row loop as on a device profile (an H100 by
default). Each launch runs in a forked child on copies of its tensors in shared mappings whose end abuts
a PROT_NONE page, so a read past a tensor, a misaligned vector access, a deadlock or a launch a GPU would
refuse becomes a HostKernelError naming it, and the results of two seeds are compared bitwise (a race).

What it cannot show: the GPU's memory model and real concurrency (threads interleave only where they
synchronize), timing, and what NVRTC alone would reject.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import re
import tempfile
import weakref
from dataclasses import dataclass, field

import torch

from .backends.cupy import CupyConfig, CupyLauncher, DeviceLimits, cluster_size, configure_launch
from .cuda_host_build import build_library, profiles, static_bytes
from .errors import KernelError
from .hardware import ARCHS, register_cap, resident_blocks
from .spec import NormSpec

ERRORS = {20: "deadlock", 21: "barrier divergence", 22: "exited cluster block", 23: "launch rule",
          24: "warp collective", 25: "memory fault"}
ARG_NAMES = {"fwd": ("x", "x_stride", "residual", "residual_stride", "weight", "bias", "y", "h", "mean", "rstd",
                     "M", "eps", "offset"),
             "bwd": ("dy", "dy_stride", "x", "x_stride", "weight", "mean", "rstd", "dh", "dh_stride", "dx",
                     "part_w", "part_b", "M", "offset", "c12")}


class HostKernelError(KernelError):
    """A kernel did something a GPU would not run correctly: `kind` names it (a key of ERRORS' values, or "race")."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass(frozen=True)
class HostDevice:
    """The device the launcher plans for (grid of the persistent backward, shared-memory opt-in), and
    `first_block`: run only blocks [first_block, grid), for inputs too large to run whole."""

    sm_count: int = 132               # H100 SXM
    smem_optin: int = 227 * 1024
    arch: str = "sm_90"
    first_block: int = 0

    def limits(self) -> DeviceLimits:
        return DeviceLimits(self.sm_count, self.smem_optin, ARCHS[self.arch])


class _LaunchDesc(ctypes.Structure):  # an_host::Launch
    _fields_ = [("grid", ctypes.c_uint), ("block", ctypes.c_uint), ("cluster", ctypes.c_uint),
                ("first_block", ctypes.c_uint), ("dynamic_smem", ctypes.c_longlong), ("static_smem", ctypes.c_longlong),
                ("max_dynamic_smem", ctypes.c_longlong), ("smem_optin", ctypes.c_longlong),
                ("seed", ctypes.c_ulonglong), ("args", ctypes.POINTER(ctypes.c_void_p))]


# ---- memory: shared mappings that end at a guard page ----
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_NORESERVE = 0x4000
_host_buffers: dict[int, tuple[int, int]] = {}  # start -> (end, mapping) of live host_empty tensors
_seeds = (0,)


@contextlib.contextmanager
def schedules(*seeds: int):
    """Every launch in the block runs once per seed (0: threads advance together; others: random thread
    priorities), from the same inputs; outputs that differ are a race (HostKernelError "race")."""
    global _seeds
    previous, _seeds = _seeds, seeds
    try:
        yield
    finally:
        _seeds = previous


def _guarded(span: int, misalign: int) -> tuple[int, int, int]:
    """(mapping, size, start): `span` bytes of MAP_SHARED memory (lazily materialized) starting at `misalign`
    modulo 16, their end as close to the following PROT_NONE page as that alignment allows."""
    size = -(-(span + 16) // mmap.PAGESIZE) * mmap.PAGESIZE + mmap.PAGESIZE
    flags = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
    base = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if base in (None, ctypes.c_void_p(-1).value):
        raise MemoryError(f"mmap of {size} bytes failed (errno {ctypes.get_errno()})")
    guard = base + size - mmap.PAGESIZE
    _libc.mprotect(guard, mmap.PAGESIZE, 0)  # PROT_NONE
    start = guard - span
    return base, size, start - (start - misalign) % 16


def host_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor in harness memory: launches use it in place, and only the pages a kernel
    touches are ever materialized (a tensor of more than 2^31 elements costs the rows a test runs)."""
    span = max(1, torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
    base, size, start = _guarded(span, 0)
    buf = (ctypes.c_char * span).from_address(start)
    weakref.finalize(buf, lambda: (_host_buffers.pop(start, None), _libc.munmap(base, size)))
    _host_buffers[start] = (start + span, base)
    return torch.frombuffer(buf, dtype=dtype, count=torch.Size(shape).numel()).view(shape)


def _span(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to the end of its last."""
    if t.numel() == 0:
        return 0
    return (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()


class _Args:
    """A launch's arguments as the kernel's parameters: tensors copied into guarded shared memory (or used
    in place when they already live there), integers as long long, numpy.float32 as float."""

    def __init__(self, args, names):
        self.names, self.tensors, self.maps, self.values = names, [], [], []
        for name, a in zip(names, args):
            if isinstance(a, torch.Tensor):
                if a.device.type != "cpu":
                    raise ValueError(f"cuda_host runs kernels on CPU tensors; {name} is on {a.device}")
                start, span = a.data_ptr(), _span(a)
                if not any(s <= start and start + span <= e for s, (e, _) in _host_buffers.items()):
                    base, size, start = _guarded(max(span, 1), a.data_ptr() % 16)
                    self.maps.append((base, size))
                    self.tensors.append((name, a, start, span))
                self.values.append(ctypes.c_void_p(start))
            elif a is None:
                self.values.append(ctypes.c_void_p(0))
            elif isinstance(a, int):
                self.values.append(ctypes.c_longlong(a))
            else:
                self.values.append(ctypes.c_float(float(a)))
        self.array = (ctypes.c_void_p * len(self.values))(*(ctypes.addressof(v) for v in self.values))

    def load(self):
        for _, t, start, span in self.tensors:
            ctypes.memmove(start, t.data_ptr(), span)

    def snapshot(self) -> list[bytes]:
        return [ctypes.string_at(start, span) for _, _, start, span in self.tensors]

    def store(self, snapshot):
        for (_, t, _, span), data in zip(self.tensors, snapshot):
            ctypes.memmove(t.data_ptr(), data, span)

    def where(self, address: int) -> str:
        """The tensor (and byte offset) an address falls in or just past."""
        for name, _, start, span in self.tensors:
            if start <= address < start + span + mmap.PAGESIZE:
                return f"{name} byte {address - start} (the tensor spans {span} bytes)"
        return "no tensor (dynamic shared memory or a thread's stack)"

    def close(self):
        for base, size in self.maps:
            _libc.munmap(base, size)


@dataclass(eq=False)
class HostFunction:
    """One entry point of a built library, with the attributes of a cupy.RawKernel the launcher uses."""

    lib: ctypes.CDLL
    name: str
    direction: str
    cluster: int
    shared_size_bytes: int
    num_regs: int
    device: HostDevice
    max_dynamic_shared_size_bytes: int | None = field(default=None)

    def _run(self, desc: _LaunchDesc) -> None:
        entry = getattr(self.lib, f"an_host_{self.name}")
        with tempfile.TemporaryFile() as err:
            pid = os.fork()
            if pid == 0:  # the child: its stderr into `err`, then straight out (no Python teardown)
                code = 1
                try:
                    os.dup2(err.fileno(), 2)
                    code = entry(ctypes.byref(desc))
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            err.seek(0)
            message = err.read().decode(errors="replace").strip()
        code = os.waitstatus_to_exitcode(status)
        if code:
            self._raise(code, message)

    def _raise(self, code, message):
        if "misaligned address" in message:  # the alignment sanitizer's report
            line = next(x for x in message.splitlines() if "misaligned address" in x)
            raise HostKernelError("misaligned access", f"{self.name}: {line}")
        kind = ERRORS.get(code, f"exit status {code}")
        message = message.removeprefix(f"{kind}: ")
        found = re.search(r"at address (0x[0-9a-f]+)", message)
        if found and "dynamic shared memory" not in message:
            message += f": {self._args.where(int(found.group(1), 16))}"
        raise HostKernelError(kind, f"{self.name}: {message or 'no message'}")

    def __call__(self, grid, block, args, shared_mem=0):
        (blocks,), (threads,) = grid, block
        total = self.shared_size_bytes + shared_mem
        resident, limiter = resident_blocks(self.num_regs, threads, total, ARCHS[self.device.arch])
        if resident == 0:
            raise HostKernelError("launch rule", f"{self.name}: {threads} threads with {self.num_regs} registers "
                                  f"and {total} bytes of shared memory exceed the SM's {limiter}")
        first = self.device.first_block // self.cluster * self.cluster
        attr = self.max_dynamic_shared_size_bytes
        launch = (blocks, threads, self.cluster, min(first, blocks), shared_mem, self.shared_size_bytes,
                  -1 if attr is None else attr, self.device.smem_optin)
        self._args = _Args(args, ARG_NAMES[self.direction])
        try:
            outputs = None
            for seed in _seeds:
                self._args.load()
                self._run(_LaunchDesc(*launch, seed, self._args.array))
                result = self._args.snapshot()
                if outputs is None:
                    outputs = result
                elif result != outputs:
                    differ = [t[0] for t, a, b in zip(self._args.tensors, outputs, result) if a != b]
                    raise HostKernelError("race", f"{self.name}: {', '.join(differ)} differ between seeds "
                                          f"{_seeds[0]} and {seed}")
            self._args.store(outputs)
        finally:
            self._args.close()


class _HostLaunch:
    """The launcher's `launch` on the CPU: tensors go to the harness as they are."""

    @staticmethod
    def ptr(t):
        return t

    def __call__(self, fn, grid, block, args, smem):
        fn(grid, block, args, shared_mem=smem)


def compile_kernels(pairs, device: HostDevice = HostDevice(), nvcc_registers: bool = False) -> list:
    """Kernels (the backend's calling convention, on CPU tensors) for every (spec, config), from one g++ call.
    Registers and static shared memory (the launch rules, the persistent backward's resident blocks) come from
    the audit's saved report, from nvcc with `nvcc_registers`, else the most the launch bounds allow and the
    arrays the kernel declares."""
    pairs = list(pairs)
    lib = build_library(pairs)
    kernels = []
    for i, ((spec, config), p) in enumerate(zip(pairs, profiles(pairs, device.arch, nvcc_registers))):
        d = spec.direction
        regs, static = (p.registers, p.smem_static) if p else (register_cap(config.threads), static_bytes(lib, i))
        fns = tuple(HostFunction(lib, f"an_{d}_{kind}_{i}", d, cluster_size(config), static, regs, device)
                    for kind in ("vec", "scalar"))
        launcher = CupyLauncher(spec, config, fns, configure_launch(spec, config, fns, device.limits()), _HostLaunch())
        kernels.append(launcher.forward if d == "fwd" else launcher.backward)
    return kernels


def compile_kernel(spec: NormSpec, config: CupyConfig | None = None, device: HostDevice = HostDevice()):
    """One kernel on the CPU (default config: the backend's heuristic)."""
    return compile_kernels([(spec, config or CupyConfig.heuristic(spec))], device)[0]
