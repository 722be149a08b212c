"""A dry run of `autonorm tune --budget` for a GPU that is not here: the real planner, scripted costs.

Nothing is compiled for or launched on a GPU. The planner (`plan.study_plans`, `plan.split`) plans the
grid as it would on the device, from costs that stand in for the ones it would meet there:

- a recorded device profile (`GpuProfile`: SMs, HBM bandwidth, L2, shared memory, memory; each number's
  source is stated with it);
- a scripted timer: each candidate's kernel time from the static cost model (`rank.predict_us`: the
  bytes one call moves over the device's bandwidth, stretched by the idle share of its SMs), turned into
  the seconds `measure.CudaTimer` spends on it with the windows the run uses (`measure.CUDA_WINDOWS`:
  "short" under --budget):
  5 calls to size the windows, the warm-up calls, then the timed repetitions, each after an L2 flush of
  twice the L2;
- compile seconds per candidate measured here for sm_90 (`docs/benchmarks/compile-times.json`, made
  by `scripts/compile_times.py`), divided over the device machine's cores: the assumption is that
  candidates compile in parallel across all of them (a process pool, not the tuner's default threads);
- the audit's compile of each candidate the tuner is about to compile (`SearchSpace.unfit`: a study asks
  the audit about a claimed batch of `DEVICE_COMPILE_WORKERS` candidates, each one compiled alone, the
  batch in parallel), added to its compile seconds (`CompileFigures.per_candidate_s`); under --budget
  every study's seeds known before the plan are audited together before it, and each transfer tier's
  winners moved to its studies together when the tier starts (`CompileFigures.together_s`);
- what is spent before the plan (counted in the budget): start-up and the copy probe, and building each
  spec's space once.
"""
from __future__ import annotations

import dataclasses
import math
import pickle
import statistics
import time
from dataclasses import dataclass

from ..hardware import ARCHS
from ..spec import NormSpec
from ..verify import verify_rows
from . import plan as planner
from . import rank, transfer
from .compile_pool import SHAPE_FREE
from .dry_run_compiles import (
    AUDITED,
    CompileFigures,
    TritonCompiles,
    measure_worker_start,
    space_builds_s,
    triton_compiles,
)
from .space import PARALLEL_MIN_SPECS, Candidate, SearchSpace, enumerate_space

ESTIMATE_CALLS = 5       # CudaTimer._reps times 5 calls to size its windows before the warm-up
# Host time per timed repetition beyond the GPU's: launching the flush and the kernel, two events and the
# synchronize round trip; and the shortest a warm-up call can take (a launch). Assumed, not measured (no GPU
# here): at the 1,000-repetition cap they add 20 ms to a candidate.
HOST_US_PER_REP = 20.0
LAUNCH_US = 10.0
STARTUP_S = 10.0         # imports, the CUDA context and the copy-bandwidth probe; assumed, not measured


@dataclass(frozen=True)
class GpuProfile:
    """A device as the tuner would see it, and where each number comes from."""

    name: str
    sm_count: int
    copy_gbps: float        # HBM bandwidth (peak; the tuner's copy probe measures somewhat less)
    l2_bytes: int
    smem_per_sm: int
    memory_bytes: int
    sources: str

    def identity(self) -> dict:
        return {"name": self.name, "kind": "cuda", "compute_capability": "9.0", "sm_count": self.sm_count,
                "l2_bytes": self.l2_bytes, "memory_bytes": self.memory_bytes}


_HOPPER = ("132 SMs and 50 MB of L2: NVIDIA H100 Tensor Core GPU Architecture whitepaper (H100 SXM5; the "
           "H200 is the same GH100 chip), 132 also in autonorm/cuda_host.py; 228 KiB shared memory per SM: "
           "autonorm/hardware.py ARCHS['sm_90'] (CUDA C Programming Guide)")
PROFILES = {
    "h100-sxm": GpuProfile("NVIDIA H100 SXM5 80GB", 132, 3350.0, 50 << 20, ARCHS["sm_90"].smem, 80 * 10**9,
                           f"3.35 TB/s HBM3 and 80 GB: NVIDIA H100 datasheet (SXM); {_HOPPER}"),
    "h200": GpuProfile("NVIDIA H200 141GB HBM3e", 132, 4800.0, 50 << 20, ARCHS["sm_90"].smem, 141 * 10**9,
                       f"4.8 TB/s HBM3e and 141 GB: NVIDIA H200 datasheet; {_HOPPER}"),
}


