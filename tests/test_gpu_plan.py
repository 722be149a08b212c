"""The dry run of `autonorm tune --budget` for a GPU (autonorm/tune/dry_run.py) on a slice of the standard grid:
the real planner with the recorded compile figures and the scripted CudaTimer protocol; nothing compiled or launched.
"""
import json
import math
from pathlib import Path

import pytest

from autonorm.backends import get_backend
from autonorm.grids import STANDARD
from autonorm.tune import dry_run as dr
from autonorm.tune import plan as planner
from autonorm.tune import transfer
from autonorm.tune.compile_pool import SHAPE_FREE

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "compile-times.json"
SLICE = [(spec, rows) for spec in STANDARD.specs() if spec.hidden == 256 and spec.x_dtype == "float32"
         and spec.op == "rmsnorm" for rows in STANDARD.tune_rows_for(spec.hidden)]  # fwd and bwd, 6 rows each
BACKENDS = {name: get_backend(name) for name in ("triton", "cupy", "numba", "torch")}
H100 = dr.PROFILES["h100-sxm"]


@pytest.fixture(scope="module")
def built():
    return {}  # the slice's spaces, built once for every test here


def _run(budget_s, built, **kw):
    return dr.dry_run(SLICE, BACKENDS, H100, dr.CompileFigures.load(FIGURES), budget_s, built=built, **kw)


def _studies_s(plan):
    return sum(p.search_s + p.finish_s for p in plan.running())


@pytest.mark.parametrize("budget_s", [480.0, 120.0, 20.0])
@pytest.mark.parametrize("which", ["plan", "unburdened"])
def test_the_plan_stays_in_the_budget_and_accounts_for_every_study(budget_s, which, built):
    plan = getattr(_run(budget_s, built), which)
    # each study once, in the order tune_grid runs them: anchors first, each neighbour after its sources
    assert [(p.spec, p.rows) for p in plan.studies] == [SLICE[i] for i in transfer.run_order(transfer.roles(SLICE))]
    assert all(p.role for p in plan.studies)
    # What runs fits what the start-up left; a start-up that spent the whole budget leaves nothing to run.
    assert _studies_s(plan) <= max(0.0, budget_s - plan.spent_s) + 1e-6
    if plan.spent_s >= budget_s:
        assert plan.running() == []
    else:
        assert plan.spent_s + _studies_s(plan) <= budget_s + 1e-6
    for p in plan.studies:
        assert p.status in ("run", "left out")
        if p.status == "left out":
            assert p.why.startswith("its seeds and finish need ")
        else:
            assert p.planned >= p.seeds  # a study that runs times at least its seeds


def test_a_tight_budget_leaves_studies_out_and_a_loose_one_runs_them_all(built):
    loose, tight = _run(3600.0, built).plan, _run(20.0 + planner.END_S, built).plan
    assert all(p.status == "run" for p in loose.studies)
    assert any(p.status == "left out" for p in tight.studies) and tight.running()


def test_the_unburdened_plan_is_the_same_studies_with_only_the_start_up_spent(built):
    run = _run(120.0, built)
    assert run.unburdened.spent_s == dr.STARTUP_S < run.plan.spent_s
    assert all(a is not b for a, b in zip(run.plan.studies, run.unburdened.studies))  # planned apart
    assert [p.floor_s for p in run.unburdened.studies] == [p.floor_s for p in run.plan.studies]
    assert len(run.unburdened.running()) >= len(run.plan.running())  # the space builds before the plan cost little


