"""Tuning several specs in a row: the candidate backends of a device, the database they fill.

`tune_grid` is `autonorm tune` without its command line: one `StudyRunner` per
(spec, row count), all with the run's `StudyOptions`, each seeded with every
backend's heuristic and the database's earlier winner for the same key, and the
database saved after every study so that a killed run keeps what it finished (the
studies themselves resume from their storage). `tune_one`, the dispatcher's
tune-on-miss, is `tune_grid` of one spec: the same protocol, the same record.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from .. import measure
from ..db import Record, RecordKey, TuningDB
from ..device import identity, software_versions
from ..errors import BackendUnavailableError, UnknownBackendError
from ..spec import NormSpec, rows_bucket
from . import finalize, fleet, quality, race, rank, transfer
from . import plan as planner
from .compile_pool import CompilePool
from .finalize import StudyResult
from .options import StudyOptions
from .space import Candidate, SearchSpace, audit_together, build_spaces
from .study import StudyRunner, study_name

DEVICE_FIELDS = ("name", "slug", "kind", "compute_capability", "sm_count", "l2_bytes")


def _print_note(text: str) -> None:
    print(f"autonorm tune: {text}", file=sys.stderr)


def native_backends(device: torch.device, requested: list[str] | None = None, note=_print_note) -> dict:
    """Candidate backends that run natively on `device` (interpreter and simulator timings are never
    recorded); each requested one left out is explained through `note`. An unknown name raises
    UnknownBackendError."""
    from ..backends import BACKENDS, DEFAULT_ORDER, get_backend

    native = DEFAULT_ORDER.get(device.type, ("torch",))
    unknown = [n for n in requested or () if n not in BACKENDS]
    if unknown:
        raise UnknownBackendError(f"unknown backend {unknown[0]!r}; known: {', '.join(BACKENDS)}")
    chosen = {}
    for name in requested or list(native):
        if name not in native:
            note(f"skipping {name}: it does not run natively on {device.type} (simulated timings are never recorded)")
            continue
        try:
            backend = get_backend(name)
        except BackendUnavailableError as exc:
            note(f"skipping {name}: {exc}")
            continue
        reason = backend.unavailable_reason()
        if reason is not None:
            note(f"skipping {name}: {reason}")
            continue
        chosen[name] = backend
    return chosen


def protocol(timer, options: StudyOptions) -> dict:
    """How a database's timings were taken, recorded in it and in every study."""
    baselines = "torch eager and torch.compile" if options.compile_baseline else "torch eager"
    return {**timer.describe(),
            "verify": "reference check before timing" if options.verify else "none: a replay of verified timings",
            "finalists": options.finalists,
            "finalists_retimed": (f"interleaved, only those within noise of the winner (none when it is clear), with "
                                  f"{baselines} (eager's search timing when it is clear of the winner)"
                                  if options.light_finish else
                                  f"interleaved in rounds, with {baselines}: a first round of every candidate "
                                  f"within {finalize.CONTENDER_WITHIN}x of the best search median (up to "
                                  f"{finalize.CONTENDERS}), then its fastest {options.finalists} while within noise"),
            "repetitions": (f"raced: {race.FIRST_REPS} first, a clear loser (p20 > best p80 x {1 + race.MARGIN}) no "
                            f"more, a contender doubled until it separates, to the timer's count" if options.race
                            else "the timer's count for every candidate"),
            "quality": f"re-timed up to {quality.RETRIES} more times while p80/p20 > {quality.SPREAD_LIMIT} or "
                       f"re-timing and search differ by > {quality.AGREEMENT_LIMIT}x"}


def _seeds(spec: NormSpec, rows: int, space: SearchSpace, earlier: TuningDB | None, tables: list) -> list:
    """The database's earlier winner for the same key, a record of each database of other GPUs in `tables`
    (`transfer.seed_tables`), then each backend's heuristic seeds (`Backend.seed_configs`): `transfer.Seed`s mapped
    into `space`."""
    prior = earlier.records.get(RecordKey.of(spec, rows_bucket(rows))) if earlier else None
    seeds = [transfer.Seed(Candidate(prior.winner.backend, prior.winner.config), "earlier winner")] if prior else []
    seeds += transfer.from_tables(spec, rows, tables)
    seeds += [transfer.Seed(cand, "heuristic") for cand in heuristic_seeds(space.backends, spec)]
    return transfer.study_seeds(space, seeds)