def timer_windows(name: str) -> dict:
    """The warm-up and repetition windows (ms) and repetition bounds `measure.timer_for` gives CudaTimer under
    `name` (`StudyOptions.windows`: "short" under --budget, "full" otherwise): the real protocol's."""
    from ..measure import CUDA_WINDOWS

    return dict(CUDA_WINDOWS[name])


def measure_s(kernel_us: float, profile: GpuProfile, windows: dict) -> float:
    """Seconds `CudaTimer.measure` spends on a kernel of `kernel_us`: the same window arithmetic as `_reps`."""
    flush_us = 2 * profile.l2_bytes / (profile.copy_gbps * 1e3)  # zeroing twice the L2
    est_ms = max(kernel_us / 1e3, 1e-3)
    warm = min(windows["max_reps"], int(max(1, windows["warmup_ms"] / est_ms)))
    reps = int(min(windows["max_reps"], max(windows["min_reps"], windows["rep_ms"] / est_ms)))
    rep_us = flush_us + kernel_us + HOST_US_PER_REP
    return ((ESTIMATE_CALLS + reps) * rep_us + warm * max(kernel_us, LAUNCH_US)) / 1e6


def _moved(plan: planner.StudyPlan, role: transfer.Role) -> int:
    """The seeds of a study transferred from other specs' winners: one a source of a neighbour the plan runs."""
    return 0 if role.anchor or plan.status != "run" else len(role.sources)


def _mean_audit_s(space: SearchSpace, figures: CompileFigures, cores: int, checks: bool) -> float:
    """One candidate's audit alone in its study (`CompileFigures.per_candidate_s`), averaged over the space's
    backends by their number of configs (which backend a transferred winner is of is not known ahead)."""
    sizes = {b: len(cs) for b, cs in space.configs.items()}
    return sum((figures.worker_s(b, cores, True, checks) - figures.worker_s(b, cores, False, checks)) * n
               for b, n in sizes.items()) / sum(sizes.values())


def _audit_charges(plans: list, found: list, jobs: list, figures: CompileFigures, cores: int, checks: bool,
                   firsts: set, ahead: bool, tiers: bool) -> dict:
    """(spec, rows) -> the audit's seconds per candidate a study pays for its seeds not audited before the plan.
    `ahead` and `tiers`: each tier's transferred seeds audited together when it starts (`run.audit_tier`): the
    backends of the winners counted by the space's shares (rounded up), one `together_s` a tier, each study
    paying its seeds' share of it; a winner mapped to the same config in two studies of a spec is counted
    twice (the tuner audits it once). Otherwise the first study of a spec audits alone its transferred seeds
    (`ahead`) or all its seeds, and the spec's later studies find their verdicts in its space."""
    charges = {}
    if ahead and tiers:
        counts, moved_by_tier = {}, {}
        for p, role, (spec, rows, _, space, _) in zip(plans, found, jobs):
            moved = _moved(p, role)
            if moved:
                sizes = {b: len(cs) for b, cs in space.configs.items()}
                tier = counts.setdefault(role.tier, {})
                for b, n in sizes.items():
                    tier[b] = tier.get(b, 0.0) + moved * n / sum(sizes.values())
                moved_by_tier[role.tier] = moved_by_tier.get(role.tier, 0) + moved
        tier_s = {t: figures.together_s({b: math.ceil(n - 1e-9) for b, n in c.items()}, cores)
                  for t, c in counts.items()}
        for p, role in zip(plans, found):
            if _moved(p, role):
                charges[p.spec, p.rows] = tier_s[role.tier] * _moved(p, role) / moved_by_tier[role.tier] / p.seeds
        return charges
    for p, role, (spec, rows, _, space, _) in zip(plans, found, jobs):
        if (spec, rows) in firsts:
            share = _moved(p, role) / p.seeds if ahead else 1.0
            charges[spec, rows] = share * _mean_audit_s(space, figures, cores, checks)
    return charges


