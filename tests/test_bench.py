"""`autonorm bench` on a tiny grid writes well-formed rows (no timing assertions: CI machines are noisy)."""
import json

import pytest
import torch

from autonorm import bench, cli, measure
from autonorm.bench import providers


def test_bench_json_rows(tmp_path, monkeypatch):
    pytest.importorskip("numba")
    import autonorm

    monkeypatch.setattr(measure, "llc_bytes", lambda: 1 << 20)  # keep the copy-bandwidth buffer small
    monkeypatch.setenv("AUTONORM_BACKEND", "numba-cpu")  # --backend sets it; monkeypatch undoes it
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--shapes", "33x96", "--dtypes", "bf16", "--ops", "layernorm",
                   "--backend", "numba-cpu", "--reps", "3", "--warmup", "1", "--no-compile", "--json", str(out)])
    autonorm.reset()
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == bench.SCHEMA_VERSION
    assert doc["device"]["kind"] == "cpu" and doc["versions"]["torch"] and doc["date"]
    assert doc["copy_bandwidth_gbps"] > 0
    rows = doc["rows"]
    assert {(r["spec"]["direction"], r["impl"]) for r in rows} == {
        (d, i) for d in ("fwd", "bwd") for i in ("autonorm[numba-cpu]", "torch")}
    for r in rows:
        assert r["rows"] == 33 and r["spec"]["hidden"] == 96 and r["spec"]["x_dtype"] == "bfloat16"
        assert 0 < r["p20_us"] <= r["median_us"] <= r["p80_us"] and r["samples"] == 3
        assert r["gbps"] > 0 and r["speedup_vs_torch"] > 0 and r["speedup_vs_compile"] is None
        assert (r["config"] is not None) == r["impl"].startswith("autonorm")


def test_summary_and_shapes():
    assert bench.parse_shape("8192x4096") == (8192, 4096)
    with pytest.raises(ValueError, match="ROWSxHIDDEN"):
        bench.parse_shape("8192")


# --- providers, timers, resume (CPU; no timing assertions) ------------------------------------

def _tiny_args(tmp_path, *extra):
    return ["bench", "--shapes", "17x64", "--dtypes", "fp32", "--ops", "rmsnorm", "--directions", "fwd",
            "--providers", "torch", "--reps", "2", "--warmup", "1", "--copy-bw", "10", *extra]


def test_unknown_provider_lists_known(capsys):
    with pytest.raises(ValueError, match="unknown provider.*nope.*known: autonorm, torch, torch.compile, liger, quack"):
        bench.check_providers(["torch", "nope"])
    assert cli.main(["bench", "--providers", "nope"]) == 2
    assert "autonorm bench: error: unknown provider" in capsys.readouterr().err


def test_gpu_only_providers_are_skipped_with_a_note():
    from autonorm.spec import NormSpec

    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 64)
    impls, choice, notes = bench.build_case(spec, 5, torch.device("cpu"), 1, ["torch", "liger", "quack"])
    assert list(impls) == ["torch"] and choice is None
    assert notes == {"liger": "skipped: Liger runs on GPUs only", "quack": "skipped: quack runs on GPUs only"}


def test_wrong_or_crashing_provider_is_never_timed(monkeypatch):
    from autonorm.spec import NormSpec

    def wrong(spec, sets, device):
        return "wrong", lambda i: sets[i]["x"] * 2, None

    def crash(spec, sets, device):
        raise RuntimeError("no kernel for this shape\nsecond line")

    monkeypatch.setitem(bench.PROVIDERS, "wrong", bench.Provider(wrong, "test"))
    monkeypatch.setitem(bench.PROVIDERS, "crash", bench.Provider(crash, "test"))
    for direction in ("fwd", "bwd"):
        spec = NormSpec("layernorm", direction, "bfloat16", "bfloat16", 96)
        impls, _, notes = bench.build_case(spec, 9, torch.device("cpu"), 2, ["torch", "wrong", "crash"])
        assert list(impls) == ["torch"]
        assert notes["wrong"].startswith("skipped: wrong result (rel. L2 error")
        assert notes["crash"] == "skipped: failed: RuntimeError: no kernel for this shape"


