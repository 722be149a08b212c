"""`autonorm tune --budget`: a plan that fits a whole grid into one time budget.

The budget counts from the process start (start-up, the copy-bandwidth probe and
compilation included). Before any study runs the planner prints, per study: the
space size, the seeds, the candidates it expects to time and the seconds it gets.
The rule that divides the budget:

1. A study whose search is already complete in the storage (exhaustive,
   converged, or its `--trials` spent, by an earlier run of the same command) is not
   run again: its stored record is taken as it is. A study cut by the budget last time runs again and
   continues where it stopped (the storage keeps its measured trials).
2. Every study to run first gets its floor: its seeds (heuristics, the database's
   earlier winner) compiled and timed, plus its finish (finalists re-timed with the
   torch baselines). Studies are admitted in grid order while floors fit; the
   others are left out, and the plan says so and why.
3. What remains is shared in proportion to each study's remaining search (its space
   up to the trial budget, less its seeds, in seconds): larger spaces get more, and
   no study gets more than it can use (the excess goes to the others).

The last seconds (END_S) are kept for closing the compile workers and exiting. While the
grid runs, each study's share is rescaled by the time actually left over the time
planned for the studies still to run, so time saved by a study that
converged early goes to the later ones, and an overrun is taken from them. A study times its seeds whatever
its share (`StudyOptions.floor_trials`): the floor paid for them; only the run's deadline stops them. The last
study has no later ones to take it from: it begins a batch only if its slowest candidate
and the run's slowest compile so far would fit (`StudyOptions.ends_run`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ..spec import NormSpec

# Rough per-candidate compile seconds of each backend on one core (Numba's LLVM passes, Triton's
# MLIR pipeline, nvcc): they size the plan, never a decision about a measured candidate.
COMPILE_S = {"numba-cpu": 2.0, "numba": 1.5, "triton": 1.5, "cupy": 1.5, "torch": 0.0}
VERIFY_S = 0.05         # the reference check of one candidate before it is timed
# The full finish's interleaved rounds (tournament.py): 3 finalists, torch and torch.compile (torch eager is the
# torch finalist), then the close ones twice more, planned as the usual 2 (under --budget, the only run this plans,
# the first round takes no further contenders: finalize.CONTENDERS).
FINISH_TIMINGS = 5 + 2 * 2
# The light finish (`StudyOptions.light_finish`, under --budget) re-times only the finalists within noise of the
# winner, and nothing when the winner is clear (finalize.py). Planned as the usual close case: the winner and
# its runner-up, interleaved; a study that re-times more takes it from the later studies (run._share).
LIGHT_FINISH_TIMINGS = 2
COMPILE_BASELINE_S = 10.0  # torch.compile of the baseline (Dynamo + Inductor), once per study
# Kept back from the studies for what runs after the last one: closing the compile workers and the interpreter's
# exit (a 360 s budget on the CPU ended 5 s late without it). On the 2-core VM: 0.13 s and 2.1 s, since a worker
# skips its interpreter's teardown (compile_pool._start_worker); 1.9 s and 2.1 s before.
END_S = 3.0
# Under --budget the torch.compile baseline is left out unless asked for: a reference figure, not a candidate.
BASELINE_LEFT_OUT = ("torch.compile baseline: left out (a reference figure, not a candidate: torch eager is one, so "
                     f"a winner is never slower than torch); --compile-baseline times it in every study's finish "
                     f"(+{COMPILE_BASELINE_S:.0f} s each)")


@dataclass(frozen=True)
class Costs:
    """Seconds the plan expects: compiling one candidate per backend, timing one candidate, finishing a study."""

    compile_s: dict
    time_s: float
    finish_s: float
    end_s: float = 0.0  # kept back for the run's end (END_S)

    @classmethod
    def estimate(cls, timer_protocol: dict, compile_baseline: bool, light_finish: bool = False) -> "Costs":
        """From the timer's protocol: its warm-up and repetition windows (the ones the run uses) are most of a
        timing's cost; `light_finish`: the study's finish re-times only its close finalists."""
        if "rep_s" in timer_protocol:
            timing_s = timer_protocol["warmup_s"] + timer_protocol["rep_s"]
        elif "rep_ms" in timer_protocol:
            timing_s = (timer_protocol["warmup_ms"] + timer_protocol["rep_ms"]) / 1e3
        else:
            timing_s = 0.3
        timings = LIGHT_FINISH_TIMINGS if light_finish else FINISH_TIMINGS
        # A search candidate is checked, then timed; the finish re-times candidates the search checked (and torch
        # eager), with no reference check (the torch.compile baseline's is in COMPILE_BASELINE_S).
        return cls(dict(COMPILE_S), timing_s + VERIFY_S,
                   timings * timing_s + (COMPILE_BASELINE_S if compile_baseline else 0.0), END_S)

    def mean_compile_s(self, space_sizes: dict) -> float:
        """One candidate's compile, averaged over the space's backends by their number of configs."""
        total = sum(space_sizes.values()) or 1
        return sum(self.compile_s.get(name, 1.0) * n for name, n in space_sizes.items()) / total


@dataclass
class StudyPlan:
    spec: NormSpec
    rows: int
    name: str
    space: int                  # candidates in the search space
    seeds: int                  # heuristics and earlier winner, timed first
    wanted: int                 # candidates the study would time without a budget: its space up to --trials
    compile_s: float            # compiling one candidate (averaged over the space's backends)
    time_s: float               # verifying and timing one candidate
    finish_s: float
    status: str = "run"         # "run", "complete" (done by an earlier run) or "left out"
    why: str = ""
    search_s: float = 0.0       # seconds of search the study gets
    role: str = ""              # "anchor", or the studies whose winners seed it (`transfer.py`)
    seeds_from: str = ""        # where its seeds known before the run come from
    stored: dict | None = field(default=None, repr=False)  # the record of a complete study, as stored
    seed_compiles: int | None = None  # seeds the study compiles (`study_plans(shared_sources=)`); None: every seed

    @property
    def candidate_s(self) -> float:
        return self.compile_s + self.time_s

    @property
    def seeds_s(self) -> float:
        """The seeds' compiles and timings."""
        if self.seed_compiles is None:
            return self.seeds * self.candidate_s
        return self.seeds * self.time_s + self.seed_compiles * self.compile_s

    @property
    def floor_s(self) -> float:
        return self.seeds_s + self.finish_s

    @property
    def planned(self) -> int:
        """Candidates the study's share pays for."""
        return min(self.wanted, int(self.search_s / self.candidate_s)) if self.candidate_s else self.wanted