@dataclass
class DryRun:
    plan: planner.Plan
    profile: GpuProfile
    cores: int
    spent: dict             # seconds before the plan, by what spends them
    unburdened: planner.Plan  # the same studies planned with only the start-up spent before them
    spaces: dict            # spec -> its SearchSpace
    figures: CompileFigures
    # (spec, rows) -> the audit's seconds per candidate the study pays (its seeds not audited before the plan:
    # its own audit of them, or its share of its tier's audit; none when cached)
    audited: dict
    compile_baseline: bool  # every study's finish times the torch.compile baseline (--compile-baseline)
    worker_checks: bool = True  # the compile workers' reference checks count for the studies'
    # (spec, rows) of the studies whose SHAPE_FREE backends' seeds an earlier study of the spec compiled
    compiled_again: set = dataclasses.field(default_factory=set)
    # (spec, rows) -> the Triton specializations the study compiles (`triton_compiles`)
    triton: dict = dataclasses.field(default_factory=dict)

    def floor_parts(self) -> dict:
        """The studies' floors (every study, run or left out) split by what spends them: the seeds' audit
        compiles, their own compiles, their reference checks and timings, and the finishes."""
        parts = dict.fromkeys(("audit of the seeds", "compiling the seeds (and checking them, in the workers)",
                               "checking (in the tuning process) and timing the seeds", "finishes"), 0.0)
        for p in self.plan.studies:
            audit_s = self.audited.get((p.spec, p.rows), 0.0)
            parts["audit of the seeds"] += p.seeds * audit_s
            parts["compiling the seeds (and checking them, in the workers)"] += p.seeds * (p.compile_s - audit_s)
            parts["checking (in the tuning process) and timing the seeds"] += p.seeds * p.time_s
            parts["finishes"] += p.finish_s
        return parts

    def by_backend(self, plan: planner.Plan | None = None) -> dict:
        """backend -> (compile seconds, timing seconds) that `plan` (default: the dry run's) expects of the
        studies it runs, each study's planned candidates shared among its backends by their space sizes (as
        the plan's per-candidate compile seconds are averaged; a study's audit seconds go to the audited
        backends, by the same shares)."""
        out = {}
        for p in (plan or self.plan).running():
            sizes = {b: len(cs) for b, cs in self.spaces[p.spec].configs.items()}
            total = sum(sizes.values())
            audit_s = self.audited.get((p.spec, p.rows), 0.0) * total / (sum(sizes.get(b, 0) for b in AUDITED) or 1)
            for b, n in sizes.items():
                share = p.planned * n / total
                compile_s, timing_s = out.get(b, (0.0, 0.0))
                again = b in SHAPE_FREE and (p.spec, p.rows) in self.compiled_again
                unaudited = self.figures.worker_s(b, self.cores, False, self.worker_checks,
                                                  self.triton.get((p.spec, p.rows)) if b == "triton" else None)
                per_candidate = (0.0 if again else unaudited) + (audit_s if b in AUDITED else 0.0)
                out[b] = (compile_s + share * per_candidate,
                          timing_s + share * p.time_s)
        return out


def study_costs(spec: NormSpec, rows: int, space: SearchSpace, profile: GpuProfile, figures: CompileFigures,
                cores: int, compile_baseline: bool, audited: bool = True, windows: str = "short",
                light_finish: bool = True, parent_checks: float | None = None,
                compiled_before: bool = False, triton: TritonCompiles | None = None) -> planner.Costs:
    """The planner's `Costs` for one study: the timer's seconds with `windows` at the model's median kernel
    time over the space (through `Costs.estimate`, which adds the reference check and sizes the finish, light
    or full), and each backend's seconds to compile one candidate (`CompileFigures.per_candidate_s`).

    `parent_checks` (a fraction): the compile workers check the candidates of the backends they compile
    (`AUDITED`, `compile_pool.WARMED_ON` on a GPU) and the study takes their verdict (`StudyRunner._check`), so
    only this share of a timing keeps its reference check (torch eager's, one seed of a study's 4 to 6); the
    workers' checks go with their compiles, over the cores. None: every check in the tuning process.
    `compiled_before`: an earlier study of the spec compiled its seeds, so the backends whose kernels do not
    depend on the row count (`compile_pool.SHAPE_FREE`) compile nothing (the caller counts their checks in
    `parent_checks`). An underestimate only for the search candidates new to the spec, as for the audit.
    `triton`: the Triton specializations the study compiles (`triton_compiles`; None: one, in a worker)."""
    facts = rank.DeviceFacts.of(profile.identity(), profile.copy_gbps)
    kernel_us = statistics.median(rank.predict_us(spec, rows, c, facts) for c in space.candidates())
    costs = planner.Costs.estimate({"warmup_s": 0.0, "rep_s": measure_s(kernel_us, profile, timer_windows(windows))},
                                   compile_baseline, light_finish)
    compile_s = {b: 0.0 if compiled_before and b in SHAPE_FREE else
                 figures.worker_s(b, cores, audited, parent_checks is not None, triton if b == "triton" else None)
                 for b in space.configs}
    if parent_checks is None:
        return dataclasses.replace(costs, compile_s=compile_s)
    return dataclasses.replace(costs, compile_s=compile_s, time_s=costs.time_s - planner.VERIFY_S * (1 - parent_checks))