class _ClockedCudaTimer(measure.CudaTimer):
    """CudaTimer's scheduling with a clock that needs no GPU: each call "takes" 1 µs more than the last."""

    def __init__(self):
        self.min_reps, self.max_reps, self.warmup_ms, self.rep_ms = 3, 3, 0.0, 0.0
        self.ticks = 0

    def clock(self, call, set_index):
        prepare = getattr(call, "prepare", None)
        if prepare is not None:
            prepare()
        call(set_index)
        self.ticks += 1
        return float(self.ticks)

    def _reps(self, call):
        return 3


def test_cuda_timer_times_bench_calls_interleaved_on_set_zero():
    """`time_calls` (how bench times providers on a GPU) runs the calls round-robin, each on input set 0."""
    calls = []
    out = _ClockedCudaTimer().time_calls({"a": lambda i: calls.append(("a", i)), "b": lambda i: calls.append(("b", i))},
                                         n_sets=4)
    # Each round: every call once untimed, then once timed; three rounds.
    assert calls == [("a", 0), ("a", 0), ("b", 0), ("b", 0)] * 3
    assert list(out) == ["a", "b"] and out["a"].reps == out["b"].reps == 3
    assert out["a"].median_us < out["b"].median_us  # b was timed after a in every round


def test_liger_rmsnorm_runs_in_place_as_its_users_do(monkeypatch):
    """Liger's default in_place=True overwrites dy with dx: its dy is its own, restored before each timed call."""
    import sys
    import types

    import torch

    seen = {}

    class FakeLigerRMSNorm(torch.autograd.Function):  # Liger's signature and in-place backward
        @staticmethod
        def forward(ctx, x, w, eps, offset=0.0, casting_mode="llama", in_place=True):
            seen["in_place"] = in_place
            ctx.in_place = in_place
            return x * w

        @staticmethod
        def backward(ctx, dy):
            dx = dy.mul_(0.5) if ctx.in_place else dy * 0.5
            return dx, dy.sum(0), None, None, None, None

    module = types.ModuleType("liger_kernel.ops.rms_norm")
    module.LigerRMSNormFunction = FakeLigerRMSNorm
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.rms_norm", module)
    from autonorm.spec import NormSpec

    spec = NormSpec("rmsnorm", "bwd", "float32", "float32", 16)
    sets = bench.make_sets(spec, 4, torch.device("cpu"), 1)
    dy = sets[0]["dy"].clone()
    name, fn, _ = providers._provide_liger(spec, sets, torch.device("cuda"))
    fn(0)
    first = fn(0)[0].clone()  # the second call sees the first call's dx as its dy
    assert seen["in_place"] is True and name == "liger"
    assert torch.equal(sets[0]["dy"], dy)  # the other providers' dy is untouched
    fn.prepare()
    assert torch.equal(fn(0)[0], dy * 0.5) and torch.equal(first, dy * 0.25)

    restored = []
    real_prepare = fn.prepare
    fn.prepare = lambda: (restored.append(1), real_prepare())
    _ClockedCudaTimer().time_calls({"torch": lambda i: None, "liger": fn}, 1)
    assert len(restored) == 3  # before every timed call of Liger, untimed


def test_resume_and_time_limit(tmp_path):
    out = tmp_path / "b.json"
    # Time limit 0: no case starts; exit 3 says cases are left.
    assert cli.main(_tiny_args(tmp_path, "--json", str(out), "--time-limit", "0")) == 3
    assert json.loads(out.read_text())["rows"] == []
    assert cli.main(_tiny_args(tmp_path, "--json", str(out), "--resume")) == 0
    first = json.loads(out.read_text())["rows"]
    assert [(r["case"], r["provider"], r["device"]) for r in first] == [
        ("rmsnorm.fwd float32 17x64", "torch", first[0]["device"])]
    assert first[0]["cache_resident"] and first[0]["pct_copy_bw"] is None  # 17x64 stays in any cache
    # A second shape with --resume measures only the new case and keeps the old row as it was.
    assert cli.main(_tiny_args(tmp_path, "--json", str(out), "--resume", "--shapes", "17x64", "5x32")) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["rmsnorm.fwd float32 17x64", "rmsnorm.fwd float32 5x32"]
    assert rows[0] == first[0]


def test_resume_refuses_another_device(tmp_path, capsys):
    out = tmp_path / "b.json"
    out.write_text(json.dumps({"device": {"slug": "nvidia-h100"}, "rows": []}))
    assert cli.main(_tiny_args(tmp_path, "--json", str(out), "--resume")) == 2
    assert "holds rows of 'nvidia-h100'" in capsys.readouterr().err


