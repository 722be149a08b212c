"""The GPU session (scripts/gpu_session.py over autonorm.session) on the CPU: the budget's shares and what a
phase process's end means, the dry run walking every phase and writing the session's files, a cut or
interrupted run keeping its finished cases and still printing the summary last, the import turning the
files into a valid database, the report and the search table, and the on-device check through verify."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from autonorm.session import driver
from autonorm.session.driver import Session
from autonorm.session.records import EXIT_CONTEXT_LOST, EXIT_OUT_OF_SHARE

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_session.py"
FILES = ["bench.jsonl", "session.jsonl", "session.log", "smoke.jsonl", "sweep.jsonl", "tune.jsonl", "variants.jsonl"]
ALL_PHASES = ["env", "smoke-triton", "smoke-cupy", "smoke-numba", "bench", "variants", "tune", "sweep"]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def session(out, *args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("triton")
    pytest.importorskip("optuna")
    out = tmp_path_factory.mktemp("session")
    started = time.monotonic()
    # A budget far above the default: on a loaded machine the default's shares cut the interpreter's phases,
    # and the dry run ends when its last phase is done, so the larger budget costs nothing.
    r = session(out, "--dry-run", "--budget", "3000", timeout=1500)
    return out, r, time.monotonic() - started


@pytest.mark.slow
def test_dry_run_walks_every_phase(dry_run):
    out, r, seconds = dry_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == FILES  # at most 7 files, always the same
    events = [e for e in lines(out / "session.jsonl") if e.get("event") == "phase"]
    assert [(e["phase"], e["status"]) for e in events] == [(p, "done") for p in ALL_PHASES]
    identity = next(e for e in lines(out / "session.jsonl") if e["case"] == "identity")
    assert identity["dry_run"] and identity["device"]["slug"].startswith("dry-run-")
    assert identity["versions"]["triton_default_fp_fusion"] == "1"

    smoke = lines(out / "smoke.jsonl")
    triton = [s for s in smoke if s["backend"] == "triton"]
    failed = [s for s in triton if s["status"] != "pass"]
    assert len(triton) >= 30 and not failed, failed
    assert triton[0]["case"] == "rmsnorm.fwd bfloat16 4096x4096"  # named by the GPU size, run small
    assert triton[0]["spec"]["hidden"] < 4096 and triton[-1]["case"].startswith("rmsnorm.bwd bfloat16 655360x4096")
    assert any(s["strided"] and s["spec"]["residual"] and s["spec"]["w_dtype"] == "float32" for s in triton)
    assert [s["status"] for s in smoke if s["backend"] == "cupy"] == ["unavailable"]  # no GPU: one line, a reason

    bench = lines(out / "bench.jsonl")
    assert [c["case"].split()[0] for c in bench] == ["rmsnorm.fwd", "rmsnorm.bwd", "layernorm.fwd", "layernorm.bwd"]
    impls = {r["impl"]: r for r in bench[1]["rows_out"]}
    assert {"torch", "copy", "autonorm[triton]"} <= set(impls) and impls["autonorm[triton]"]["provider"] == "autonorm"
    assert "liger" in bench[1]["skipped"] and all(r["gbps"] > 0 for r in impls.values())

    variants = lines(out / "variants.jsonl")
    ran = [v for v in variants if v["backend"] in ("triton", "numba")]
    assert len(ran) == 8 and all(v["status"] == "ok" and v["speedup"] > 0 and v["variant"] != v["heuristic"]
                                 for v in ran), ran
    assert {v["status"] for v in variants if v["backend"] == "cupy"} == {"unavailable"}
    assert "variants (speedup over the heuristic" in r.stdout

    tune = lines(out / "tune.jsonl")
    assert len(tune) == 4 and all(t["status"] == "ok" and t["record"]["winner"] for t in tune)
    assert all(t["completeness"] in ("exhaustive", "converged", "budget") for t in tune)
    assert "plan: budget" in (out / "session.log").read_text()  # the budgeted tuner planned the phase
    sweep = lines(out / "sweep.jsonl")
    assert len(sweep) == 3 and all(s["status"] == "ok" and s["median_us"] > 0 for s in sweep)
    assert sweep[0]["space"] > len(sweep)  # the whole space's size, though the dry run measures three

    tail = r.stdout.rstrip().splitlines()
    assert tail[-1].startswith("=====") and "autonorm GPU session" in r.stdout.split("[session")[-1]
    assert "smoke triton: " in r.stdout and "tune: 4/4 studies recorded" in r.stdout


@pytest.mark.slow
def test_import_writes_database_report_and_search_table(dry_run, tmp_path):
    from autonorm.backends import get_backend
    from autonorm.db import TuningDB

    out, r, _ = dry_run
    assert r.returncode == 0
    db_dir, docs = tmp_path / "tuning_db", tmp_path / "docs"
    done = subprocess.run([sys.executable, str(SCRIPT), "import", str(out), "--db-dir", str(db_dir), "--docs-dir",
                           str(docs)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    repo = tmp_path / "repo"
    repo.mkdir()
    refused = subprocess.run([sys.executable, str(SCRIPT), "import", str(out)], capture_output=True, text=True,
                             timeout=300, check=False, cwd=repo)  # into the default tuning_db/: refused
    assert refused.returncode == 2 and "dry run" in refused.stderr and not any(repo.iterdir())
    slug = lines(out / "session.jsonl")[0]["device"]["slug"]
    db = TuningDB.load(db_dir / f"{slug}.json")  # validated on load
    assert len(db.records) == 4 and db.versions["triton"] and db.device["copy_gbps"] > 0
    md = (docs / f"{slug}.md").read_text()
    assert md.startswith("> **Dry run on CPU**") and "## GPU session" in md and "### rmsnorm bwd bfloat16" in md
    assert "| triton | rmsnorm.bwd bfloat16 4096x4096 | pass |" in md and "Versions: " in md
    assert "### Kernel variants against the heuristic" in md and "| rmsnorm bwd 16384x4096 triton prefetch | ok |" in md
    for op in ("rmsnorm", "layernorm"):
        for d in ("fwd", "bwd"):
            assert (docs / f"{slug}-{op}-{d}.png").read_bytes()[:4] == b"\x89PNG"
    table = json.loads((docs / f"search-efficiency-table-{slug}-rmsnorm-bwd-32.json").read_text())
    assert {"spec", "rows", "device", "table", "date", "versions"} <= set(table) and len(table["table"]) == 3
    # The swept configs, audited for the device's architecture (sm_90 for a CPU dry run): kept + pruned = swept.
    verdict = table["pruning"]
    assert verdict["arch"] == "sm_90" and "error" not in verdict, verdict
    assert verdict["kept"] + len(verdict["pruned"]) == 3 and isinstance(verdict["removes_best"], bool)
    assert "audit pruning on sm_90" in done.stdout
    # The keys are tuner candidates, as scripts/search_efficiency.py replays them.
    for key in table["table"]:
        backend, config = json.loads(key)
        get_backend(backend).config_cls.from_dict(config)
    raw = next((docs / "sessions").iterdir())
    assert raw.name.startswith(slug) and sorted(p.name for p in raw.iterdir()) == [f for f in FILES if "jsonl" in f]
    bench = json.loads((docs / f"{slug}-bench.json").read_text())
    assert bench["device"]["slug"] == slug and bench["versions"]["torch"] and len(bench["rows"]) >= 12


def test_interrupted_run_keeps_finished_cases_and_prints_the_summary_last(tmp_path):
    pytest.importorskip("triton")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--dry-run",
                             "--phases", "smoke-triton,bench"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    smoke = tmp_path / "smoke.jsonl"
    deadline = time.monotonic() + 240
    while not (smoke.exists() and len(smoke.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # mid-phase: smoke-triton has more cases to go
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    finished = lines(smoke)
    assert 2 <= len(finished) < 30 and all(s["status"] == "pass" for s in finished)
    events = [e for e in lines(tmp_path / "session.jsonl") if e.get("event") == "phase"]
    assert [(e["phase"], e["status"]) for e in events] == [("smoke-triton", "stopped by SIGTERM")]
    after = output.split("autonorm GPU session")[-1]
    assert f"smoke triton: {len(finished)} cases: {len(finished)} pass" in after
    assert "phases: smoke-triton stopped by SIGTERM" in after and output.rstrip().endswith("=" * 100)


def test_budget_cuts_phases_and_the_summary_still_prints(tmp_path):
    # 2.5 s after the summary's reserve: smoke-triton's share (1.5 s) ends before its first case. What
    # smoke-numba gets depends on how soon the triton process gave up (it stops by itself once less than a
    # second is left), so either outcome for it is right; neither may run a case.
    r = session(tmp_path, "--dry-run", "--budget", "7.5", "--phases", "smoke-triton,smoke-numba", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    events = [e for e in lines(tmp_path / "session.jsonl") if e.get("event") == "phase"]
    assert [e["phase"] for e in events] == ["smoke-triton", "smoke-numba"]
    assert events[0]["status"] == "cut at the end of its share" and events[0]["seconds"] < 6
    assert events[1]["status"] in ("cut at the end of its share", "skipped: no time left")
    smoke = tmp_path / "smoke.jsonl"
    assert not (smoke.exists() and lines(smoke))
    assert r.stdout.rstrip().endswith("=" * 100) and "copy bandwidth: not measured" in r.stdout


def test_a_budget_under_the_summary_reserve_skips_every_phase(tmp_path):
    # 0.5 s after the reserve: each share is under a second, whatever the machine's speed.
    r = session(tmp_path, "--dry-run", "--budget", "5.5", "--phases", "smoke-triton,smoke-numba", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    events = [e for e in lines(tmp_path / "session.jsonl") if e.get("event") == "phase"]
    assert [(e["phase"], e["status"]) for e in events] == [("smoke-triton", "skipped: no time left"),
                                                           ("smoke-numba", "skipped: no time left")]
    assert r.stdout.rstrip().endswith("=" * 100)


def test_import_of_a_folder_without_the_env_phase_names_the_problem_and_writes_nothing(tmp_path):
    (tmp_path / "in").mkdir()
    r = subprocess.run([sys.executable, str(SCRIPT), "import", str(tmp_path / "in"), "--db-dir", str(tmp_path / "db"),
                        "--docs-dir", str(tmp_path / "docs")], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1 and "has no device identity" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_unknown_phase_is_named(tmp_path):
    r = session(tmp_path, "--phases", "env,warp-drive", timeout=60)
    assert r.returncode == 2 and "warp-drive" in r.stderr


@pytest.mark.gpu
def test_gpu_session_env_and_triton_smoke_on_the_gpu(tmp_path):
    r = session(tmp_path, "--budget", "150", "--phases", "env,smoke-triton", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    copy = next(e for e in lines(tmp_path / "session.jsonl") if e["case"] == "copy bandwidth")
    assert copy["copy_gbps"] > 100 and copy["bytes"] >= 1 << 30
    smoke = lines(tmp_path / "smoke.jsonl")
    assert smoke and smoke[0]["case"] == "rmsnorm.fwd bfloat16 4096x4096" and smoke[0]["spec"]["hidden"] == 4096


def test_a_phase_that_dies_is_restarted_and_its_case_recorded_as_crashed(tmp_path, monkeypatch):
    session_ = Session(tmp_path, 60.0, True, ["smoke-triton"], ["unused"])
    session_.log = open(tmp_path / "session.log", "a")
    runs = iter([(-11, "rmsnorm.bwd bfloat16 4096x4096"), (0, None)])  # a segfault in a case, then the rest
    monkeypatch.setattr(session_, "_run_child", lambda phase, until: next(runs))
    session_.run_phase("smoke-triton", ["smoke-triton"])
    crashed = lines(tmp_path / "smoke.jsonl")
    assert [(c["case"], c["status"], c["backend"]) for c in crashed] == [
        ("rmsnorm.bwd bfloat16 4096x4096", "crashed", "triton")]
    assert "exit status -11" in crashed[0]["error"]
    event = lines(tmp_path / "session.jsonl")[-1]
    assert (event["phase"], event["status"], event["restarts"]) == ("smoke-triton", "done", 1)


def test_the_tune_phase_is_the_budgeted_tuner_given_the_phases_share(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from autonorm import tune
    from autonorm.session import phases
    from autonorm.session.phase import Phase

    calls = []

    def tune_grid(specs, row_counts, backends, device, options, **kw):  # the first study ends, the rest are left out
        calls.append((specs, options, kw))
        case = f"{specs[0].short()} rows={row_counts[0]}"
        kw["progress"](options.trials, case)
        kw["results"].append(SimpleNamespace(spec=specs[0], rows=row_counts[0], record=None, completeness="budget",
                                             trials=2, measured=0, failed={}, space_size=5, wall_s=0.5))

    monkeypatch.setattr(tune, "tune_grid", tune_grid)
    share = 100.0
    assert phases.phase_tune(Phase("tune", tmp_path, time.time() + share, True))
    (specs, options, kw), = calls
    assert len(specs) == 4 and options.windows == "short" and not options.light_finish  # --budget's, on a CPU
    assert share - phases.BUDGET_MARGIN_S - 1 < kw["budget_s"] <= share - phases.BUDGET_MARGIN_S
    assert kw["elapsed"]() < 1  # the budget counts from the phase's start, not the process's
    written = lines(tmp_path / "tune.jsonl")
    assert [(t["status"], t.get("completeness")) for t in written] == [
        ("no valid candidate", "budget")] + [("left out by the budget", None)] * 3
    assert phases.phase_tune(Phase("tune", tmp_path, time.time() + share, True)) and len(calls) == 1  # all done


def test_a_phase_that_keeps_dying_is_given_up_after_its_restarts(tmp_path, monkeypatch):
    session_ = Session(tmp_path, 60.0, True, ["tune"], ["unused"])
    session_.log = open(tmp_path / "session.log", "a")
    calls = []
    monkeypatch.setattr(session_, "_run_child", lambda phase, until: calls.append(phase) or (-6, "rmsnorm.fwd"))
    session_.run_phase("tune", ["tune", "sweep"])
    assert len(calls) == 1 + driver.MAX_RESTARTS
    assert [c["status"] for c in lines(tmp_path / "tune.jsonl")] == ["crashed"]  # once: the restarts skip it
    event = lines(tmp_path / "session.jsonl")[-1]
    assert (event["status"], event["restarts"], event["last_case"]) == ("exit status -6", 3, "rmsnorm.fwd")


def test_a_share_is_the_phase_weight_part_of_the_time_left_after_the_summary_reserve():
    weights = dict(driver.PHASES)
    total = sum(weights.values())
    left = driver.SUMMARY_RESERVE_S + total
    assert driver.share_of("env", list(driver.PHASE_NAMES), left) == pytest.approx(weights["env"])
    assert driver.share_of("bench", list(driver.PHASE_NAMES), left) == pytest.approx(weights["bench"])
    # Time an earlier phase left unused goes to the later ones, in proportion to their weights.
    later = ["tune", "sweep"]
    share = driver.share_of("tune", later, driver.SUMMARY_RESERVE_S + 70)
    assert share == pytest.approx(70 * weights["tune"] / (weights["tune"] + weights["sweep"]))
    assert driver.share_of("sweep", ["sweep"], driver.SUMMARY_RESERVE_S + 70 - share) == pytest.approx(70 - share)
    assert driver.share_of("sweep", ["sweep"], driver.SUMMARY_RESERVE_S - 1) == 0.0  # never below zero


def test_what_the_end_of_a_phase_process_means():
    assert driver.outcome(0, None, share_over=False) == "done"
    assert driver.outcome(EXIT_OUT_OF_SHARE, None, share_over=False) == "cut at the end of its share"
    assert driver.outcome(-15, None, share_over=True) == "cut at the end of its share"  # killed at its share's end
    assert driver.outcome(-11, None, share_over=False) == "exit status -11"  # died: restarted
    assert driver.outcome(EXIT_CONTEXT_LOST, None, share_over=False) == f"exit status {EXIT_CONTEXT_LOST}"
    assert driver.outcome(-15, "SIGINT", share_over=False) == "stopped by SIGINT"
    assert driver.outcome(0, "SIGTERM", share_over=False) == "stopped by SIGTERM"


def test_unknown_phases_are_named_in_order():
    assert driver.unknown_phases(["env", "warp-drive", "bench", "a"]) == ["a", "warp-drive"]
    assert driver.unknown_phases(list(driver.PHASE_NAMES)) == []


def test_device_errors_catch_a_few_wrong_rows_and_sum_dweight_over_chunks():
    from autonorm import verify
    from autonorm.backends.torch_eager import TorchBackend
    from autonorm.session.phase import device_errors
    from autonorm.spec import NormSpec

    for direction in ("fwd", "bwd"):
        spec = NormSpec("layernorm", direction, "float32", "float32", 64, bias=True)
        inputs = verify.make_inputs(spec, 1000, "cpu", on_device=True)
        outputs = TorchBackend().build(None, spec, None, "cpu")(*inputs.args(spec))
        result = device_errors(spec, inputs, outputs, 16 * 64)  # 63 chunks of 16 rows
        assert result.ok and result.max_error < 1e-5
        assert set(result.errors) == ({"y", "mean", "rstd"} if direction == "fwd" else {"dx", "dweight", "dbias"})
        # The whole tensor, compared at once: the same verdict as verify's own check.
        assert verify.compare(spec, inputs, outputs).ok
        outputs[0][500] += 0.01  # one wrong row of 1000: 3e-4 over the whole tensor, 2.5e-3 in its chunk
        assert device_errors(spec, inputs, outputs, 16 * 64).errors["y" if direction == "fwd" else "dx"] > 1e-3
    missing = device_errors(spec, inputs, (outputs[0], outputs[1], None), 16 * 64)
    assert missing.errors["dbias"] == float("inf") and not missing.ok
    rms = NormSpec("rmsnorm", "bwd", "float32", "float32", 64)
    rms_inputs = verify.make_inputs(rms, 100, "cpu")
    dx, dweight, _ = TorchBackend().build(None, rms, None, "cpu")(*rms_inputs.args(rms))
    extra = device_errors(rms, rms_inputs, (dx, dweight, torch.ones(64)), 16 * 64)  # a dbias RMSNorm has not
    assert extra.errors["dbias"] == float("inf") and extra.errors["dx"] < 1e-5


def test_device_errors_fail_a_wrong_dweight_that_no_single_chunk_shows():
    from autonorm import verify
    from autonorm.backends.torch_eager import TorchBackend
    from autonorm.session.phase import device_errors
    from autonorm.spec import NormSpec

    spec = NormSpec("rmsnorm", "bwd", "float32", "float32", 64)
    inputs = verify.make_inputs(spec, 300, "cpu", on_device=True)
    dx, dweight, dbias = TorchBackend().build(None, spec, None, "cpu")(*inputs.args(spec))
    first_chunk = verify.expected_outputs(spec, verify.Inputs(
        inputs.x[:16], inputs.weight, None, None, inputs.dy[:16], None, inputs.mean, inputs.rstd[:16]))["dweight"]
    wrong = dweight - first_chunk.to(dweight.dtype)  # the sum of every chunk but the first
    assert device_errors(spec, inputs, (dx, dweight, dbias), 16 * 64).ok
    assert not device_errors(spec, inputs, (dx, wrong, dbias), 16 * 64).ok