def dry_run(studies: list, backends: dict, profile: GpuProfile, figures: CompileFigures, budget_s: float, *,
            cores: int = 16, n_trials: int = 60, compile_baseline: bool = False, audit_cached: bool = False,
            windows: str = "short", light_finish: bool = True, worker_checks: bool = True, shape_free: bool = True,
            audit_ahead: bool = True, lean_neighbours: bool = True, audit_tiers: bool = True,
            shared_checks: bool = True, triton_classes: bool = True, parallel_spaces: bool = True,
            worker_start_s: float | None = None, built: dict | None = None) -> DryRun:
    """Plan `studies` ((spec, rows) pairs, in grid order) over `backends` on `profile` in `budget_s`, in the
    order `tune_grid` runs them (`transfer.run_order`: anchors first), each backend's heuristic a seed.
    `compile_baseline`: as `tune --budget --compile-baseline` (left out by default under --budget);
    `windows` and `light_finish`: the timer's windows and the finish, as --budget picks them by default;
    `worker_checks`: the compile workers' reference checks count for the studies' (False: as before);
    `shape_free`: a spec's later studies do not compile again the seeds of `compile_pool.SHAPE_FREE`'s backends;
    `audit_ahead`: every study's seeds known before the plan are audited together before it (`tune_grid`,
    `space.audit_together`), and a study audits only its seeds transferred from other specs' winners (False:
    the first study of a spec audits all its seeds, as before); `lean_neighbours`: a neighbour times its
    sources' winners, torch eager and the heuristics of its sources' winners' backends (`transfer.lean_seeds`,
    counted as the plan bounds them), not every backend's heuristic; `audit_tiers` (with `audit_ahead`): the
    seeds transferred to a tier's studies are audited together when the tier starts (`run.audit_tier`), each
    study paying its seeds' share of that audit (False: each study's first of a spec audits them itself);
    `shared_checks` (with `worker_checks`): a study verified at the rows an earlier study of its spec was
    (`verify.verify_rows`) checks none of its seeds in the tuning process (`CompilePool.checked`): the
    heuristics were checked there, and each seed new to the spec is checked by the worker compiling it.
    `triton_classes`: a Triton seed is warmed once per specialization class of the row count (`triton_compiles`:
    counted for the spec's Triton heuristic, and so for every Triton seed); False: a job per row count, the
    timer's class compiled in the tuning process.

    `tune_grid` builds each spec's space once, before the plan, and its row counts' studies share it: each
    build enumerates the backends' spaces (CPU seconds measured here); the audit judges a candidate only
    when it is about to be compiled. `audit_cached`: the audit's cache already holds every config (compiled
    earlier with the device machine's toolchain), so a candidate costs no audit compile. `built`
    (spec -> (space, CPU seconds, transfer seconds)) keeps the spaces for another call over the same backends.

    `parallel_spaces`: the spaces are enumerated over the compile pool's `cores` workers (`space.build_spaces`,
    from PARALLEL_MIN_SPECS specs): charged their CPU seconds over the cores, plus each spec's result sent back
    (pickled and unpickled, measured here, charged one after another) and the workers' start (`worker_start_s`;
    None: `measure_worker_start`; the workers start before the plan to build them). False: one after another."""
    built = {} if built is None else built
    jobs, costs = [], []
    for spec, rows in studies:
        if spec not in built:
            started = time.process_time()
            parts = enumerate_space(spec, backends)  # as on the GPU: every valid config (the audit rejects 1-9%)
            built_s = time.process_time() - started
            started = time.process_time()
            pickle.loads(pickle.dumps((spec, tuple(backends))))  # to the worker: the spec and the backends' names
            pickle.loads(pickle.dumps(parts))  # and back: the enumeration
            built[spec] = (SearchSpace(spec, backends, parts=parts), built_s, time.process_time() - started)
        space = built[spec][0]
        seeds = transfer.study_seeds(space, [transfer.Seed(Candidate(name, b.heuristic(spec)), "heuristic")
                                             for name, b in backends.items()])
        jobs.append((spec, rows, f"{spec.short()} rows={rows}", space, seeds))
    # As tune_grid plans with a budget: anchors first, each neighbour after its sources, seeded by their winners.
    found = transfer.roles(studies)
    order = transfer.run_order(found)
    jobs, found = [jobs[i] for i in order], [found[i] for i in order]
    # The audit's verdicts are kept in the spec's space (and its cache); what each study pays of it:
    # `_audit_charges`. (Search candidates new to the spec are not charged: an underestimate where a study searches.)
    costs, firsts = [], {}  # spec -> (spec, rows) of its first study
    compiled, compiled_again = set(), set()  # the specs whose seeds an earlier study compiled; those studies
    checked_at = {}  # spec -> the rows its studies so far were verified at
    triton_warm, triton = {}, {}  # spec -> the Triton specializations compiled so far; (spec, rows) -> the study's
    for spec, rows, _, space, seeds in jobs:
        firsts.setdefault(spec, (spec, rows))
        verified = checked_at.setdefault(spec, set())
        known = shared_checks and verify_rows(rows, spec.hidden) in verified
        verified.add(verify_rows(rows, spec.hidden))
        # the seeds the tuning process checks itself: torch eager's, and on a spec's later studies the ones whose
        # kernels the pool does not warm again (SHAPE_FREE); the workers check the others
        again = shape_free and spec in compiled
        if "triton" in space.configs:
            triton[spec, rows] = triton_compiles(spec, backends["triton"].heuristic(spec), rows,
                                                 triton_warm.setdefault(spec, set()), triton_classes)
        here = {b for b in space.configs if b not in AUDITED or (again and b in SHAPE_FREE)
                or (b == "triton" and not triton[spec, rows].job)}
        unwarmed = (0.0 if known else sum(s.candidate.backend in here for s in seeds) / len(seeds)
                    if worker_checks else None)
        costs.append(study_costs(spec, rows, space, profile, figures, cores, compile_baseline,
                                 False, windows, light_finish, unwarmed, again, triton.get((spec, rows))))
        compiled.add(spec)
        if again:
            compiled_again.add((spec, rows))
    plans = [p for job, c in zip(jobs, costs) for p in planner.study_plans([job], c, n_trials, {})]
    transfer.shape_plans(plans, found, [seeds for *_, seeds in jobs], lean_neighbours)
    spaces = {spec: built[spec][0] for spec, _ in studies}
    # as `space.build_spaces` decides: over the workers from PARALLEL_MIN_SPECS specs
    parallel = parallel_spaces and len(spaces) >= PARALLEL_MIN_SPECS
    start_s = (measure_worker_start() if worker_start_s is None else worker_start_s) if parallel else None
    spent = {"start-up and copy probe (assumed)": STARTUP_S,
             **space_builds_s([built[s] for s in spaces], cores, start_s)}
    if audit_ahead and not audit_cached:
        known = {(spec, s.candidate) for spec, _, _, _, seeds in jobs for s in seeds}  # one audit per spec's config
        counts = {b: sum(c.backend == b for _, c in known) for b in AUDITED}
        spent[f"auditing every spec's seeds together ({cores} cores)"] = figures.together_s(counts, cores)
    audited = {} if audit_cached else _audit_charges(plans, found, jobs, figures, cores, worker_checks,
                                                       set(firsts.values()), audit_ahead, audit_tiers)
    for p in plans:
        p.compile_s += audited.get((p.spec, p.rows), 0.0)
    # The same studies with only the start-up spent before them: what the plan itself covers in the budget.
    unburdened = planner.split([dataclasses.replace(p) for p in plans], budget_s, STARTUP_S, planner.END_S)
    plan = planner.split(plans, budget_s, sum(spent.values()), planner.END_S)
    return DryRun(plan, profile, cores, spent, unburdened, spaces, figures, audited, compile_baseline, worker_checks,
                  compiled_again, triton)