# --- the grids -----------------------------------------------------------------------------

def test_the_standard_grid_its_row_counts_and_tune_batches():
    from autonorm import grids

    g = grids.STANDARD
    assert g.hidden == (256, 512, 768, 1024, 2048, 4096, 5120, 8192, 12288, 16384, 32768, 65536, 131072, 262144)
    assert set(g.ops) == {"rmsnorm", "layernorm"} and set(g.directions) == {"fwd", "bwd"}
    assert set(g.dtypes) == {"bfloat16", "float16", "float32"}
    assert min(g.tune_rows) == 1 and max(g.tune_rows) >= 32768
    assert g.tune_rows_for(4096)[-1] == 32768
    assert g.tune_rows_for(262144) == (1, 16, 256, 1024)  # capped at 2^28 elements, cap itself included
    assert g.bench_rows_for(256) == 32768 and g.bench_rows_for(262144) == 1024
    # The tune batches cover every (spec, rows) study exactly once.
    studies = [(b["ops"], b["directions"], b["dtypes"], int(n), int(r)) for b in g.tune_batches()
               for n in b["hidden"].split(",") for r in b["rows"].split(",")]
    want = [(s.op, s.direction, s.x_dtype, s.hidden, r) for s in g.specs() for r in g.tune_rows_for(s.hidden)]
    assert sorted(studies) == sorted(want) and len(set(studies)) == len(studies)
    assert set(grids.QUICK.specs()) <= set(g.specs())
    # Studies a database holds drop out of their batch (rows 1 and 4096 of N=1024 here: N=1024 is left
    # out and its batch keeps the rest); the batch id stays.
    q = grids.QUICK
    rec = frozenset({("rmsnorm", "fwd", "bfloat16", 1024, 1), ("rmsnorm", "fwd", "bfloat16", 1024, 4096),
                     ("rmsnorm", "fwd", "bfloat16", 4096, 4096)})
    first = q.tune_batches(rec)[0]
    assert (first["id"], first["hidden"], first["rows"], first["studies"]) == (
        q.tune_batches()[0]["id"], "4096,65536", "1,4096", 4)
    with pytest.raises(ValueError, match="unknown grid 'huge'; known: standard, quick"):
        grids.get("huge")


def test_recorded_studies_from_a_database(tmp_path):
    from autonorm import grids

    key = {"op": "rmsnorm", "direction": "fwd", "x_dtype": "bfloat16", "w_dtype": "bfloat16",
           "features": "weight", "hidden": 1024, "rows_bucket": 4096}
    other = {**key, "w_dtype": "float32"}  # an fp32-weight record is another study
    db = tmp_path / "db.json"
    db.write_text(json.dumps({"records": [{"key": key}, {"key": other}]}))
    assert grids.recorded_studies(str(db)) == {("rmsnorm", "fwd", "bfloat16", 1024, 4096)}
    db.write_text('{"records": [')  # truncated: skips nothing (the tuner reports it)
    assert grids.recorded_studies(str(db)) == frozenset()
    assert grids.recorded_studies(str(tmp_path / "missing.json")) == frozenset()


def test_the_autonorm_provider_times_the_kernel_the_key_settles_on(tmp_path, monkeypatch):
    """A kernel no tuning run verified is checked at its first call; the bench makes that call before it binds
    the kernel it times, so it times the bare kernel (not the check's stand-in) under the backend that serves."""
    pytest.importorskip("numba")
    import autonorm
    from autonorm import first_use
    from autonorm.spec import NormSpec

    monkeypatch.setattr(first_use, "verdict_path", lambda key: tmp_path / f"{key}.json")  # no verdict known yet
    autonorm.reset()
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 96)
    sets = providers.make_sets(spec, 17, torch.device("cpu"), 2)
    try:
        impl, fn, choice = providers.PROVIDERS["autonorm"].build(spec, sets, torch.device("cpu"))
        assert choice.rung == "heuristic" and impl == f"autonorm[{choice.backend}]"
        assert not isinstance(choice.kernel, first_use.FirstUseCheck)
        assert fn.__closure__ and any(c.cell_contents is choice.kernel for c in fn.__closure__)
    finally:
        autonorm.reset()
