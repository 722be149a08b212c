"""autonorm/bench/report.py on synthetic bench rows: the tables hold the right numbers, plots are PNGs,
missing providers are shown as missing (no GPU needed; no timing)."""
import json
import re
from pathlib import Path

import pytest

from autonorm import cli
from autonorm.bench import report
from autonorm.spec import NormSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COPY = 3000.0


def _row(op, direction, dtype, n, rows, provider, us):
    spec = NormSpec(op, direction, dtype, dtype, n)
    nbytes = spec.bytes_moved(rows)
    gbps = nbytes / (us * 1e-6) / 1e9
    impl = "autonorm[triton]" if provider == "autonorm" else provider
    return {"case": f"{op}.{direction} {dtype} {rows}x{n}", "impl": impl, "provider": provider,
            "spec": spec.to_dict(), "rows": rows, "bytes_moved": nbytes, "median_us": us, "p20_us": us * 0.99,
            "p80_us": us * 1.01, "samples": 100, "gbps": gbps, "pct_copy_bw": 100 * gbps / COPY,
            "device": "nvidia-h100-80gb-hbm3", "date": "2026-11-22T06:00:00+00:00"}


def _doc(rows, skipped=None):
    return {"schema_version": 1, "device": {"name": "NVIDIA H100 80GB HBM3", "slug": "nvidia-h100-80gb-hbm3",
                                            "kind": "cuda", "compute_capability": "9.0", "sm_count": 132,
                                            "l2_bytes": 50 << 20},
            "versions": {"torch": "2.11.0", "autonorm": "0.1.0"}, "date": "2026-11-22T06:00:00+00:00",
            "copy_bandwidth_gbps": COPY, "protocol": {"timer": "cuda events", "l2_flush_bytes": 100 << 20},
            "rows": rows, "skipped": skipped or {}}


@pytest.fixture
def bench_json(tmp_path):
    # rmsnorm fwd bf16: autonorm 2x faster than torch.compile at N=1024, liger missing at N=131072.
    rows = [
        _row("rmsnorm", "fwd", "bfloat16", 1024, 32768, "autonorm", 50.0),
        _row("rmsnorm", "fwd", "bfloat16", 1024, 32768, "torch", 200.0),
        _row("rmsnorm", "fwd", "bfloat16", 1024, 32768, "torch.compile", 100.0),
        _row("rmsnorm", "fwd", "bfloat16", 1024, 32768, "liger", 40.0),
        _row("rmsnorm", "fwd", "bfloat16", 131072, 2048, "autonorm", 400.0),
        _row("rmsnorm", "fwd", "bfloat16", 131072, 2048, "torch", 1000.0),
        _row("rmsnorm", "fwd", "bfloat16", 131072, 2048, "torch.compile", 800.0),
        _row("layernorm", "bwd", "float32", 4096, 4096, "autonorm", 100.0),  # no anchor at all
    ]
    skipped = {"rmsnorm.fwd bfloat16 2048x131072": {"liger": "skipped: failed: RuntimeError: too large",
                                                   "quack": "skipped: quack not importable"}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_doc(rows, skipped)))
    return path