def heuristic_seeds(backends: dict, spec: NormSpec) -> list[Candidate]:
    """Every backend's seed configs (`Backend.seed_configs`), by rank: each backend's heuristic, then each one's
    second seed, and so on. A study cut to its first batch (two candidates on two workers) has then timed torch
    eager beside the heuristic: with numba-cpu's two seeds first, one recorded numba-cpu's serial launch 1.58x
    slower than the torch eager it never timed."""
    ranked = [[Candidate(name, c) for c in b.seed_configs(spec)] for name, b in backends.items()]
    return [seeds[i] for i in range(max(map(len, ranked), default=0)) for seeds in ranked if i < len(seeds)]


def _lean(device: torch.device) -> bool:
    """Whether a neighbour leaves the heuristics of backends none of its sources won with to the search
    (`transfer.lean_seeds`): on a GPU, where each seed costs a compile and an audit; on the CPU every seed is
    cheap and the budgeted CPU search keeps them all."""
    return device.type == "cuda"


def neighbour_seeds(device: torch.device, space: SearchSpace, moved: list, seeds: list) -> list:
    """A study's seeds under a budget: its sources' winners (`moved`, from `transfer.transferred`) first, then
    its own `seeds` (`_seeds`), lean on a GPU (`_lean`), mapped into `space`."""
    return transfer.study_seeds(space, moved + (transfer.lean_seeds(seeds, moved) if _lean(device) else seeds))


def audit_tier(jobs: list, roles: list, plans: list, first: int, winners: dict) -> None:
    """At the first study (`first`) of a transfer tier, audit together the winners transferred to every study
    of that tier the plan runs (`space.audit_together`, mapped as each study maps them): their sources are of
    lower tiers and have all run, so each compiler starts once per batch across the tier, not once per study.
    The studies then find the verdicts in their spaces. Nothing on a device other than CUDA."""
    tier = roles[first].tier
    moved = [(space, transfer.study_seeds(space, transfer.transferred(role, spec, winners)))
             for (spec, _, _, space, _), role, plan in zip(jobs[first:], roles[first:], plans[first:])
             if role.tier == tier and plan.status == "run"]
    if any(seeds for _, seeds in moved):  # anchors (tier 0) have none
        audit_together([(space, [s.candidate for s in seeds]) for space, seeds in moved if seeds])


def _with_ranked(seeds: list, space: SearchSpace, rows: int, facts: rank.DeviceFacts) -> list:
    """The seeds, then `rank.first_to_time`'s candidates: those sharing a seed's compiled source, then ranked ones."""
    first, source = rank.first_to_time(space, rows, facts, [s.candidate for s in seeds])
    return seeds + [transfer.Seed(c, source) for c in first]