def test_compile_seconds_are_the_recorded_figures_over_the_cores(built):
    recorded = json.loads(FIGURES.read_text())["backends"]
    figures = dr.CompileFigures.load(FIGURES)
    # Triton and Numba compile in the tuner's process: a batch's marginal config; CuPy's NVRTC, a config alone.
    assert [figures.candidate_s(b) for b in ("triton", "numba", "cupy", "torch")] == [
        recorded["triton"]["marginal_s"], recorded["numba"]["marginal_s"], recorded["cupy"]["alone_s"], 0.0]
    for cores, audit_cached in ((16, False), (4, False), (16, True)):
        run = _run(480.0, built, cores=cores, audit_cached=audit_cached, audit_ahead=False)  # audited per study
        first = {}  # spec -> its first study to run: the one that pays the audit of the spec's seeds
        for p in run.plan.studies:
            first.setdefault(p.spec, p)
            sizes = {b: len(cs) for b, cs in built[p.spec][0].configs.items()}
            # each candidate's own audit compile (a config alone), a study's batch of candidates side by side
            audited = not audit_cached and first[p.spec] is p
            audit_s = {b: recorded[b]["alone_s"] / min(cores, 4) if audited and b != "torch" else 0.0 for b in sizes}
            # and the reference check the compile worker runs on it, over the cores like its compile
            check_s = {b: planner.VERIFY_S / cores if b != "torch" else 0.0 for b in sizes}
            # a spec's later studies: its seeds of row-free backends were compiled by its first
            again = {b: first[p.spec] is not p and b in SHAPE_FREE for b in sizes}
            # Triton: each specialization new to the spec, in a worker (which checks it, when a job runs)
            compiles = {b: 1 for b in sizes}
            compiles["triton"] = run.triton[p.spec, p.rows].workers
            check_s["triton"] *= bool(compiles["triton"])
            expected = sum((0.0 if again[b] else compiles[b] * figures.candidate_s(b) / cores + audit_s[b] + check_s[b])
                           * n for b, n in sizes.items())
            assert p.compile_s == pytest.approx(expected / sum(sizes.values()))


@pytest.mark.parametrize("which", ["plan", "unburdened"])
def test_the_seconds_by_backend_add_up_to_the_plans_own(which, built):
    run = _run(120.0, built)
    plan = getattr(run, which)
    by_backend = run.by_backend(plan)
    assert plan.running() and set(by_backend) == {"triton", "cupy", "numba", "torch"}
    assert sum(c for c, _ in by_backend.values()) == pytest.approx(sum(p.planned * p.compile_s for p in plan.running()))
    assert sum(t for _, t in by_backend.values()) == pytest.approx(sum(p.planned * p.time_s for p in plan.running()))
    assert by_backend["torch"][0] == 0.0  # nothing to compile


def test_the_seeds_are_audited_together_before_the_plan_and_no_study_audits_them_again(built):
    ahead, per_study, warm = _run(480.0, built), _run(480.0, built, audit_ahead=False), _run(480.0, built,
                                                                                         audit_cached=True)
    together = "auditing every spec's seeds together (16 cores)"
    assert not any("audit" in what for what in per_study.spent) and warm.spent.keys() == per_study.spent.keys()
    # the slice's 2 specs: one Triton, one CuPy and one Numba CUDA heuristic each; 2 candidates of a backend
    # over 16 workers are 2 batches of one (audit.run's batches), each a compiler start
    figures = dr.CompileFigures.load(FIGURES)
    batches = [figures.alone_s[b] for b in ("triton", "cupy", "numba")] * 2
    assert figures.together_s({"numba": 40}, 16) == pytest.approx(  # 40 over 16 workers: 3 to a batch
        max((13 * (figures.alone_s["numba"] + 2 * figures.marginal_s["numba"]) + figures.alone_s["numba"]) / 16,
            figures.alone_s["numba"] + 2 * figures.marginal_s["numba"]))
    assert ahead.spent[together] == pytest.approx(max(sum(batches) / 16, max(batches)))
    firsts = {}
    for a, p, w in zip(ahead.plan.studies, per_study.plan.studies, warm.plan.studies):
        firsts.setdefault(a.spec, (a, p, w))
    # the first study of a spec: its seeds' audit is paid in it (per study) or before the plan (ahead); the
    # slice's first studies are anchors, with no seed transferred from another spec to audit
    assert all(p.compile_s > a.compile_s == pytest.approx(w.compile_s) for a, p, w in firsts.values())
    assert not any(ahead.audited.get((a.spec, a.rows)) for a, _, _ in firsts.values())
    assert all(per_study.audited[p.spec, p.rows] > 0 for _, p, _ in firsts.values()) and not warm.audited


