"""Seconds to compile one GPU candidate per backend, cross-compiled here for sm_90 (no GPU), on one core.

    python scripts/compile_times.py          # 6 configs a backend, writes docs/benchmarks/compile-times.json
    python scripts/compile_times.py --sample 16 --seed 1 --out /tmp/ct.json

Each backend's configs are drawn at random from its search space over the standard grid (a random spec,
then a random config of the spec's space: the candidates the tuner would compile). They go through the
audit's own compilers (`autonorm.audit.audit`, one worker, an empty cache), the compiles the tuner's
audit check (`SearchSpace.unfit`) runs on the GPU machine for each candidate before it is timed:

- Triton: `triton.compile` to a cubin for sm_90 in a worker process, then `ptxas -v` and `cuobjdump`;
- CuPy: the rendered CUDA C++ through `nvcc -cubin` (CuPy itself compiles with NVRTC, the same front end);
- Numba CUDA: `numba.cuda.compile_ptx` (NVVM) in a worker process, then `ptxas -v` and `cuobjdump`.

Two figures a backend, in CPU seconds of the compiling processes (a loaded machine's waiting is not
counted; the wall seconds are recorded beside them): `alone_s`, the first config compiled by itself (a
worker's start-up, Triton's or Numba's import, or a translation unit's headers, included), and
`marginal_s`, each further config of the same batch (the audit batches up to 16 configs a worker).
`render_s`: rendering one config's source (the median, CPU seconds), which the audit repeats for every
config of a space to find it in its cache. The machine's load is recorded: on a shared machine CPU time
still runs somewhat above a free core's (caches and memory bandwidth are shared).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from autonorm.audit import Job, audit, check_backends, toolchain
from autonorm.backends import get_backend
from autonorm.device import cpu_name
from autonorm.grids import STANDARD

ARCH = "sm_90"
BACKENDS = ("triton", "cupy", "numba")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "compile-times.json"


def sample_jobs(backend: str, n: int, rng: random.Random) -> list[Job]:
    """`n` distinct (spec, config) jobs of `backend`: a random standard-grid spec, then a random config of its space."""
    specs, jobs = STANDARD.specs(), []
    while len(jobs) < n:
        spec = rng.choice(specs)
        job = Job(backend, spec, rng.choice(get_backend(backend).space(spec)), ARCH)
        if job not in jobs:
            jobs.append(job)
    return jobs


def _cpu_s() -> float:
    """CPU seconds of this process and every child it waited for (the compile workers, nvcc, ptxas, cuobjdump
    and what they ran): what the compiles cost one core, whatever else the machine runs."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def timed_audit(jobs: list[Job]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of auditing `jobs` with one worker and empty caches (the audit's and
    Triton's own: every job compiles)."""
    with tempfile.TemporaryDirectory(prefix="autonorm-compile-times-") as cache:
        os.environ["AUTONORM_CACHE_DIR"] = cache
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")  # the worker processes inherit both
        cpu0, t0 = _cpu_s(), time.perf_counter()
        audit(jobs, workers=1)
        return _cpu_s() - cpu0, time.perf_counter() - t0


def measure(backend: str, n: int, rng: random.Random) -> dict:
    """CPU seconds: `alone_s`, the first job by itself; `marginal_s`, (all n in one batch - the first alone) / (n - 1).
    The wall seconds beside them show the machine's contention."""
    jobs = sample_jobs(backend, n, rng)
    render = []
    for job in jobs:  # rendering is part of every compile, and of the audit's cache key of every config
        t0 = time.process_time()
        job.source()
        render.append(time.process_time() - t0)
    load_before = os.getloadavg()[0]
    alone, alone_wall = timed_audit(jobs[:1])
    batch, batch_wall = timed_audit(jobs)
    load_after = os.getloadavg()[0]
    return {"sample": n, "alone_s": round(alone, 3), "batch_s": round(batch, 3),
            "marginal_s": round(max(0.0, batch - alone) / (n - 1), 3),
            "wall_s": {"alone": round(alone_wall, 3), "batch": round(batch_wall, 3)},
            "render_s": round(statistics.median(render), 4),
            "load_1min": [round(load_before, 2), round(load_after, 2)],
            "jobs": [f"{j.spec.short()} | {j.config.short()}" for j in jobs]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=6, help="configs a backend (>= 2; at most 16: one batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not 2 <= args.sample <= 16:
        parser.error(f"--sample {args.sample}: give 2 to 16 (the marginal needs two; the audit batches 16)")
    names = [b for b in args.backends.split(",") if b]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown backend {unknown[0]!r}; the audit compiles {', '.join(BACKENDS)}")
    check_backends(names)
    rng = random.Random(args.seed)
    figures = {}
    for name in names:
        figures[name] = measure(name, args.sample, rng)
        print(f"{name}: alone {figures[name]['alone_s']:.2f} s, marginal {figures[name]['marginal_s']:.2f} s a config "
              f"(load {figures[name]['load_1min']})", file=sys.stderr)
    doc = {"what": "seconds to compile one candidate for a GPU architecture, cross-compiled without a GPU, one core",
           "arch": ARCH, "machine": f"{cpu_name()}, {os.cpu_count()} cores (shared)",
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "versions": toolchain(names),
           "command": " ".join(["python scripts/compile_times.py", *(argv if argv is not None else sys.argv[1:])]),
           "backends": figures}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
