"""CuPy backend: raw CUDA C++ rendered from templates/cupy, compiled by NVRTC via cupy.RawModule.

Kernels launch on torch's current stream with torch's raw device pointers: no DLPack
conversion per call. The geometry (threads, rows per block, vector width, row cache)
is rendered into the source as constants (`cupy_config.py`); row counts, strides, eps and
offset stay runtime arguments, so one compiled module serves every batch size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from autonorm.hardware import Arch, device_arch, resident_blocks
from autonorm.spec import ITEMSIZE, NormSpec

from .base import Backend, CurrentStream, backward_outputs, forward_outputs, sum_partials
from .cupy_config import (
    C_TYPES,
    SMEM_WITHOUT_OPT_IN,
    CupyConfig,
    cdiv,
    cluster_size,
    dynamic_smem,
    geometry,
    partials_smem_offset,
    required_feature,
)


@dataclass(frozen=True)
class DeviceLimits:
    """What a launch of these kernels depends on: the SM count (the persistent backward's grid), the largest
    shared memory a block may opt in to, and the per-SM limits of the architecture (blocks resident at once)."""

    sm_count: int
    smem_optin: int
    arch: Arch


def configure_launch(spec: NormSpec, config: CupyConfig, fns, device: DeviceLimits) -> int:
    """Opt the entry points `fns` in to the shared memory the launch needs and return the persistent backward's
    block count. A launch may use 48 KiB of static plus dynamic shared memory without the opt-in
    (cudaFuncAttributeMaxDynamicSharedMemorySize), and static plus the attribute up to the device's maximum;
    `fns` carry `shared_size_bytes` (static), `num_regs` and a settable `max_dynamic_shared_size_bytes`."""
    smem, static = dynamic_smem(spec, config), fns[0].shared_size_bytes
    if static + smem > SMEM_WITHOUT_OPT_IN:
        if static + smem > device.smem_optin:
            raise ValueError(f"cupy config {config.short()} needs {static} + {smem} bytes of static + dynamic shared "
                             f"memory a block; this device allows {device.smem_optin}")
        for fn in fns:
            fn.max_dynamic_shared_size_bytes = smem
    # The persistent backward launches at most the blocks that are resident at once: more
    # would run as a partial last wave (4 launched per SM with 3 resident: the last wave
    # runs on a quarter of the machine).
    resident, _ = resident_blocks(fns[0].num_regs, config.threads, static + smem, device.arch)
    return device.sm_count * max(1, min(config.partials_per_sm, resident))


class CupyBackend(Backend):
    name = "cupy"
    config_cls = CupyConfig
    template_dir = "cupy"
    _version: str | None = None  # computed once: it keys every compile-cache lookup

    def unavailable_reason(self):
        try:
            import cupy
        except ImportError:
            return "cupy is not installed: pip install autonorm[cuda13] (autonorm[cuda12] on a CUDA 12 driver)"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except RuntimeError as exc:  # cupy's CUDARuntimeError: no driver, old driver, no device
            return f"no CUDA device visible to cupy ({exc})"
        if count == 0:
            return "no CUDA device visible to cupy"
        if not torch.cuda.is_available():
            return "torch sees no CUDA device (kernels run on torch tensors)"
        return None

    def version(self):
        if self._version is None:
            import cupy
            try:
                major, minor = cupy.cuda.nvrtc.getVersion()
                self._version = f"cupy-{cupy.__version__}+nvrtc-{major}.{minor}"
            except RuntimeError:  # libnvrtc not found: compiling will say so itself
                self._version = f"cupy-{cupy.__version__}"
        return self._version

    def supports_device(self, device):
        return torch.device(device).type == "cuda"

    def space(self, spec):
        """What the tuner searches: `CupyConfig.menu`, not every valid config (`CupyConfig.space`)."""
        return CupyConfig.menu(spec)

    def template_name(self, spec):
        return f"cupy/{spec.direction}.cu.j2"

    def render_context(self, spec, config):
        return {"geo": geometry(spec, config), "T": C_TYPES[spec.x_dtype], "W": C_TYPES[spec.w_dtype],
                "suffix": "", "headers": True, "partials_offset": partials_smem_offset(spec, config)}

    def build(self, source, spec, config, device):
        import cupy

        if device.type != "cuda":
            raise ValueError(f"cupy kernels run on CUDA tensors, not {device}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        if major * 10 + minor < config.min_compute_capability():
            need, feature = required_feature(config)
            raise ValueError(f"cupy config {config.short()} needs compute capability {need / 10:.1f} ({feature}); "
                             f"this device has {major}.{minor}")
        with cupy.cuda.Device(index):
            # No -arch here: CuPy appends `-arch=sm_<cc>` of the current device itself, capped at
            # what its NVRTC supports (cupy/cuda/compiler.py, _get_arch_for_options_for_nvrtc),
            # and caches the cubin on disk keyed by source, options and arch.
            module = cupy.RawModule(code=source.text, backend="nvrtc", options=("-std=c++17",))
            d = spec.direction
            # get_function returns a cupy.RawKernel, called as kernel(grid, block, args, shared_mem=)
            # (docs.cupy.dev, cupy.RawModule / cupy.RawKernel); it loads on the current device.
            fns = (module.get_function(f"an_{d}_vec"), module.get_function(f"an_{d}_scalar"))
            props = torch.cuda.get_device_properties(index)
            limits = DeviceLimits(props.multi_processor_count,
                                  cupy.cuda.runtime.getDeviceProperties(index)["sharedMemPerBlockOptin"],
                                  device_arch(props))
            max_blocks = configure_launch(spec, config, fns, limits)
        launcher = CupyLauncher(spec, config, fns, max_blocks, _CupyLaunch(index))
        return launcher.forward if d == "fwd" else launcher.backward


class _CupyLaunch:
    """Launches a compiled function on torch's current stream of one device."""

    def __init__(self, index):
        import cupy

        self._cupy, self.index = cupy, index
        self._stream = CurrentStream(lambda handle: cupy.cuda.ExternalStream(handle, index), index)

    @staticmethod
    def ptr(t):
        # CuPy passes a Python int kernel argument as numpy.int64 by value (8 bytes), which is
        # exactly a 64-bit device pointer parameter (cupy/cuda/function.pyx `_pointer`:
        # `isinstance(x, int): x = numpy.int64(x)`); 0 is the null pointer of absent tensors.
        return 0 if t is None else t.data_ptr()

    def __call__(self, fn, grid, block, args, smem):
        with self._cupy.cuda.Device(self.index), self._stream():
            fn(grid, block, args, shared_mem=smem)


class CupyLauncher:
    """Holds one compiled module's functions and launches them on torch tensors through `launch`, which
    turns a tensor into a kernel argument (`launch.ptr`) and runs a function (`launch(fn, grid, block, args,
    smem)`): on the GPU by CuPy, on the CPU by autonorm.cuda_host, with the same grid, entry point and
    shared memory."""

    def __init__(self, spec, config, fns, max_blocks, launch):
        import numpy

        self._f32 = numpy.float32
        self.spec, self.config = spec, config
        self._launch, self._ptr = launch, launch.ptr
        self.vec_fn, self.scalar_fn = fns
        self.max_blocks = max_blocks  # persistent backward: blocks resident on the whole device
        self.block = (config.threads,)
        self.smem = dynamic_smem(spec, config)
        self.cluster = cluster_size(config)  # blocks sharing a row (1: none), fixed per launcher
        # Alignment a vector access needs: x-like tensors VEC elements, weights the same
        # number of (possibly wider) elements, both capped at the 16 bytes of one access.
        self.x_align = min(16, config.vec * spec.x_itemsize)
        self.w_align = min(16, config.vec * ITEMSIZE[spec.w_dtype])

    def _pick(self, xs, ws):
        """The vector entry point when every pointer and row stride allows packed accesses."""
        vec = self.config.vec
        if vec == 1:
            return self.vec_fn
        for t in xs:
            if t is not None and (t.data_ptr() % self.x_align or (t.dim() == 2 and t.stride(0) % vec)):
                return self.scalar_fn
        for t in ws:
            if t is not None and t.data_ptr() % self.w_align:
                return self.scalar_fn
        return self.vec_fn

    def forward(self, x, weight, bias, residual, eps, offset):
        spec, config = self.spec, self.config
        m, n = x.shape
        y, h, mean, rstd = forward_outputs(spec, x)
        if m == 0:
            return y, h, mean, rstd
        fn = self._pick((x, residual, y, h), (weight, bias))
        # Python floats would go as float64 (8 bytes): the kernel takes fp32 scalars.
        args = (self._ptr(x), x.stride(0), self._ptr(residual), residual.stride(0) if residual is not None else 0,
                self._ptr(weight), self._ptr(bias), self._ptr(y), self._ptr(h), self._ptr(mean), self._ptr(rstd),
                m, self._f32(eps), self._f32(offset))
        # A cluster takes one row: its C consecutive blocks (the kernel's __cluster_dims__) split it.
        blocks = m * self.cluster if self.cluster > 1 else cdiv(m, config.rows)
        self._launch(fn, (blocks,), self.block, args, self.smem)
        return y, h, mean, rstd

    def backward(self, dy, x, weight, mean, rstd, dh, offset):
        spec, config = self.spec, self.config
        m, n = x.shape
        dx, dw, db = backward_outputs(spec, x)
        if m == 0:
            return dx, dw, db
        if self.cluster > 1:
            # Clusters of C consecutive blocks share each row; one partial row per cluster.
            partial_rows = min(m, max(1, self.max_blocks // self.cluster))
            blocks = partial_rows * self.cluster
        else:
            blocks = min(cdiv(m, config.rows), self.max_blocks)
            partial_rows = blocks * config.rows
        # Internal scratch, fully written by the kernel (each thread group writes its own row once, or
        # zeroes it first when it adds into it per row).
        part_w = torch.empty((partial_rows, n), dtype=torch.float32, device=x.device) if spec.weight else None
        part_b = torch.empty((partial_rows, n), dtype=torch.float32, device=x.device) if spec.bias else None
        fn = self._pick((dy, x, dh, dx), (weight,))
        args = (self._ptr(dy), dy.stride(0), self._ptr(x), x.stride(0), self._ptr(weight),
                self._ptr(mean), self._ptr(rstd), self._ptr(dh), dh.stride(0) if dh is not None else 0,
                self._ptr(dx), self._ptr(part_w), self._ptr(part_b), m, self._f32(offset))
        if config.partials == "columns":
            # The row sums dx needs (c1, and c2 for LayerNorm), kept from the first pass for the second.
            c12 = torch.empty((2 if spec.is_layernorm else 1) * m, dtype=torch.float32, device=x.device)
            args += (self._ptr(c12),)
        self._launch(fn, (blocks,), self.block, args, self.smem)
        sum_partials(part_w, dw)
        sum_partials(part_b, db)
        return dx, dw, db