def tune_grid(specs: list[NormSpec], row_counts: list[int], backends: dict, device: torch.device,
              options: StudyOptions, *, db_path: Path, storage, lock_path: Path | None, results: list[StudyResult],
              copy_gbps: float | None = None, timer=None, progress=None, budget_s: float | None = None,
              elapsed=None, show_plan=None, costs: planner.Costs | None = None, clock=time.monotonic) -> TuningDB:
    """Tune every (spec, rows) with `options` into the database at `db_path`, saved after every study.

    `results` receives each study's result as it ends, so a caller interrupted by
    Ctrl-C still holds the finished ones. `progress(total, desc)` makes a progress
    bar per study (tqdm-like), or None for none. With `budget_s`, the grid is planned
    to end `budget_s` seconds after `elapsed()` was 0 (default: the process start;
    `autonorm.tune.plan`): the plan goes to `show_plan(text)`, each study's
    `time_budget` is its share, `rank.first_to_time`'s first candidates are timed
    right after the seeds, and shapes transfer (`transfer.py`: anchors first, their
    neighbours seeded from their winners; records of other GPUs as seeds). `costs`
    replaces the plan's estimates (`Costs.estimate` from the timer's protocol);
    `clock` is the seconds the deadline and studies count in.
    """
    ident = identity(device)
    timer = timer if timer is not None else measure.timer_for(device, options.windows)
    copy_gbps = copy_gbps if copy_gbps is not None else measure.copy_bandwidth(device)
    device_info = {k: ident[k] for k in DEVICE_FIELDS}
    device_info["copy_gbps"] = round(copy_gbps, 2)
    earlier = TuningDB.load(db_path) if db_path.exists() else None
    db = TuningDB(device_info, software_versions(), protocol(timer, options))
    study_attrs = {"device": device_info, "versions": db.versions, "protocol": db.protocol}
    tables = transfer.seed_tables(device_info) if budget_s is not None else []
    # One pool for the grid, so its worker processes start once; they build the spaces first (one a spec: its row
    # counts share it). Closed after the loop; an exception leaves its idle workers to the executor's own exit hook.
    pool = CompilePool(backends, device, options.compile_workers, processes=options.compile_processes)
    spaces = build_spaces(specs, backends, device, pool.executor(), SearchSpace)
    jobs = [(spec, rows, study_name(ident["slug"], spec, rows, backends), spaces[spec],
             _seeds(spec, rows, spaces[spec], earlier, tables)) for spec in specs for rows in row_counts]
    roles = [transfer.Role(0)] * len(jobs)
    plans, winners, deadline = None, {}, None  # deadline: when the run must end, with --budget
    # Set-up and finish seconds the studies run so far took and were planned to take: a machine slower than
    # the plan's estimates there (a loaded CPU, a slow storage) shrinks the later studies' search shares
    # instead of overrunning the budget in the last one.
    outside_spent = outside_planned = 0.0
    if budget_s is not None:
        # On a GPU, every study's seeds known now are audited together before the plan (the plan counts the
        # seconds): each compiler starts once per batch of candidates, not once per study.
        audit_together([(space, [s.candidate for s in seeds]) for _, _, _, space, seeds in jobs])
        jobs, roles = transfer.arrange(jobs)  # anchors first: each study runs after those it takes seeds from
        elapsed = elapsed or planner.process_age_s
        costs = costs or planner.Costs.estimate(db.protocol, options.compile_baseline, options.light_finish)
        plans = planner.study_plans(jobs, costs, options.trials, planner.recorded_studies(storage),
                                    shared_sources=device.type == "cpu")
        transfer.shape_plans(plans, roles, [seeds for *_, seeds in jobs], _lean(device))
        plan = planner.split(plans, budget_s, elapsed(), costs.end_s)
        plans = plan.studies
        if show_plan is not None:
            show_plan(planner.format_plan(plan, options.compile_baseline))
        deadline = clock() + budget_s - elapsed() - costs.end_s
        facts = rank.DeviceFacts.of(ident, copy_gbps)
    for i, (spec, rows, name, space, seeds) in enumerate(jobs):
        study_options = options
        if plans is not None:
            plan = plans[i]
            if i == 0 or roles[i].tier != roles[i - 1].tier:  # a tier starts: its sources have all run
                audit_tier(jobs, roles, plans, i, winners)
            if plan.status == "complete":  # taken from the storage as it is: nothing re-timed
                record = Record.from_json(plan.stored, f"study {name}")
                results.append(StudyResult(spec, rows, record, record.trials, record.trials - record.failed,
                                           space_size=plan.space, completeness=record.completeness))
                db.upsert(record)
                transfer.remember(winners, spec, rows, record)
                continue
            finish_scale = max(1.0, outside_spent / outside_planned) if outside_planned > 0 else 1.0
            share = _share(plans, i, deadline - clock(), finish_scale)
            if plan.status != "run" or share is None:
                if plan.status == "run" and show_plan is not None:
                    show_plan(f"left out {spec.short()} rows={rows}: the budget was spent before it started")
                continue
            moved = transfer.transferred(roles[i], spec, winners)
            seeds = neighbour_seeds(device, space, moved, seeds)
            last = not any(p.status == "run" for p in plans[i + 1:])
            # On a CPU the timer waits for the seeds' compile: each study charged the same (StudyOptions).
            seed_compile_s = seed_compile_charge(jobs, plans, pool.seed_waits) if device.type == "cpu" else None
            study_options = transfer.options_for(dataclasses.replace(options, time_budget=share, ends_run=last,
                                                                     seed_compile_s=seed_compile_s,
                                                                     floor_trials=len(seeds)), moved, len(seeds))
            seeds = _with_ranked(seeds, space, rows, facts)
        bar = progress(options.trials, f"{spec.short()} rows={rows}") if progress else None
        runner = StudyRunner(spec, rows, backends, timer, study_options, storage=storage, name=name, device=device,
                             seeds=[s.candidate for s in seeds], copy_gbps=copy_gbps, lock_path=lock_path,
                             study_attrs=study_attrs, progress=bar, clock=clock, compile_pool=pool, space=space,
                             seed_sources=transfer.provenance(seeds), deadline=deadline)
        result = runner.run()
        if bar is not None:
            bar.close()
        results.append(result)
        if plans is not None:
            outside_spent += result.outside_search_s
            outside_planned += plans[i].finish_s
        transfer.remember(winners, spec, rows, result.record)
        if result.record is not None:
            db.upsert(result.record)
            db.save(db_path)  # after every study: a killed run keeps what it finished
    pool.close()
    if plans is not None and db.records:
        db.save(db_path)  # the records taken from complete studies, too
    return db


