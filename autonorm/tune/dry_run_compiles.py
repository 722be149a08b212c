"""What the dry run of `autonorm tune --budget` (`dry_run.py`) charges for compiling and before the plan: the
compile figures measured here (`CompileFigures`), the Triton specializations a study compiles (`triton_compiles`),
and the spaces' builds over the compile workers (`space_builds_s`)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..spec import NormSpec
from . import plan as planner
from .compile_pool import timed_rows_to_warm, triton_launches

AUDITED = ("triton", "cupy", "numba")  # the backends the audit compiles (autonorm.audit.BACKENDS)
AUDIT_BATCH = 16  # the most candidates `autonorm.audit.audit` compiles in one batch (one compiler start)
# Candidates a study claims, audits and compiles together: StudyOptions' default compile_workers on a machine
# of 4 cores or more (options.default_compile_workers).
DEVICE_COMPILE_WORKERS = 4

@dataclass(frozen=True)
class CompileFigures:
    """Per backend, CPU seconds of one core: compiling one config alone (a worker's start-up included),
    each further config of a batch, and rendering one config's source (compile-times.json)."""

    alone_s: dict
    marginal_s: dict
    render_s: dict
    source: str

    @classmethod
    def load(cls, path: Path) -> "CompileFigures":
        try:
            doc = json.loads(Path(path).read_text())
            figures = doc["backends"]
            missing = [b for b in AUDITED if b not in figures]
            if missing:
                raise KeyError(f"no figures for {', '.join(missing)}")
            return cls({b: float(f["alone_s"]) for b, f in figures.items()},
                       {b: float(f["marginal_s"]) for b, f in figures.items()},
                       {b: float(f["render_s"]) for b, f in figures.items()},
                       f"{Path(path).name} ({doc['date']}, {doc['machine']})")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a compile-times file of scripts/compile_times.py ({exc!r})") from None

    def candidate_s(self, backend: str) -> float:
        """One core's seconds for the tuner to compile one candidate of `backend`. Triton and Numba compile
        in the tuner's process (their import paid once): a batch's marginal config. CuPy's NVRTC compiles
        each kernel as a translation unit of its own, headers included: a config alone."""
        if backend not in AUDITED:
            return 0.0  # torch eager: nothing to compile
        return self.alone_s[backend] if backend == "cupy" else self.marginal_s[backend]

    def per_candidate_s(self, backend: str, cores: int, audited: bool = True) -> float:
        """Wall seconds the tuner spends compiling one candidate of `backend`: its compile over `cores`, and
        (`audited`: the audit's cache does not hold it) the audit's compile of it, alone (a batch of a few
        new candidates is one per audit worker), `DEVICE_COMPILE_WORKERS` of them side by side."""
        audit_s = self.alone_s[backend] / min(cores, DEVICE_COMPILE_WORKERS) if audited and backend in AUDITED else 0.0
        return self.candidate_s(backend) / cores + audit_s


    def together_s(self, counts: dict, cores: int) -> float:
        """Seconds to audit `counts` ({backend: candidates}) in one `autonorm.audit.unfit_specs` call on `cores`:
        its batches are as `audit.run.audit` makes them (one backend each, up to AUDIT_BATCH, spread so every
        worker has one), each a compiler started once (a config alone) and its further configs (marginal);
        the batches side by side on the cores, and never shorter than the longest one."""
        batches = []
        for backend, n in counts.items():
            if backend in AUDITED and n:
                per = max(1, min(AUDIT_BATCH, -(-n // cores)))
                sizes = [min(per, n - i) for i in range(0, n, per)]
                batches += [self.alone_s[backend] + (k - 1) * self.marginal_s[backend] for k in sizes]
        return max(sum(batches) / cores, max(batches, default=0.0))

    def worker_s(self, backend: str, cores: int, audited: bool, checks: bool,
                 compiles: TritonCompiles | None = None) -> float:
        """`per_candidate_s`, and with `checks` the reference check the compile worker runs after compiling a
        candidate of a backend it compiles (`compile_pool._warm`), over the cores like the compile. `compiles`:
        the specializations a study compiles of a Triton candidate, in the workers (over the cores) and in the
        tuning process (on the timer's path, one core); None: one, in a worker."""
        compiles = compiles or TritonCompiles(1, 0, True)
        audit_s = self.per_candidate_s(backend, cores, audited) - self.candidate_s(backend) / cores
        check_s = planner.VERIFY_S / cores if checks and backend in AUDITED and compiles.job else 0.0
        return (compiles.workers / cores + compiles.here) * self.candidate_s(backend) + audit_s + check_s


@dataclass(frozen=True)
class TritonCompiles:
    """What a study compiles of its spec's Triton heuristic that the spec's earlier studies did not: specializations
    (`compile_pool.triton_launches`) compiled by the compile workers, and by the tuning process on the timer's
    path; and whether a worker job runs at all (it checks the candidate)."""

    workers: int
    here: int
    job: bool


def triton_compiles(spec: NormSpec, config, rows: int, warm: set, by_class: bool = True) -> TritonCompiles:
    """The Triton specializations a study at `rows` compiles of `config` beyond `warm` (those of the spec's earlier
    studies; updated). `by_class`: as the compile pool warms Triton, a job only for a class not yet warm, which
    also launches the timer's class (`compile_pool.timed_rows_to_warm`); False: as before, a job per row count
    whose reference check compiles the check's classes, the timer's compiled at its first launch, in the tuning
    process. A specialization warm in Triton's cache costs nothing more (its binding is not counted)."""
    timed, needs = triton_launches(spec, config, rows)
    checks = needs - {timed} if timed_rows_to_warm(spec, config, rows) is not None else needs
    new = needs - warm
    warm |= needs
    if by_class:
        return TritonCompiles(len(new), 0, bool(new))
    return TritonCompiles(len(new & checks), int(timed in new - checks), True)


def measure_worker_start() -> float:
    """Seconds until a compile pool's first worker process (started as the tuner starts them: `spawn`, autonorm
    and torch imported) returns its first result, measured here."""
    from .compile_pool import CompilePool

    started = time.perf_counter()
    with CompilePool({}, "cpu", workers=1) as pool:
        pool.executor().submit(int).result()
    return time.perf_counter() - started


def space_builds_s(built: list, cores: int, worker_start_s: float | None) -> dict:
    """What building the spaces (`built`: (space, CPU seconds, transfer seconds) each) costs before the plan: with
    `worker_start_s`, their enumeration's CPU seconds over `cores` workers, each result's transfer one after
    another, and the workers' start; None: the CPU seconds one after another."""
    cpu_s = sum(b[1] for b in built)
    if worker_start_s is None:
        return {"building each spec's space (one after another, shared by its row counts)": cpu_s}
    return {f"building each spec's space ({cores} workers, shared by its row counts)": cpu_s / cores,
            "sending the spaces back from the workers": sum(b[2] for b in built),
            "starting the compile workers (measured here)": worker_start_s}
