"""Self-tests of the CPU harness of the CUDA C++ kernels (autonorm/cuda_host.py): rendered kernels broken on
purpose, one defect each, and what the harness reports. Each broken kernel is the rendered source with one
line changed; the unbroken kernel passes the same check."""
from __future__ import annotations

import shutil

import pytest

from autonorm import cuda_host, cuda_host_build, verify
from autonorm.backends.base import poisoned_outputs
from autonorm.backends.cupy import CupyConfig, CupyLauncher
from autonorm.render import Source
from autonorm.spec import NormSpec

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ builds the CUDA C++ for the CPU")

# Rows of 4096 fp32 spanning 8 warps (a block-wide reduction through shared memory).
RMS_FWD = NormSpec("rmsnorm", "fwd", "float32", "float32", 4096)
LN_FWD = NormSpec("layernorm", "fwd", "float32", "float32", 4096, bias=True)
REGISTERS = CupyConfig(threads=256, vec=4, rows=1, unroll=1, row_cache="registers", partials_per_sm=1,
                       partials="registers")
CHUNKED = REGISTERS.replace(row_cache="none")
CLUSTER8 = REGISTERS.replace(threads=128, row_cache="cluster8")
# The backward with the next row's x and dy copied into shared memory by cp.async.
PREFETCH_SPEC = NormSpec("rmsnorm", "bwd", "float16", "float16", 4096)
PREFETCH = CupyConfig(threads=256, vec=4, rows=2, unroll=2, row_cache="shared", partials_per_sm=1,
                      partials="registers", prefetch=1)
SEEDS = tuple(range(6))
FIRST_BARRIER = "__syncthreads();  // the previous reduction's readers are done with `red`"


def _break(monkeypatch, old: str, new: str):
    """Render every kernel with the first `old` replaced by `new` (which must be there)."""
    real = cuda_host_build.render

    def render(*args, **kwargs):
        source = real(*args, **kwargs)
        assert old in source.text, old
        return Source.of(source.text.replace(old, new, 1), source.template)

    monkeypatch.setattr(cuda_host_build, "render", render)


def _run(spec, config, rows=5, seeds=(0,), strided=False):
    with poisoned_outputs(), cuda_host.schedules(*seeds):
        return verify.check_kernel(spec, cuda_host.compile_kernel(spec, config), rows, strided=strided)


def test_correct_kernels_agree_across_seeds():
    assert _run(LN_FWD, REGISTERS, seeds=SEEDS).ok
    assert _run(PREFETCH_SPEC, PREFETCH, rows=9, seeds=SEEDS).ok


def test_removed_barrier_is_a_race(monkeypatch):
    """Without the barrier before a reduction writes its shared slots, a warp may overwrite the previous
    reduction's sums (the LayerNorm mean) before a slower warp has read them: the schedule decides the result."""
    _break(monkeypatch, FIRST_BARRIER, "")
    with pytest.raises(cuda_host.HostKernelError, match="differ between seeds") as err:
        _run(LN_FWD, REGISTERS, seeds=SEEDS)
    assert err.value.kind == "race"


def test_missing_cp_async_wait_reads_poison(monkeypatch):
    assert _run(PREFETCH_SPEC, PREFETCH, rows=9).ok
    _break(monkeypatch, "an_cp_async_wait();  // this row's copies", "//")
    result = _run(PREFETCH_SPEC, PREFETCH, rows=9)
    assert result.errors["dx"] == float("inf")  # NaN (rel_l2 says inf): the poisoned copy had not landed


def test_missing_cluster_exit_barrier(monkeypatch):
    """A block of a cluster exits while the others may still read its partial statistics."""
    assert _run(RMS_FWD, CLUSTER8, rows=3, seeds=SEEDS).ok
    _break(monkeypatch, "an_cluster_wait();  // every block of the cluster is done reading", "//")
    with pytest.raises(cuda_host.HostKernelError, match="which has exited") as err:
        _run(RMS_FWD, CLUSTER8, rows=3, seeds=SEEDS)
    assert err.value.kind == "exited cluster block"


def test_out_of_bounds_tail_hits_the_guard_page(monkeypatch):
    """A loop one vector too long reads past the end of the last row of x."""
    _break(monkeypatch, "j < NV; j += TPR) {", "j <= NV; j += TPR) {")
    with pytest.raises(cuda_host.HostKernelError, match=r"x byte 819\d\d \(the tensor spans 81920 bytes") as err:
        _run(RMS_FWD, CHUNKED, rows=5)
    assert err.value.kind == "memory fault"