def test_a_tiers_transferred_seeds_are_audited_together_and_every_neighbour_pays_its_share(built):
    tiers, first_only = _run(480.0, built), _run(480.0, built, audit_tiers=False)
    figures = dr.CompileFigures.load(FIGURES)
    # the slice's neighbours are its rows buckets off the anchors: one tier, each winner from 1 or 2 sources
    neighbours = [p for p in tiers.plan.studies if p.role != "anchor"]
    moved = {(p.spec, p.rows): p.role.count("N=") for p in neighbours}
    counts = {}
    for p in neighbours:
        sizes = {b: len(cs) for b, cs in tiers.spaces[p.spec].configs.items()}
        for b, n in sizes.items():
            counts[b] = counts.get(b, 0.0) + moved[p.spec, p.rows] * n / sum(sizes.values())
    tier_s = figures.together_s({b: math.ceil(n) for b, n in counts.items()}, 16)
    assert tiers.floor_parts()["audit of the seeds"] == pytest.approx(tier_s)
    for p in neighbours:  # each pays its transferred seeds' share, the spec's later studies too
        assert p.seeds * tiers.audited[p.spec, p.rows] == pytest.approx(tier_s * moved[p.spec, p.rows]
                                                                        / sum(moved.values()))
    # the first study of a spec auditing alone: the slice's are anchors, with nothing transferred
    assert first_only.floor_parts()["audit of the seeds"] == pytest.approx(0.0, abs=1e-9)


def test_the_scripted_timer_spends_cudatimers_windows():
    import inspect

    from autonorm.measure import CudaTimer

    windows = dr.timer_windows("full")
    params = inspect.signature(CudaTimer.__init__).parameters
    assert windows == {k: params[k].default for k in windows} == {"warmup_ms": 25, "rep_ms": 100, "min_reps": 10,
                                                                  "max_reps": 1000}
    flush_us = 2 * H100.l2_bytes / (H100.copy_gbps * 1e3)
    # A 1 ms kernel: 25 warm-up calls fill the 25 ms window, 100 timed repetitions the 100 ms one, each after
    # an L2 flush, plus the 5 calls that size the windows.
    rep_us = flush_us + 1000.0 + dr.HOST_US_PER_REP
    assert dr.measure_s(1000.0, H100, windows) == pytest.approx(((5 + 100) * rep_us + 25 * 1000.0) / 1e6)
    # A 1 us kernel hits the 1,000 repetition cap on both windows.
    rep_us = flush_us + 1.0 + dr.HOST_US_PER_REP
    assert dr.measure_s(1.0, H100, windows) == pytest.approx(((5 + 1000) * rep_us + 1000 * dr.LAUNCH_US) / 1e6)
    # --budget's short windows: the same arithmetic, capped at 200 repetitions and warm-up calls
    short = dr.timer_windows("short")
    assert dr.measure_s(1.0, H100, short) == pytest.approx(((5 + 200) * rep_us + 200 * dr.LAUNCH_US) / 1e6)


def test_the_plan_times_each_candidate_with_the_windows_the_budgeted_run_uses(built):
    short = _run(480.0, built, worker_checks=False).plan.studies[0]
    full = _run(480.0, built, windows="full", worker_checks=False).plan.studies[0]
    assert planner.VERIFY_S < short.time_s < full.time_s


def test_the_finish_and_timing_come_from_the_planners_own_estimate(built):
    # every check in the tuning process: a timing's seconds are the plan's own (Costs.estimate)
    with_baseline = _run(480.0, built, compile_baseline=True, worker_checks=False).plan.studies[0]
    without = _run(480.0, built, worker_checks=False).plan.studies[0]  # as tune --budget: no torch.compile
    assert with_baseline.time_s > planner.VERIFY_S
    assert with_baseline.finish_s - without.finish_s == pytest.approx(planner.COMPILE_BASELINE_S)
    # --budget's finish: its timings re-time checked candidates, with no reference check
    assert without.finish_s == pytest.approx(planner.LIGHT_FINISH_TIMINGS * (without.time_s - planner.VERIFY_S))
    full = _run(480.0, built, light_finish=False, worker_checks=False).plan.studies[0]
    assert full.finish_s == pytest.approx(planner.FINISH_TIMINGS * (full.time_s - planner.VERIFY_S))


