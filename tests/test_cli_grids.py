"""`autonorm grids` prints the grids of autonorm/grids.py as data for shell loops."""
import json

from autonorm.cli import main
from autonorm.grids import QUICK, STANDARD


def test_summary_counts_the_grid(capsys):
    assert main(["grids", "summary", "--grid", "quick"]) == 0
    out = capsys.readouterr().out
    assert f"{len(QUICK.specs())} specs" in out and f"{len(QUICK.bench_cases())} bench cases" in out


def test_tune_batches_are_json_lines_that_skip_recorded_studies(capsys, tmp_path):
    assert main(["grids", "tune-batches", "--grid", "quick"]) == 0
    batches = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert batches == QUICK.tune_batches()
    # A database that holds every row count of the first batch's first hidden size takes it out.
    first = batches[0]
    rows = first["rows"].split(",")
    keys = [{"op": first["ops"], "direction": first["directions"], "x_dtype": first["dtypes"],
             "w_dtype": first["dtypes"], "features": "weight", "hidden": int(first["hidden"].split(",")[0]),
             "rows_bucket": int(r)} for r in rows]
    db = tmp_path / "db.json"
    db.write_text(json.dumps({"records": [{"key": k} for k in keys]}))
    assert main(["grids", "tune-batches", "--grid", "quick", "--skip-recorded", str(db)]) == 0
    skipped = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sum(b["studies"] for b in skipped) == sum(b["studies"] for b in batches) - len(rows)
    assert skipped[0]["hidden"] == first["hidden"].split(",", 1)[1]


def test_bench_cases_name_every_case(capsys):
    assert main(["grids", "bench-cases"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(STANDARD.bench_cases())


def test_unknown_grid_is_a_usage_error(capsys):
    assert main(["grids", "summary", "--grid", "huge"]) == 2
    assert "invalid choice" in capsys.readouterr().err
