"""Auditing a list of jobs: profiles from the cache (by source hash and toolchain) or compiled in
batches, `workers` at a time; and the verdicts on candidates that the tuner and `prune_space` take from them."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..hardware import ARCHS, device_arch
from ..spec import NormSpec
from .compilers import cupy_profiles, numba_profiles, triton_profiles
from .jobs import Job
from .profile import Profile
from .tools import BACKENDS, AuditToolError, check_backends, toolchain

WORKERS = 2


def _cache_dir() -> Path:
    from ..settings import cache_dir

    path = cache_dir() / "audit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load_cached(key: str) -> Profile | None:
    try:
        data = json.loads((_cache_dir() / f"{key}.json").read_text())
        return Profile(**{f.name: data[f.name] for f in dataclasses.fields(Profile)})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(key: str, p: Profile) -> None:
    folder = _cache_dir()
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(dataclasses.asdict(p), f)
    os.replace(tmp, folder / f"{key}.json")  # atomic: a concurrent reader never sees half a file


def _batches(jobs: list[Job], size: int, workers: int) -> list[list[Job]]:
    """Jobs of one (backend, arch) per batch (one nvcc call / numba worker each), split so every worker has one."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.backend, job.arch), []).append(job)
    out = []
    for group in groups.values():
        per = max(1, min(size, -(-len(group) // workers)))
        out += [group[i:i + per] for i in range(0, len(group), per)]
    return out


def cache_keys(jobs: list[Job]) -> list[str]:
    """Each job's cache key: what is compiled and the versions of the tools that compile it (its own
    backend's only, so a kernel audited alone or beside other backends' kernels is found either way)."""
    versions = {b: toolchain([b]) for b in {j.backend for j in jobs}}
    return [j.cache_key(versions[j.backend]) for j in jobs]


def cached(jobs: list[Job]) -> list[tuple[Job, Profile]]:
    """The jobs whose profile the cache already holds, with it (nothing is compiled)."""
    found = [(j, _load_cached(key)) for j, key in zip(jobs, cache_keys(jobs))]
    return [(j, p) for j, p in found if p is not None]


def audit(jobs: list[Job], progress=None, workers: int = WORKERS) -> list[Profile]:
    """Profiles of `jobs` (same order), from the cache or compiled `workers` at a time."""
    keys = cache_keys(jobs)
    results: dict[int, Profile] = {}
    todo = []
    for i, (job, key) in enumerate(zip(jobs, keys)):
        cached = _load_cached(key)
        if cached is not None:
            results[i] = cached
        else:
            todo.append(job)
    index = {id(j): i for i, j in enumerate(jobs)}
    with tempfile.TemporaryDirectory(prefix="autonorm-audit-") as workdir:
        def run(batch: list[Job]) -> list[tuple[Job, Profile]]:
            compile_batch = {"cupy": cupy_profiles, "numba": numba_profiles, "triton": triton_profiles}
            return list(zip(batch, compile_batch[batch[0].backend](batch, workdir)))

        batches = _batches(todo, 16, workers)  # small batches: results are cached as each finishes
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for done in pool.map(run, batches):
                for job, p in done:
                    i = index[id(job)]
                    results[i] = p
                    _store(keys[i], p)
                    if progress:
                        progress(p)
    return [results[i] for i in range(len(jobs))]


def _device_arch(device):
    import torch

    arch = device_arch(torch.cuda.get_device_properties(device))
    ARCHS.setdefault(arch.name, arch)
    return arch


def winner_profile(spec: NormSpec, backend: str, config, device) -> dict | None:
    """What the compiler says of one kernel on `device`'s architecture (`Profile.summary()`), for the
    database record of a winner; None for a backend without a GPU compiler or a missing toolchain.
    After the tuner audited the winner before timing it (`unfit`), this is a cache hit."""
    if backend not in BACKENDS:
        return None
    arch = _device_arch(device)
    try:
        check_backends([backend])
    except AuditToolError:
        return None
    return audit([Job(backend, spec, config, arch.name)], workers=1)[0].summary()


def _why_unfit(p: Profile) -> str | None:
    """Why a compiled kernel cannot be a candidate on its architecture, or None when it fits."""
    if p.spill_bytes:
        return f"audit: spills {p.spill_bytes} bytes on {p.arch}"
    if not p.launchable:
        return f"audit: a block cannot be resident on an SM of {p.arch}"
    return None


_unaudited: set = set()  # backends whose missing toolchain was reported: said once a process, not each batch


def unfit(spec: NormSpec, candidates: list[tuple], device, workers: int | None = None) -> dict:
    """{(backend, config): why} for the candidates ([(backend, config)]) that cannot run on `device` (a CUDA
    device): a thread-block cluster before sm_90 is judged uncompiled; a spill or a block that cannot be
    resident, by compiling just these candidates for its architecture (a cache hit when audited before).

    Backends without a GPU compiler here (torch, numba-cpu) always fit. A missing toolchain piece judges
    nothing by compiling and says so once: the tuner then times the candidate.
    """
    return unfit_specs({spec: candidates}, device, workers)[spec]


def unfit_specs(requests: dict, device, workers: int | None = None) -> dict:
    """`unfit` of several specs in one audit ({spec: [(backend, config)]} -> {spec: {(backend, config): why}}):
    each backend's compiler then starts once per batch of candidates across the specs, not once per spec."""
    import logging

    arch = _device_arch(device)
    out = {spec: {(name, c): f"needs compute capability {c.min_compute_capability()}, {arch.name} is {arch.cc}"
                  for name, c in candidates if c.min_compute_capability() > arch.cc}
           for spec, candidates in requests.items()}
    auditable = sorted({name for spec, candidates in requests.items() for name, c in candidates
                        if name in BACKENDS and (name, c) not in out[spec]})
    try:
        check_backends(auditable)
    except AuditToolError as exc:
        if not set(auditable) <= _unaudited:
            logging.getLogger("autonorm.audit").warning("candidates not audited: %s", exc)
            _unaudited.update(auditable)
        return out
    jobs = [Job(name, spec, c, arch.name) for spec, candidates in requests.items() for name, c in candidates
            if name in auditable and (name, c) not in out[spec]]
    for job, p in zip(jobs, audit(jobs, workers=workers or os.cpu_count())):
        why = _why_unfit(p)
        if why is not None:
            out[job.spec][(job.backend, job.config)] = why
    return out


def prune_space(spec: NormSpec, configs: dict, device, workers: int | None = None) -> dict:
    """`configs` ({backend: [config]}) without the configs that cannot run on `device` (`unfit`): every
    config of the space is compiled for its architecture. The tuner audits only the candidates it is
    about to time (`SearchSpace.unfit`); this is for callers that want a whole space judged."""
    verdicts = unfit(spec, [(name, c) for name, cs in configs.items() for c in cs], device, workers)
    return {name: [c for c in cs if (name, c) not in verdicts] for name, cs in configs.items()}
