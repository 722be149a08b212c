"""`autonorm bench` on a tiny grid writes well-formed rows (no timing assertions: CI machines are noisy)."""
import json

import pytest

from autonorm import bench, cli


def test_bench_json_rows(tmp_path, monkeypatch):
    pytest.importorskip("numba")
    import autonorm

    monkeypatch.setattr(bench, "llc_bytes", lambda: 1 << 20)  # keep the copy-bandwidth buffer small
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
    t = bench.summarize([5000, 1000, 3000, 2000, 4000])
    assert (t.median_us, t.p20_us, t.p80_us, t.samples) == (3.0, 1.8, 4.2, 5)
    assert bench.parse_shape("8192x4096") == (8192, 4096)
    with pytest.raises(ValueError, match="ROWSxHIDDEN"):
        bench.parse_shape("8192")
