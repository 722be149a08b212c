"""What to compile: one job per (backend, spec, config, architecture), from heuristics, a space or a database."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..hardware import ARCHS
from ..spec import NormSpec
from .profile import PROFILE_VERSION
from .tools import BACKENDS


def runs_on(config, arch: str) -> bool:
    """Whether `config` can run on `arch` at all (thread-block clusters need sm_90): a config that cannot
    is not compiled for it."""
    return config.min_compute_capability() <= ARCHS[arch].cc


@dataclass(frozen=True)
class Job:
    backend: str
    spec: NormSpec
    config: object
    arch: str

    def source(self):
        from ..backends import get_backend

        return get_backend(self.backend).render(self.spec, self.config)

    def identity(self) -> str:
        """What is compiled, whatever compiles it: the key of a saved report (`report.save_report`)."""
        text = json.dumps([self.backend, self.arch, self.source().sha256, self.spec.to_dict(),
                           self.config.to_dict()], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def cache_key(self, versions: dict) -> str:
        text = json.dumps([PROFILE_VERSION, self.backend, self.arch, self.source().sha256, self.spec.to_dict(),
                           self.config.to_dict(), versions], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def heuristic_jobs(specs, backends, archs) -> list[Job]:
    from ..backends import get_backend

    return [Job(b, s, get_backend(b).heuristic(s), a) for b in backends for s in specs for a in archs]


def space_jobs(spec: NormSpec, backends, archs) -> list[Job]:
    from ..backends import get_backend

    return [Job(b, spec, c, a) for b in backends for c in get_backend(b).space(spec) for a in archs if runs_on(c, a)]


def database_jobs(path, archs, backends=BACKENDS) -> list[Job]:
    """Every record winner (and runner-up) of a tuning database whose backend the audit compiles."""
    from ..db import TuningDB

    db = TuningDB.load(path)
    jobs = []
    for record in db.records.values():
        spec = record.key.spec()
        for entry in (record.winner, *record.runners_up):
            if entry.backend in backends:
                jobs += [Job(entry.backend, spec, entry.config, a) for a in archs if runs_on(entry.config, a)]
    return list(dict.fromkeys(jobs))
