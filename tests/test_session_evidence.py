"""What a GPU session's import makes of its sweep and tune lines: the cost model's rank correlation on the
measured Triton sweep, and the tuned winner against the sweep's best where both ran.

The session folders are written by hand in the phases' line formats (tests/test_gpu_session.py runs the
real dry run); the sweep's keys are real Triton configs of the sweep's spec. No GPU is needed: the space is
enumerated and ranked for the session's device here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autonorm.backends import get_backend
from autonorm.session import importer
from autonorm.session.summary import summary
from autonorm.spec import NormSpec
from autonorm.tune import Candidate, SearchSpace, rank

SPEC = NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 4096)
ROWS = 16384
FEW_ROWS = 256  # fewer programs than an H100 keeps resident: the model's prediction depends on rows per program
DEVICE = {"name": "NVIDIA H100 80GB HBM3", "slug": "nvidia-h100-80gb-hbm3", "kind": "cuda",
          "compute_capability": "9.0", "sm_count": 132, "l2_bytes": 52428800, "memory_bytes": 85e9}
COPY_GBPS = 2900.0
IDENT = {"case": "identity", "status": "ok", "device": DEVICE, "date": "2026-12-07T10:00:00+00:00",
         "versions": {"torch": "2.9", "triton": "3.5"}, "dry_run": False}


def write_lines(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def sweep_line(key: str, median_us: float | None, status: str = "ok", rows: int = ROWS) -> dict:
    line = {"case": key, "phase": "sweep", "candidate": key, "status": status, "spec": SPEC.to_dict(),
            "spec_short": SPEC.short(), "rows": rows, "space": 150, "protocol": {"timer": "cuda-events"}}
    return {**line, "median_us": median_us} if status == "ok" else {**line, "error": "ptxas: out of resources"}


def tune_line(spec: NormSpec, rows: int, backend: str, config: dict, median_us: float, completeness: str) -> dict:
    winner = {"backend": backend, "config": config, "median_us": median_us, "gbps": 1000.0}
    return {"case": f"{spec.short()} rows={rows}", "phase": "tune", "status": "ok", "spec": spec.to_dict(),
            "rows": rows, "record": {"winner": winner, "completeness": completeness}, "trials": 12,
            "failed_count": 0, "completeness": completeness}


def session(folder: Path, sweep: list[dict], tune: list[dict] = ()) -> Path:
    folder.mkdir()
    write_lines(folder / "session.jsonl", [IDENT, {"case": "copy bandwidth", "status": "ok", "copy_gbps": COPY_GBPS,
                                                   "bytes": 1 << 30, "reps": 20}])
    write_lines(folder / "sweep.jsonl", sweep)
    if tune:
        write_lines(folder / "tune.jsonl", list(tune))
    return folder


def triton_space() -> SearchSpace:
    return SearchSpace(SPEC, {"triton": get_backend("triton")}, torch.device("cuda"))


def ranked(rows: int) -> list[Candidate]:
    """The Triton space of the sweep's spec in the cost model's order for the session's H100."""
    return rank.ranked(triton_space(), rows, rank.DeviceFacts.of(DEVICE, COPY_GBPS))


@pytest.fixture(scope="module")
def model_order() -> list[Candidate]:
    return ranked(ROWS)


@pytest.fixture
def table(tmp_path, monkeypatch, capsys):
    """Imports a folder's sweep into its search table: (the table's JSON, what the import printed). The audit's
    pruning verdict (a cross-compile per config, tested with the dry run) is not what these tests look at."""
    monkeypatch.setattr(importer, "pruning_verdict", lambda *_: {"arch": "sm_90", "error": "not audited here"})

    def run(folder: Path) -> tuple[dict, str]:
        path = importer._write_search_table(folder, tmp_path / "docs", {**IDENT}, COPY_GBPS)
        return json.loads(path.read_text()), capsys.readouterr().out
    (tmp_path / "docs").mkdir()
    return run


def test_medians_in_the_models_order_correlate_at_one_and_reversed_at_minus_one(tmp_path, table):
    """At 256 rows a program of two rows leaves SMs idle: the model tells configs apart by the session's SM count."""
    sample = ranked(FEW_ROWS)[::10]  # timed as the model predicts: the fastest first
    failed = sweep_line(sample[1].key, None, status="error", rows=FEW_ROWS)  # a failed config is left out of rho
    sweep = [sweep_line(c.key, 5.0 + i, rows=FEW_ROWS) for i, c in enumerate(sample)]
    doc, out = table(session(tmp_path / "s1", sweep[:1] + [failed] + sweep[1:]))
    ranks = doc["rank_correlation"]
    assert ranks["candidates"] == len(sample) and ranks["model"] == pytest.approx(1.0)
    assert ranks["predicted_times"] == 2 and ranks["verdict"].startswith("verdict: ") and ranks["distance"] < 1.0
    assert f"rank correlation on the sweep: {len(sample)} configs, rho(model) +1.00" in out

    doc, _ = table(session(tmp_path / "s2", [sweep_line(c.key, 50.0 - i, rows=FEW_ROWS) for i, c in enumerate(sample)]))
    assert doc["rank_correlation"]["model"] == pytest.approx(-1.0)
    assert doc["rank_correlation"]["verdict"].startswith("verdict: drop the cost model")


