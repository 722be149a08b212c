"""Measurement: statistics, the CPU protocol's rotating inputs, verify-before-time, the copy probe."""
import pytest
import torch

from autonorm import measure
from autonorm.backends.torch_eager import TorchBackend
from autonorm.spec import NormSpec
from autonorm.verify import check_candidate

SPEC = NormSpec("rmsnorm", "fwd", "float32", "float32", 256)


def test_timing_statistics():
    t = measure.Timing.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_us, t.p20_us, t.p80_us, t.reps) == (3.0, 1.8, 4.2, 5)
    assert measure.Timing.of([7.0]).to_json() == {"median_us": 7.0, "p20_us": 7.0, "p80_us": 7.0}


def test_cpu_timer_rotates_random_inputs_and_reports_quantiles(monkeypatch):
    monkeypatch.setattr(measure, "llc_bytes", lambda: 1 << 20)  # 1 MiB LLC -> several input sets
    seen = []
    eager = TorchBackend().build(None, SPEC, None, "cpu")

    def kernel(*args):
        seen.append(args[0].data_ptr())
        assert args[0].abs().sum() > 0  # random-normal, never zeros
        return eager(*args)

    timer = measure.CpuTimer(warmup_s=0.0, rep_s=0.0, min_reps=8)
    t = timer.measure(SPEC, kernel, 64)
    assert t.reps == 8 and t.p20_us <= t.median_us <= t.p80_us
    n_sets = len(timer._sets[(SPEC, 64)])
    assert n_sets * SPEC.bytes_moved(64) > 2 * (1 << 20) or n_sets == timer.max_sets
    assert len(set(seen)) == n_sets  # every set used, so no repetition finds its inputs cached
    both = timer.interleaved(SPEC, [kernel, eager], 64)
    assert len(both) == 2 and all(x.reps >= 1 for x in both)

def test_cpu_timer_times_every_call_after_a_torch_op_outside_the_window(monkeypatch):
    """Each call is timed as in a torch program (after a torch op), in the search's sampling and the interleaved
    re-timing alike, and the op's time is not the kernel's."""
    events, now = [], [0]

    def fake_ns():
        events.append("clock")
        return now[0]

    def context():
        events.append("context")
        now[0] += 1_000_000  # 1 ms of context: counted, it would show in every sample

    def kernel(*args):
        events.append("kernel")
        now[0] += 2_000  # 2 µs

    timer = measure.CpuTimer(warmup_s=0.0, rep_s=0.0, min_reps=4, max_reps=4, context=context)
    monkeypatch.setattr(measure.time, "perf_counter_ns", fake_ns)
    samples = [timer.measure(SPEC, kernel, 8), *timer.interleaved(SPEC, [kernel, kernel], 8)]
    assert all(t.median_us == t.p80_us == 2.0 for t in samples)
    timed = [i for i, e in enumerate(events) if e == "kernel" and events[i - 1] == events[i + 1] == "clock"]
    assert len(timed) == 4 + 2 * 4 and all(events[i - 2] == "context" for i in timed)


def test_the_default_context_op_splits_over_every_torch_thread():
    """The context op must run on all of torch's intra-op threads (those are the ones that spin afterwards): an
    op of fewer than TORCH_GRAIN elements per thread runs on fewer of them."""
    op = measure.CpuTimer().context
    assert isinstance(op, measure.AfterTorchOp) and op.buffer.numel() >= measure.TORCH_GRAIN * torch.get_num_threads()
    before = op.buffer.clone()
    op()
    assert torch.equal(op.buffer, before + 1)



def test_verify_before_time():
    eager = TorchBackend().build(None, SPEC, None, "cpu")
    assert check_candidate(SPEC, eager, 8, "cpu") is None

    def wrong(*args):
        y, h, mean, rstd = eager(*args)
        return y + 1e-2, h, mean, rstd

    def crash(*args):
        raise RuntimeError("illegal memory access")

    assert "wrong result: y" in check_candidate(SPEC, wrong, 8, "cpu")
    assert check_candidate(SPEC, crash, 8, "cpu") == "RuntimeError: illegal memory access"


def test_copy_bandwidth_and_gbps():
    assert measure.copy_bandwidth("cpu", nbytes=8 << 20, reps=3) > 0
    assert measure.gbps(SPEC, 1000, 1.0) == pytest.approx(SPEC.bytes_moved(1000) / 1e-6 / 1e9)


@pytest.mark.gpu
def test_cuda_timer_flushes_a_buffer_sized_from_l2():
    from autonorm.device import identity

    timer = measure.CudaTimer("cuda")
    assert timer.flush.numel() * 4 == 2 * identity(torch.device("cuda"))["l2_bytes"]
    eager = TorchBackend().build(None, SPEC, None, "cuda")
    t = timer.measure(SPEC, eager, 4096)
    assert t.reps >= timer.min_reps and t.p20_us <= t.median_us <= t.p80_us


@pytest.mark.gpu
def test_cuda_timer_draws_inputs_on_the_device_and_prepares_untimed(monkeypatch):
    host_draws = []
    real_randn = torch.randn

    def spy(*args, **kwargs):
        if torch.device(kwargs.get("device") or "cpu").type != "cuda":
            host_draws.append(args)
        return real_randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", spy)
    timer = measure.CudaTimer("cuda")
    eager = TorchBackend().build(None, SPEC, None, "cuda")
    prepared = []

    def kernel(*args):
        return eager(*args)

    kernel.prepare = lambda: prepared.append(1)
    t = timer.measure(SPEC, kernel, 4096)
    assert host_draws == []  # never a host randn copied over
    args = timer._inputs[(SPEC, 4096)]
    assert all(a.device.type == "cuda" for a in args if isinstance(a, torch.Tensor))
    assert len(prepared) >= t.reps  # once before every timed repetition


def test_llc_bytes_reads_sysfs_and_falls_back_to_64_mib(monkeypatch, tmp_path):
    from autonorm import bench

    # One timing stack: the bench's CPU timer is the tuner's, so it sizes its input sets the same way.
    timer = bench.timer_for(torch.device("cpu"), reps=3, warmup=1)
    assert type(timer) is measure.CpuTimer and timer.n_sets(SPEC, 64) == measure.CpuTimer().n_sets(SPEC, 64)
    assert measure.llc_bytes() > 0

    def no_sysfs(path, *args, **kwargs):
        raise FileNotFoundError(path)

    monkeypatch.setattr("builtins.open", no_sysfs)
    assert measure.llc_bytes() == 64 << 20