def test_a_file_that_is_not_compile_times_is_refused_by_name(tmp_path):
    bad = tmp_path / "ct.json"
    bad.write_text(json.dumps({"backends": {"triton": {"alone_s": 1, "marginal_s": 1, "render_s": 0}}}))
    with pytest.raises(ValueError, match="ct.json: not a compile-times file.*cupy, numba"):
        dr.CompileFigures.load(bad)


def test_each_specs_space_is_built_once_for_its_row_counts_as_tune_grid_does(built):
    run = _run(480.0, built)
    specs = {spec for spec, _ in SLICE}
    assert len(specs) == 2 < len(SLICE)  # fwd and bwd, 6 row counts each
    once = sum(built[spec][1] for spec in specs)
    # two specs: fewer than space.build_spaces sends to the workers, built one after another
    assert run.spent["building each spec's space (one after another, shared by its row counts)"] == pytest.approx(once)


def test_a_grids_spaces_built_over_the_workers_cost_their_cpu_seconds_over_the_cores_and_their_transfer(built):
    from autonorm.tune.space import PARALLEL_MIN_SPECS

    grid = [(spec, rows) for spec in STANDARD.specs()[:PARALLEL_MIN_SPECS] for rows in (1, 4096)]
    kw = dict(built=built, worker_start_s=2.5)
    over, serial = (dr.dry_run(grid, BACKENDS, H100, dr.CompileFigures.load(FIGURES), 480.0, parallel_spaces=p, **kw)
                    for p in (True, False))
    specs = {spec for spec, _ in grid}
    cpu_s, sent_s = sum(built[s][1] for s in specs), sum(built[s][2] for s in specs)
    assert sent_s > 0 and serial.spent["building each spec's space (one after another, shared by its row counts)"] \
        == pytest.approx(cpu_s)
    assert over.spent["building each spec's space (16 workers, shared by its row counts)"] == pytest.approx(cpu_s / 16)
    assert over.spent["sending the spaces back from the workers"] == pytest.approx(sent_s)
    assert over.spent["starting the compile workers (measured here)"] == 2.5
    assert over.plan.spent_s == pytest.approx(serial.plan.spent_s - cpu_s + cpu_s / 16 + sent_s + 2.5)


def test_the_floors_parts_add_up_and_only_the_first_study_of_a_spec_pays_the_audit(built):
    cold, warm = _run(480.0, built, audit_ahead=False), _run(480.0, built, audit_cached=True)
    for run in (cold, warm):
        assert sum(run.floor_parts().values()) == pytest.approx(sum(p.floor_s for p in run.plan.studies))
    assert warm.floor_parts()["audit of the seeds"] == pytest.approx(0.0, abs=1e-9)
    assert cold.floor_parts()["audit of the seeds"] > 0
    compiling = "compiling the seeds (and checking them, in the workers)"
    assert cold.floor_parts()[compiling] == pytest.approx(warm.floor_parts()[compiling])


def test_the_workers_reference_checks_leave_the_timers_path_all_but_torch_eagers(built):
    moved, here = _run(480.0, built).plan.studies[0], _run(480.0, built, worker_checks=False).plan.studies[0]
    # one of the 4 heuristic seeds is torch eager's, checked in the tuning process; the others in the workers
    assert here.time_s - moved.time_s == pytest.approx(planner.VERIFY_S * 3 / 4)
    assert moved.compile_s > here.compile_s