def test_the_distance_column_is_the_heuristics_rho(tmp_path, table):
    """Medians that grow with the distance from the heuristic: rho(distance) is +1 where no two tie; the model,
    which puts programs of one row first at 256 rows, ranks them otherwise."""
    space, heuristic = triton_space(), get_backend("triton").heuristic(SPEC)
    by_distance = {}
    for c in reversed(ranked(FEW_ROWS)):  # the model's last config at each distance
        by_distance.setdefault(rank.heuristic_distance(space, c, heuristic), c)
    sweep = [sweep_line(c.key, 5.0 + d, rows=FEW_ROWS) for d, c in sorted(by_distance.items())]
    doc, _ = table(session(tmp_path / "s", sweep))
    assert len(sweep) >= 3 and doc["rank_correlation"]["distance"] == pytest.approx(1.0)
    assert doc["rank_correlation"]["model"] < 1.0


def test_where_the_model_predicts_one_time_for_every_config_it_gives_no_verdict(tmp_path, model_order, table):
    """The sweep's own rows (16,384) fill an H100's SMs with programs of one row or two: one predicted time."""
    doc, out = table(session(tmp_path / "s", [sweep_line(c.key, 5.0 + i) for i, c in enumerate(model_order[::10])]))
    ranks = doc["rank_correlation"]
    assert ranks["predicted_times"] == 1 and ranks["model"] == pytest.approx(1.0)
    assert ranks["verdict"].startswith("no verdict: the model predicts one time") and "no verdict" in out


def test_the_tuned_winner_is_set_against_the_sweeps_best(tmp_path, model_order, table, capsys):
    best, other = model_order[3], model_order[40]
    sweep = [sweep_line(best.key, 10.0), sweep_line(other.key, 12.0), sweep_line(model_order[80].key, 30.0)]
    layernorm = NormSpec("layernorm", "fwd", "bfloat16", "bfloat16", 4096)
    tune = [tune_line(layernorm, ROWS, "triton", other.config.to_dict(), 8.0, "converged"),
            tune_line(SPEC, ROWS, "triton", other.config.to_dict(), 11.5, "budget")]
    folder = session(tmp_path / "s", sweep, tune)
    doc, out = table(folder)
    tuned = doc["budgeted_tune"]
    assert tuned["ratio"] == pytest.approx(1.15) and tuned["sweep_best_us"] == 10.0 and tuned["winner_us"] == 11.5
    assert tuned["winner_in_sweep"] and tuned["winner_swept_us"] == 12.0 and tuned["completeness"] == "budget"
    assert "(budget): winner 11.5 µs = 1.150x the sweep's best 10.0 µs; the winner is a swept config (12.0" in out
    assert "tuned winner 1.15x the best" in summary(folder)
    assert f"{SPEC.short()} rows={ROWS}: triton 11.5 us 1000 GB/s, 12 trials (0 failed), budget" in summary(folder)

    importer._print_tune_coverage(folder)
    assert capsys.readouterr().out.strip() == (f"gpu_session import: tune covered 2 specs: {layernorm.short()} "
                                               f"rows={ROWS} (converged), {SPEC.short()} rows={ROWS} (budget)")


def test_a_tuned_winner_of_another_backend_is_not_a_swept_config(tmp_path, model_order, table):
    sweep = [sweep_line(c.key, 10.0 + i) for i, c in enumerate(model_order[:3])]
    cupy = {"BLOCK": 256}  # whatever its config: only the key is compared
    doc, out = table(session(tmp_path / "s", sweep, [tune_line(SPEC, ROWS, "cupy", cupy, 9.0, "exhaustive")]))
    tuned = doc["budgeted_tune"]
    assert tuned["ratio"] == pytest.approx(0.9) and not tuned["winner_in_sweep"] and tuned["winner_swept_us"] is None
    assert "the winner is not a swept config" in out


def test_without_a_tune_of_the_sweeps_spec_and_rows_there_is_no_comparison(tmp_path, model_order, table):
    sweep = [sweep_line(c.key, 10.0 + i) for i, c in enumerate(model_order[:3])]
    other_rows = tune_line(SPEC, 4096, "triton", model_order[0].config.to_dict(), 9.0, "budget")
    for name, tune in (("none", []), ("other-rows", [other_rows])):
        folder = session(tmp_path / name, sweep, tune)
        doc, out = table(folder)
        assert "budgeted_tune" not in doc and "tuned " not in out and "tuned winner" not in summary(folder)
        assert doc["rank_correlation"]["candidates"] == 3  # the correlation needs no tune

    folder = tmp_path / "no-sweep"  # a tune without a sweep: nothing to compare, no table
    folder.mkdir()
    write_lines(folder / "tune.jsonl", [other_rows, {**other_rows, "rows": ROWS}])
    assert importer.tuned_vs_sweep(folder) is None
    assert importer._write_search_table(folder, tmp_path, IDENT, COPY_GBPS) is None


def test_a_sweep_with_fewer_than_three_measured_configs_says_so(tmp_path, model_order, table):
    failed = [sweep_line(c.key, None, status="wrong result") for c in model_order[5:8]]
    for name, ok in (("two", model_order[:2]), ("none", [])):
        doc, out = table(session(tmp_path / name, [sweep_line(c.key, 10.0 + i) for i, c in enumerate(ok)] + failed))
        ranks = doc["rank_correlation"]
        assert ranks["candidates"] == len(ok) and "needs at least 3" in ranks["error"] and "model" not in ranks
        assert f"rank correlation on the sweep: {len(ok)} swept configs measured ok" in out