def test_tables_numbers_and_goals(bench_json, tmp_path):
    written = report.write_report([str(bench_json)], str(tmp_path / "out"))
    md_path = tmp_path / "out" / "nvidia-h100-80gb-hbm3.md"
    assert str(md_path) == written[0]
    md = md_path.read_text()
    spec = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 1024)
    gbps = spec.bytes_moved(32768) / 50e-6 / 1e9
    line = next(row for row in md.splitlines() if row.startswith("| 1024 | 32768 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # columns: N, rows, autonorm, torch, torch.compile, liger, x compile, x best anchor
    assert cells[2] == f"{gbps:.0f} ({100 * gbps / COPY:.0f}%)"
    assert cells[6] == "2.00×"                      # 100 / 50
    assert cells[7] == "0.80× (liger)"              # best anchor liger 40 us: 40 / 50
    big = next(row for row in md.splitlines() if row.startswith("| 131072 | 2048 |"))
    bcells = [c.strip() for c in big.strip("|").split("|")]
    assert bcells[5] == "–"                          # liger absent at N=131072
    assert bcells[6] == "2.00×" and bcells[7] == "2.00× (torch.compile)"
    geo = next(row for row in md.splitlines() if row.startswith("| **geomean**"))
    assert "**2.00×**" in geo and f"**{(0.8 * 2.0) ** 0.5:.2f}×**" in geo
    # A table whose cells have no anchor prints dashes, not a crash.
    ln = md[md.index("### layernorm bwd float32"):]
    assert "| 4096 | 4096 |" in ln and "– | – |" in ln.splitlines()[4]
    # Goals: the anchor goal is missed at N=1024 by 20%, the compile geomean (2.0x) is met.
    assert "| ≥ 1.0× the best anchor in every cell | 1/2 cells; worst 0.80× vs liger" in md
    assert "20% slower" in md
    assert "| ≥ 1.2× torch.compile in geometric mean | 2.00× over 2 cells | yes |" in md
    assert "| rmsnorm.fwd bfloat16 2048x131072 | liger | skipped: failed: RuntimeError: too large |" in md


def test_plots_are_pngs(bench_json, tmp_path):
    out = tmp_path / "out"
    written = report.write_report([str(bench_json)], str(out))
    pngs = sorted(p for p in written if p.endswith(".png"))
    assert [p.rsplit("/", 1)[1] for p in pngs] == ["nvidia-h100-80gb-hbm3-layernorm-bwd.png",
                                                  "nvidia-h100-80gb-hbm3-rmsnorm-fwd.png"]
    for p in pngs:
        with open(p, "rb") as f:
            data = f.read()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    md = (out / "nvidia-h100-80gb-hbm3.md").read_text()
    assert "![nvidia-h100-80gb-hbm3-rmsnorm-fwd.png](nvidia-h100-80gb-hbm3-rmsnorm-fwd.png)" in md


def test_later_rows_replace_earlier_and_cli(bench_json, tmp_path):
    """A second file re-measuring a cell wins; `autonorm bench --report --input` measures nothing."""
    again = tmp_path / "again.json"
    again.write_text(json.dumps(_doc([_row("rmsnorm", "fwd", "bfloat16", 1024, 32768, "autonorm", 25.0)])))
    out = tmp_path / "out"
    assert cli.main(["bench", "--report", str(out), "--input", str(bench_json), str(again)]) == 0
    md = (out / "nvidia-h100-80gb-hbm3.md").read_text()
    line = next(row for row in md.splitlines() if row.startswith("| 1024 | 32768 |"))
    assert line.rstrip().endswith("| 4.00× | 1.60× (liger) |")


def test_bad_input_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"records": []}))
    with pytest.raises(ValueError, match="bad.json: not an `autonorm bench --json` file"):
        report.write_report([str(bad)], str(tmp_path / "out"))


@pytest.mark.parametrize("slug", ["../../escaped", "{tmp}/absolute-report", ".hidden", "..", "a/../../b",
                                  "Ünïcode slug!"])
def test_file_names_from_the_input_slug_stay_in_the_report_folder(bench_json, tmp_path, slug):
    # The slug comes from an input file: it must never steer where files are written.
    doc = json.loads(bench_json.read_text())
    doc["device"]["slug"] = slug.replace("{tmp}", str(tmp_path))
    src = tmp_path / "crafted.json"
    src.write_text(json.dumps(doc))
    out = tmp_path / "deep" / "out"
    written = report.write_report([str(src)], str(out))
    assert written
    everything = {p for p in tmp_path.rglob("*") if p.is_file()} - {bench_json, src}
    assert everything == {out / p.name for p in out.iterdir()}, "a file was written outside the report folder"
    for path in map(Path, written):
        assert path.parent == out
        assert re.fullmatch(r"[a-z0-9_-][a-z0-9._-]*", path.name), path.name


def test_report_names_every_bench_provider():
    from autonorm import bench

    assert tuple(bench.PROVIDERS) == report.PROVIDER_ORDER
    assert set(report.ANCHORS) <= set(report.PROVIDER_ORDER) and "autonorm" not in report.ANCHORS