def test_out_of_bounds_dynamic_shared_memory(monkeypatch):
    """The same loop with the row cached in shared memory writes past the block's dynamic shared memory."""
    _break(monkeypatch, "j < NV; j += TPR) {", "j <= NV; j += TPR) {")
    with pytest.raises(cuda_host.HostKernelError, match="past the dynamic shared memory of block 0"):
        _run(RMS_FWD, CHUNKED.replace(row_cache="shared"), rows=5)


def test_misaligned_vector_access(monkeypatch):
    """The vector entry point on rows whose stride is no multiple of VEC: a packed 16-byte access off its
    alignment (the launcher picks the scalar entry point there; here it is forced)."""
    monkeypatch.setattr(CupyLauncher, "_pick", lambda self, xs, ws: self.vec_fn)
    with pytest.raises(cuda_host.HostKernelError, match="misaligned address") as err:
        _run(RMS_FWD, REGISTERS, rows=3, strided=True)
    assert err.value.kind == "misaligned access"


def test_thread_leaving_a_barrier_is_a_deadlock(monkeypatch):
    _break(monkeypatch, FIRST_BARRIER, "if (threadIdx.x == 0) return v;\n" + FIRST_BARRIER)
    with pytest.raises(cuda_host.HostKernelError, match=r"exits while \d+ threads wait at __syncthreads") as err:
        _run(RMS_FWD, REGISTERS)
    assert err.value.kind == "deadlock"


def test_barrier_reached_from_two_lines(monkeypatch):
    _break(monkeypatch, FIRST_BARRIER, "if (threadIdx.x < 32) {\n__syncthreads();\n} else {\n__syncthreads();\n}")
    with pytest.raises(cuda_host.HostKernelError, match="wait at __syncthreads of line") as err:
        _run(RMS_FWD, REGISTERS)
    assert err.value.kind == "barrier divergence"


def test_launch_rules():
    """What a GPU refuses to launch: over 48 KiB of static + dynamic shared memory without the opt-in, an
    opt-in over the device's maximum, registers x threads over the SM's register file."""
    spec = NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 12288)  # 48 KiB dynamic + 128 bytes static
    kernel = cuda_host.compile_kernel(spec)
    launcher = kernel.__self__
    inputs = verify.make_inputs(spec, 3)
    fns = (launcher.vec_fn, launcher.scalar_fn)
    assert _run(spec, CupyConfig.heuristic(spec), rows=3).ok
    for fn in fns:
        fn.max_dynamic_shared_size_bytes = None  # as if the launcher had not opted in
    with pytest.raises(cuda_host.HostKernelError, match="exceed 48 KiB without the opt-in") as err:
        kernel(*inputs.args(spec))
    assert err.value.kind == "launch rule"
    for fn in fns:
        fn.max_dynamic_shared_size_bytes = 227 * 1024
    with pytest.raises(cuda_host.HostKernelError, match="exceed the device's 232448 a block"):
        kernel(*inputs.args(spec))
    for fn in fns:
        fn.max_dynamic_shared_size_bytes, fn.num_regs = 49152, 72  # 72 x 1024 threads > 65536 registers
    with pytest.raises(cuda_host.HostKernelError, match="exceed the SM's registers"):
        kernel(*inputs.args(spec))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc counts the registers")
def test_registers_from_nvcc():
    """The launch rule and the resident blocks with the registers ptxas gives the kernel (the audit's saved
    report covers only the standard grid's heuristics), not the 255 its launch bounds would allow."""
    spec = NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 4096, bias=True)
    config = CupyConfig(threads=256, vec=8, rows=1, unroll=1, row_cache="registers", partials_per_sm=8,
                        partials="registers")
    kernel = cuda_host.compile_kernels([(spec, config)], nvcc_registers=True)[0]
    regs = kernel.__self__.vec_fn.num_regs
    assert 16 < regs < 255
    assert kernel.__self__.max_blocks == 132 * min(8, 65536 // (256 * -(-regs // 8) * 8))
    with poisoned_outputs():
        assert verify.check_kernel(spec, kernel, 3).ok