def seed_compile_charge(jobs: list, plans: list, seed_waits=()) -> float:
    """What each study a CPU run plans is charged for its seeds' batch (`StudyOptions.seed_compile_s`): the run's
    expected waits for its studies' seeds, spread evenly over them. A study whose seeds hold a source no earlier
    study compiles waits for that compile and the checks; any other for the workers' reference checks alone. Each
    kind at the median of the run's own `seed_waits` (`CompilePool.seed_waits`), or before any at the plan's
    compile figure a source and nothing.

    A source compiled once serves every later study of it (numba-cpu renders no hidden size), so most studies'
    seeds compile nothing. Charged a compile per seed each (3.9 s), every study of a 134 s CPU run had spent 4.3
    to 5 s of its 5 to 6 s share when its seeds were timed; the first one stopped there and missed its best
    launch by 1.47x, while the surplus went to the run's last studies, which left 9 s unspent. Charged the new
    sources alone (2 s a source at the plan's figure, where the waits were 2.4 to 8 s, median 4.7), the first
    studies spent what the last two needed."""
    running = [(space, seeds, plan) for (*_, space, seeds), plan in zip(jobs, plans) if plan.status == "run"]
    if not running:
        return 0.0
    sources = set()
    for space, seeds, _ in running:
        sources |= rank.compile_keys(space, [s.candidate for s in seeds])
    new_waits = [w for new, w in seed_waits if new]
    known_waits = [w for new, w in seed_waits if not new]
    per_source = statistics.median(new_waits) if new_waits else statistics.mean(p.compile_s for *_, p in running)
    per_other = statistics.median(known_waits) if known_waits else 0.0
    others = max(len(running) - len(sources), 0)
    return (len(sources) * per_source + others * per_other) / len(running)


def _share(plans: list, i: int, left_s: float, finish_scale: float = 1.0) -> float | None:
    """Search seconds for study `i` now: its planned share rescaled by the time left over the time planned
    for it and the studies after it; None when what is left cannot time one candidate and finish.
    `finish_scale` (>= 1) is how much longer than planned the earlier studies' set-up and finish took."""
    plan = plans[i]
    finish_s = plan.finish_s * finish_scale
    to_come = sum(p.search_s + p.finish_s * finish_scale for p in plans[i:] if p.status == "run")
    if left_s < finish_s + plan.candidate_s:
        return None
    return max(0.0, left_s * (plan.search_s + finish_s) / to_come - finish_s)


def tune_one(spec: NormSpec, rows: int, device: torch.device, db_path: Path,
             options: StudyOptions | None = None) -> Record | None:
    """The dispatcher's tune-on-miss: `tune_grid` of one spec with `options` (default: `--quick`'s, without
    the torch.compile baseline), its record merged into the database at `db_path`. None when nothing
    native runs here or every candidate failed.

    The torch.compile baseline is off by default because it resets Dynamo (`finalize.py`), which would drop
    the compiled graphs of the program this runs inside; the protocol recorded says so. Candidates compile
    in threads: worker processes would start interpreters inside the user's program."""
    backends = native_backends(device, None, note=lambda text: None)
    if not backends:
        return None
    options = options if options is not None else StudyOptions.quick(compile_baseline=False, compile_processes=False)
    journal = db_path.with_suffix(".optuna.journal")
    results: list[StudyResult] = []
    tune_grid([spec], [rows], backends, device, options, db_path=db_path,
              storage=fleet.make_storage(None, journal), lock_path=Path(f"{journal}.autonorm-lock"),
              results=results)
    return results[0].record if results else None


def time_summary(results: list[StudyResult]) -> str:
    """Where the studies' time went: seconds compiling per backend, and the share of wall time spent timing."""
    ran = [r for r in results if r.wall_s > 0]  # not the studies taken from the storage
    if not ran:
        return "no study ran: nothing compiled or timed"
    compile_s: dict[str, float] = {}
    for r in ran:
        for name, seconds in r.compile_s.items():
            compile_s[name] = compile_s.get(name, 0.0) + seconds
    wall = sum(r.wall_s for r in ran)
    compiled = ", ".join(f"{name} {s:.1f} s" for name, s in sorted(compile_s.items())) or "nothing"
    timing = sum(r.timing_s for r in ran)
    return f"compiling: {compiled}; timing: {100 * timing / wall:.0f}% of {wall:.0f} s in {len(ran)} studies"