@dataclass
class Plan:
    budget_s: float
    spent_s: float              # start-up and probe before the plan, counted in the budget
    studies: list
    end_s: float = 0.0          # kept back for the run's end, after the last study

    def running(self) -> list:
        return [s for s in self.studies if s.status == "run"]


COMPLETE = ("exhaustive", "converged")


def recorded_studies(storage) -> dict:
    """Study name -> (how complete its search was, its stored record as JSON) for every study with a record."""
    import optuna

    done = {}
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        attrs = summary.user_attrs
        if attrs.get("record") is not None:
            done[summary.study_name] = (attrs.get("completeness"), attrs["record"])
    return done


def study_plans(studies: list, costs: Costs, n_trials: int, recorded: dict, shared_sources: bool = False) -> list:
    """A StudyPlan per (spec, rows, name, SearchSpace, seeds) in `studies`, marked complete where `recorded`
    (from `recorded_studies`) holds its name with a search that was exhaustive, converged or spent `n_trials`.

    `shared_sources` (a CPU run, whose timer waits for its compiles; `studies` in run order, seeds as
    `transfer.Seed`s): a study's seeds are planned a compile only for sources no study before it compiles
    (`rank.compile_keys`: torch's seed none, numba-cpu's none at a second hidden size). Planned a compile per
    seed, the 16 studies of a 125 s CPU run needed 32 compiles (62 s) where they met 8, and the plan left the
    last study out."""
    from . import rank

    plans, compiled = [], set()
    for spec, rows, name, space, seeds in studies:
        sizes = {backend: len(configs) for backend, configs in space.configs.items()}
        plan = StudyPlan(spec, rows, name, len(space), len(seeds), min(len(space), n_trials),
                         costs.mean_compile_s(sizes), costs.time_s, costs.finish_s)
        if shared_sources:
            sources = rank.compile_keys(space, [s.candidate for s in seeds])
            plan.seed_compiles = len(sources - compiled)
            compiled |= sources
        completeness, record = recorded.get(name, (None, None))
        if completeness in COMPLETE:
            plan.status, plan.why, plan.stored = "complete", f"{completeness} in an earlier run", record
        elif record is not None and record["trials"] >= n_trials:
            plan.status, plan.stored = "complete", record
            plan.why = f"its {n_trials} trials were spent in an earlier run"
        plans.append(plan)
    return plans


