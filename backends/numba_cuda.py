"""Numba CUDA backend: `@cuda.jit` kernels rendered from templates/numba_cuda.

Runs on a CUDA GPU, and on the CPU under Numba's CUDA simulator
(NUMBA_ENABLE_CUDASIM=1), where kernels run as Python threads on numpy views of
CPU tensors (tests only: far too slow to time, and never recorded as performance).

Generated source is written to `<cache_dir>/numba_cuda/<sha256>.py` and imported:
Numba's on-disk cache (`cache=True`) needs a real source file, and a user
debugging a kernel can open the file a traceback points to.

Launch cost: a Numba launch checks and boxes every argument in Python (tens of
µs, several times a Triton or CuPy launch), and each tensor also goes through
`__cuda_array_interface__`. The tuner times whole calls of the callable built
here, so that cost is part of every Numba measurement and small problems are
rightly won by other backends.
"""
from __future__ import annotations

import numpy as np
import torch

from autonorm.hardware import device_arch, resident_blocks
from autonorm.spec import NormSpec

from .base import Backend, CurrentStream, backward_outputs, forward_outputs, import_generated, sum_partials
from .numba_cuda_config import (
    MAX_BLOCK,
    NumbaCudaConfig,
    persistent_blocks_per_sm,
    row_in_registers,
    weight_word_elements,
)

WORD_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # a VEC-element word as one integer


def kernel_signature(spec: NormSpec, vec: int, py_func) -> tuple:
    """Numba types of `_kernel`'s arguments as _Launcher passes them (row tensors as flat arrays of
    VEC-element words, the weight and bias as weight words, statistics and partials by element), for
    compiling a kernel without launching it (the hardware-fit audit, tests)."""
    from numba import types

    scalar = {"float32": types.float32, "float16": types.float16, "bfloat16": types.uint16}

    def words(elements: int, dtype: str, itemsize: int):
        return types.Array(scalar[dtype] if elements == 1 else getattr(types, f"int{elements * itemsize * 8}"), 1, "C")

    row = words(vec, spec.x_dtype, spec.x_itemsize)
    param = words(weight_word_elements(spec, vec), spec.w_dtype, spec.w_itemsize)
    f32, partials = types.Array(types.float32, 1, "C"), types.Array(types.float32, 2, "C")
    kinds = {"x": row, "dy": row, "res": row, "dh": row, "h": row, "y": row, "dx": row, "w": param, "b": param,
             "pw": partials, "pb": partials, "mean_out": f32, "rstd_out": f32, "mean_in": f32, "rstd_in": f32,
             "M": types.int64, "eps": types.float32, "offset": types.float32, "c12": f32}

    def kind(name: str):
        if name in kinds:
            return kinds[name]
        if name.startswith("s"):
            return types.int64  # a row stride (sx, sdy, ...), in words
        raise ValueError(f"_kernel argument {name!r} has no known type")

    code = py_func.__code__
    return tuple(kind(name) for name in code.co_varnames[:code.co_argcount])


def _numba_cuda():
    """numba.cuda, or None when numba-cuda is not installed."""
    try:
        from numba import cuda
    except ImportError:
        return None
    return cuda


def _simulator() -> bool:
    try:
        import numba
    except ImportError:
        return False
    return bool(numba.config.ENABLE_CUDASIM)