def test_a_specs_later_studies_compile_no_row_free_seeds_again_and_check_them_in_the_tuning_process(built):
    # each study checking its seeds (not taking the verdicts of an earlier study verified at the same rows)
    once, every = _run(480.0, built, shared_checks=False), _run(480.0, built, shape_free=False, shared_checks=False)
    firsts = set()
    for a, b in zip(once.plan.studies, every.plan.studies):
        if a.spec not in firsts:  # the first study of its spec compiles every seed, as before
            firsts.add(a.spec)
            assert (a.compile_s, a.time_s) == (b.compile_s, b.time_s)
        else:  # Numba CUDA's and CuPy's seeds: nothing compiled, their checks (2 of 4 seeds) in the tuning process
            assert a.compile_s < b.compile_s
            assert a.time_s - b.time_s == pytest.approx(planner.VERIFY_S * 2 / 4)
    assert once.compiled_again and not every.compiled_again


def test_a_neighbour_plans_its_sources_winners_torch_eager_and_one_heuristic_a_source(built):
    lean, full = _run(480.0, built), _run(480.0, built, lean_neighbours=False)
    neighbours = 0
    for a, b in zip(lean.plan.studies, full.plan.studies):
        sources = a.role.count("N=")  # "anchor", or "from N=.. R=.., N=.. R=.."
        assert a.seeds == (4 if a.role == "anchor" else sources + 1 + min(sources, 3))
        assert b.seeds == 4 + sources
        neighbours += a.role != "anchor"
    assert neighbours and sum(p.floor_s for p in lean.plan.studies) < sum(p.floor_s for p in full.plan.studies)
    # its transferred seeds are the only ones its study audits: the same seeds, a larger share of fewer
    assert all(lean.audited[k] >= full.audited[k] for k in full.audited)


def test_a_study_verified_at_the_rows_an_earlier_study_of_its_spec_was_checks_nothing_in_the_tuning_process(built):
    from autonorm.verify import verify_rows

    shared, each = _run(480.0, built), _run(480.0, built, shared_checks=False)
    seen, sharing = {}, 0
    for a, b in zip(shared.plan.studies, each.plan.studies):  # in run order
        at = verify_rows(a.rows, a.spec.hidden)
        if at in seen.setdefault(a.spec, set()):  # its seeds' checks: none in the tuning process
            sharing += 1
            assert a.time_s < b.time_s
            # Numba CUDA's, CuPy's, eager's, and Triton's where its classes were warm (no worker job checked it)
            here = 3 + (not shared.triton[a.spec, a.rows].job)
            assert b.time_s - a.time_s == pytest.approx(planner.VERIFY_S * here / 4)
        else:
            assert a.time_s == b.time_s
        seen[a.spec].add(at)
    assert sharing  # the slice's rows 1 to 256 are all verified at the same rows


def test_triton_compiles_each_specialization_class_of_a_spec_once_and_off_the_timers_path(built):
    from autonorm.tune.compile_pool import triton_launches

    by_class, per_rows = _run(480.0, built), _run(480.0, built, triton_classes=False)
    for spec in {spec for spec, _ in SLICE}:
        config = BACKENDS["triton"].heuristic(spec)
        classes = set().union(*(triton_launches(spec, config, rows)[1] for s, rows in SLICE if s == spec))
        ran = [p for p in by_class.plan.studies if p.spec == spec]
        # every specialization compiled once over the spec's studies, all in the workers
        assert sum(by_class.triton[p.spec, p.rows].workers for p in ran) == len(classes)
        assert all(by_class.triton[p.spec, p.rows].here == 0 for p in ran)
        # a study whose classes are all warm submits no job: its Triton seed compiles nothing and is checked in
        # the tuning process (the slice's 16 and 256 rows share 16's classes)
        warm = [p for p in ran if not by_class.triton[p.spec, p.rows].job]
        assert warm and all(by_class.triton[p.spec, p.rows].workers == 0 for p in warm)
        # as before: the same specializations, the timer's classes below 1,031 rows compiled on the timer's path
        before = [per_rows.triton[p.spec, p.rows] for p in per_rows.plan.studies if p.spec == spec]
        assert sum(t.workers + t.here for t in before) == len(classes) and any(t.here for t in before)
        assert all(t.job for t in before)
    floors = [sum(p.floor_s for p in run.plan.studies) for run in (by_class, per_rows)]
    assert floors[0] < floors[1]