def split(studies: list, budget_s: float, spent_s: float, end_s: float = 0.0) -> Plan:
    """Admit studies and share the budget among them (the rule in this module's docstring), `end_s` kept back
    for the run's end (`Costs.end_s`)."""
    available = budget_s - spent_s - end_s
    for s in studies:
        if s.status != "run":
            continue
        if s.floor_s > available:
            s.status, s.why = "left out", (f"its seeds and finish need {s.floor_s:.1f} s, "
                                           f"{max(available, 0):.1f} s of the budget were left")
            continue
        available -= s.floor_s
        s.search_s = s.seeds_s
    # Water-filling: shares in proportion to the search each study wants, none above what it can use.
    hungry = [s for s in studies if s.status == "run" and s.wanted > s.seeds]
    while available > 1e-6 and hungry:
        weights = {id(s): (s.wanted - s.seeds) * s.candidate_s for s in hungry}
        total = sum(weights.values())
        given = 0.0
        for s in hungry:
            room = s.wanted * s.candidate_s - s.search_s
            share = min(room, available * weights[id(s)] / total)
            s.search_s += share
            given += share
        available -= given
        hungry = [s for s in hungry if s.wanted * s.candidate_s - s.search_s > 1e-6]
        if given <= 1e-9:
            break
    return Plan(budget_s, spent_s, studies, end_s)


def format_plan(plan: Plan, compile_baseline: bool = True) -> str:
    """The plan as printed before the grid runs; without `compile_baseline`, a line saying it is left out."""
    run = plan.running()
    lines = [f"plan: budget {plan.budget_s:.0f} s, {plan.spent_s:.0f} s spent on start-up and the bandwidth probe, "
             f"{plan.end_s:.0f} s kept for the end; "
             f"{len(run)} studies to run, "
             f"{sum(s.status == 'complete' for s in plan.studies)} complete from an earlier run, "
             f"{sum(s.status == 'left out' for s in plan.studies)} left out"]
    header = ("spec", "rows", "space", "seeds", "planned", "seconds", "role", "seeds from", "status")
    rows = [header]
    for s in plan.studies:
        seconds = f"{s.search_s + s.finish_s:.0f}" if s.status == "run" else "-"
        planned = str(s.planned) if s.status == "run" else "-"
        status = s.status if s.status == "run" else f"{s.status}: {s.why}" if s.why else s.status
        rows.append((s.spec.short(), str(s.rows), str(s.space), str(s.seeds), planned, seconds, s.role or "-",
                     s.seeds_from or "-", status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    compile_s = sum(s.planned * s.compile_s for s in run)
    timing_s = sum(s.planned * s.time_s for s in run)
    finish_s = sum(s.finish_s for s in run)
    lines.append(f"expected: {compile_s:.0f} s compiling, {timing_s:.0f} s timing, {finish_s:.0f} s finishing "
                 f"(finalists re-timed with the torch baselines)")
    if not compile_baseline:
        lines.append(BASELINE_LEFT_OUT)
    return "\n".join(lines)


def process_age_s() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere: since this module was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


_IMPORTED = time.monotonic()