class _Launcher:
    """Turns torch tensors into Numba arrays and launches, on a GPU or in the simulator."""

    def __init__(self, device: torch.device, spec: NormSpec, config: NumbaCudaConfig):
        self.cuda = _numba_cuda()
        self.simulated = device.type == "cpu"
        self.device = device
        self.stream = CurrentStream(lambda handle: self.cuda.external_stream(handle), device)  # GPU only
        self.vec = config.vec
        self.word = WORD_DTYPES[config.vec * spec.x_itemsize] if config.vec > 1 else None
        wvec = weight_word_elements(spec, config.vec)
        self.param_word = WORD_DTYPES[wvec * spec.w_itemsize] if wvec > 1 else None
        # The backward's persistent grid (the forward launches a block per row group). The simulator runs
        # blocks one after another: fewer blocks, fewer threads. On a GPU, build() lowers it to the blocks the
        # compiled kernel can keep resident.
        self.max_blocks = 2 if self.simulated else (
            torch.cuda.get_device_properties(device).multi_processor_count * persistent_blocks_per_sm(config))

    def cap_to_resident(self, dispatcher, spec: NormSpec, config: NumbaCudaConfig) -> None:
        """Launch no more blocks an SM than the compiled kernel keeps resident (registers, shared memory):
        the rest would run as a partial second wave. Compiles the kernel for the launcher's argument types."""
        props = torch.cuda.get_device_properties(self.device)
        with self.cuda.gpus[self.device.index or 0]:
            kernel = dispatcher.compile(kernel_signature(spec, config.vec, dispatcher.py_func))
            regs, smem = kernel.regs_per_thread, kernel.shared_mem_per_block
        resident, _ = resident_blocks(regs, config.threads * config.rows, smem, device_arch(props))
        self.max_blocks = props.multi_processor_count * max(1, min(persistent_blocks_per_sm(config), resident))

    def array(self, t: torch.Tensor | None):
        if t is None:
            return None
        t = t.detach()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.uint16)  # kernels read bf16 as its bit pattern
        return t.numpy() if self.simulated else self.cuda.as_cuda_array(t)

    def _as_words(self, flat: torch.Tensor):
        """A 1-D run of row elements as the kernel's word array (VEC elements a word)."""
        return self.array(flat.detach().view(self.word) if self.word is not None else flat)

    def words(self, t: torch.Tensor | None):
        """A contiguous (M, N) output, flat, as words."""
        return None if t is None else self._as_words(t.reshape(-1))

    def rows(self, t: torch.Tensor) -> list:
        """[flat word array, row stride in words] for an (M, N) input with a unit last stride and any row stride.

        Kernels index rows as `a[row * stride + word]` (int64), over a 1-D view that
        spans exactly the rows' elements: no copy on a GPU, and a contiguous
        buffer that the simulator can transfer. A word access needs word-aligned
        rows: a view whose start or row stride is not (a rare slice) is copied once.
        """
        m, n = t.shape
        if n > 1 and t.stride(1) != 1:
            raise ValueError(f"numba kernels need a unit last stride, got strides {t.stride()}")
        stride = t.stride(0) if m > 1 else n
        if stride % self.vec or t.data_ptr() % (self.vec * t.element_size()):
            t, stride = t.clone(memory_format=torch.contiguous_format), n
        span = (m - 1) * stride + n
        return [self._as_words(t.as_strided((span,), (1,))), stride // self.vec]

    def param(self, t: torch.Tensor):
        """The weight or bias as the kernel's weight words: contiguous and word-aligned (a strided or
        offset view, rare for a parameter, is copied)."""
        t = t.detach()
        if self.param_word is None:
            return self.array(t)
        size = self.param_word.itemsize
        if t.stride(0) != 1 or t.data_ptr() % size:
            t = t.clone(memory_format=torch.contiguous_format)
        return self.array(t.view(self.param_word))

    def launch(self, kernel, grid: int, block, *args):
        if self.simulated:
            kernel[grid, block](*args)
            return
        with self.cuda.gpus[self.device.index or 0]:
            kernel[grid, block, self.stream()](*args)


def _forward(module, spec: NormSpec, config: NumbaCudaConfig, launcher: _Launcher):
    a = launcher.array
    block = (config.threads, config.rows)

    def kernel(x, weight, bias, residual, eps, offset):
        m, n = x.shape
        y, h, mean, rstd = forward_outputs(spec, x)
        if m == 0:
            return y, h, mean, rstd
        args = launcher.rows(x)
        if spec.residual:
            args += [*launcher.rows(residual), launcher.words(h)]
        if spec.weight:
            args.append(launcher.param(weight))
        if spec.bias:
            args.append(launcher.param(bias))
        args.append(launcher.words(y))
        if spec.is_layernorm:
            args.append(a(mean))
        args += [a(rstd), m, np.float32(eps), np.float32(offset)]
        launcher.launch(module._kernel, -(-m // config.rows), block, *args)
        return y, h, mean, rstd

    return kernel


def _backward(module, spec: NormSpec, config: NumbaCudaConfig, launcher: _Launcher):
    a = launcher.array
    block = (config.threads, config.rows)
    # Scratch: a row kept in registers, or column-outer partials, write every partial row once;
    # chunked rows add into theirs, so those start at zero.
    scratch = torch.empty if row_in_registers(spec, config) or config.partials == "columns" else torch.zeros

    def kernel(dy, x, weight, mean, rstd, dh, offset):
        m, n = x.shape
        dx, dw, db = backward_outputs(spec, x)
        if m == 0:
            return dx, dw, db
        grid = min(-(-m // config.rows), launcher.max_blocks)
        parts = grid * config.rows
        args = [*launcher.rows(dy), *launcher.rows(x)]
        pw = pb = None
        if spec.weight:
            pw = scratch((parts, n), dtype=torch.float32, device=x.device)
            args += [launcher.param(weight), a(pw)]
            if spec.bias:
                pb = scratch((parts, n), dtype=torch.float32, device=x.device)
                args.append(a(pb))
        if spec.is_layernorm:
            args.append(a(mean))
        args.append(a(rstd))
        if spec.residual:
            args += launcher.rows(dh)
        args += [launcher.words(dx), m, np.float32(offset)]
        if config.partials == "columns":
            # each row's mean(g * x_hat) and mean(g), from the reductions' pass to the column pass
            args.append(a(torch.empty(2 * m, dtype=torch.float32, device=x.device)))
        launcher.launch(module._kernel, grid, block, *args)
        sum_partials(pw, dw)
        sum_partials(pb, db)
        return dx, dw, db

    return kernel


class NumbaCudaBackend(Backend):
    name = "numba"
    config_cls = NumbaCudaConfig
    template_dir = "numba_cuda"

    def unavailable_reason(self) -> str | None:
        cuda = _numba_cuda()
        if cuda is None:
            return "numba-cuda is not installed (pip install autonorm[cuda13], or autonorm[cuda12] on a CUDA 12 driver)"
        if _simulator():
            return None
        if not torch.cuda.is_available():
            return "no CUDA GPU (set NUMBA_ENABLE_CUDASIM=1 to run kernels in Numba's simulator, for tests)"
        if not cuda.is_available():
            return "numba.cuda finds no usable GPU or driver (see `numba -s`)"
        return None

    def version(self) -> str:
        import numba
        try:
            from importlib.metadata import version
            numba_cuda = version("numba-cuda")
        except Exception:  # an unusual install without metadata still has numba's version
            numba_cuda = "?"
        return f"numba-{numba.__version__}+cuda-{numba_cuda}{'+sim' if _simulator() else ''}"

    def supports_device(self, device: torch.device) -> bool:
        device = torch.device(device)
        if device.type == "cuda":
            return torch.cuda.is_available() and not _simulator()
        return device.type == "cpu" and _simulator()

    def template_name(self, spec: NormSpec) -> str:
        return f"numba_cuda/{spec.direction}.py.j2"

    def render_context(self, spec: NormSpec, config: NumbaCudaConfig) -> dict:
        chunk = config.threads * config.items
        nchunk = -(-spec.hidden // chunk)
        # Chunked LayerNorm: given only the block size, ptxas aims at full occupancy (2048 threads an SM, so
        # 32 registers a thread at 512 threads) and spills the chunk loop's state (12-20 bytes, sm_80 and
        # sm_90); one block fewer per SM lifts the cap (42 registers at 512 threads), which fits. Chunked
        # RMSNorm fits without the hint, and with it spills on sm_80 (16-32 bytes at 40 registers), so it
        # gets none. The same holds for a LayerNorm row cached by a 1024-thread block (full occupancy: 2
        # blocks, 32 registers; the 16-bit forward at N=8192 spilled 8 bytes): 1 block, 36 registers
        # (cross-compiled with ptxas 13.4: docs/benchmarks/hardware-fit.md). The bf16 LayerNorm backward with
        # column-outer partials in 3 chunks (N=12288 at 512 x 8) spilled 40 bytes at 42 registers on sm_80 (the
        # compiler unrolls so short a chunk loop), and fits at 54 with one block fewer; at 4+ chunks 42 fit.
        block = config.threads * config.rows
        full = 2048 // block
        hint = spec.is_layernorm and (nchunk > 1 or block == MAX_BLOCK)
        fewer = 2 if config.partials == "columns" and nchunk <= 3 else 1
        return {
            "nchunk": nchunk,
            "min_blocks": max(1, full - fewer) if hint else None,
            "cached": row_in_registers(spec, config),
            "shared_row": config.row_cache == "shared",
            "strides": [config.threads >> i for i in range(1, config.threads.bit_length())],
            "uses_bf16": "bfloat16" in (spec.x_dtype, spec.w_dtype),
            "vec": config.vec,
            "x_itemsize": spec.x_itemsize,
            "wvec": weight_word_elements(spec, config.vec),
            "w_itemsize": spec.w_itemsize,
        }

    def build(self, source, spec, config, device):
        device = torch.device(device)
        if not self.supports_device(device):
            raise ValueError(f"numba backend cannot launch on {device} here "
                             f"({'simulator: cpu only' if _simulator() else 'needs a CUDA device'})")
        module = import_generated(source, self.template_dir)
        launcher = _Launcher(device, spec, config)
        if spec.direction == "bwd" and not launcher.simulated:
            launcher.cap_to_resident(module._kernel, spec, config)
        make = _forward if spec.direction == "fwd" else _backward
        return make(module, spec, config, launcher)
