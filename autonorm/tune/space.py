"""The search space of one spec: every valid config of the candidate backends, as Optuna parameters.

`backend` is a categorical; each knob of a backend that takes more than one value
in the valid space is an ordinal parameter named `<backend>.<knob>` over exactly
those values. A sampled combination that is not in the valid space (knobs are
sampled independently) is snapped to the nearest valid config. On a GPU, the space
keeps every valid config and a candidate is audited only when it is about to be
compiled (`SearchSpace.unfit`): compiling the whole space for the audit up front
would cost more than the search times.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import Config, candidate_key
from ..spec import NormSpec

log = logging.getLogger("autonorm.tune")


@dataclass(frozen=True)
class Candidate:
    backend: str
    config: Config

    @property
    def key(self) -> str:
        return candidate_key(self.backend, self.config.to_dict())

    def short(self) -> str:
        return f"{self.backend}[{self.config.short()}]"


def _others(config: Config, names: tuple, knob: str) -> tuple:
    """`config`'s values of the knobs `names` other than `knob`."""
    return tuple(getattr(config, k) for k in names if k != knob)


class SearchSpace:
    """The valid configs of every candidate backend for one spec, and their Optuna parameters."""

    def __init__(self, spec: NormSpec, backends: dict, device=None, parts: tuple | None = None):
        """`parts`: (configs, knobs) as `enumerate_space` returns them, enumerated elsewhere (`build_spaces`)."""
        self.spec = spec
        self.backends = backends
        self.device = torch.device(device) if device is not None else None
        self.configs, self.knobs = parts if parts is not None else enumerate_space(spec, backends)
        self._unfit: dict = {}  # candidate key -> the audit's reason, or None: the verdicts given so far
        self._by_key = self._by_params = None  # key -> candidate, params -> candidate: made on first use
        self._choices: dict = {}  # backend -> {(knob, the other knobs' values)} where the knob has a choice

    def is_choice(self, backend: str, config: Config, knob: str) -> bool:
        """Whether `knob` takes more than one valid value beside `config`'s other knobs: one they pin (numba-cpu's
        one-thread forward takes one rows_per_task) is no choice there."""
        names = tuple(self.knobs[backend])
        if backend not in self._choices:
            counts: dict = {}
            for other in self.configs[backend]:
                for name in names:
                    key = (name, _others(other, names, name))
                    counts[key] = counts.get(key, 0) + 1
            self._choices[backend] = frozenset(key for key, n in counts.items() if n > 1)
        return (knob, _others(config, names, knob)) in self._choices[backend]

    def __len__(self) -> int:
        return sum(len(cs) for cs in self.configs.values())

    def candidates(self) -> list[Candidate]:
        return [Candidate(name, c) for name, cs in self.configs.items() for c in cs]

    def unfit(self, cands: list[Candidate]) -> dict:
        """{key: why} for the candidates of `cands` that spill or cannot launch on this space's GPU, by the
        audit (`autonorm.audit.unfit`: it compiles those not in its cache); nothing on any other device.
        Each verdict is kept, so the studies sharing this space ask the audit once per candidate."""
        if self.device is None or self.device.type != "cuda":
            return {}
        todo = list({c.key: c for c in cands if c.key not in self._unfit}.values())
        if todo:
            from ..audit import unfit

            verdicts = unfit(self.spec, [(c.backend, c.config) for c in todo], self.device)
            self._unfit.update({c.key: verdicts.get((c.backend, c.config)) for c in todo})
        return {c.key: self._unfit[c.key] for c in cands if self._unfit[c.key] is not None}

    def named(self, key: str) -> Candidate | None:
        """The candidate whose `Candidate.key` is `key` (None when it is not in this space)."""
        if self._by_key is None:
            self._by_key = {c.key: c for c in self.candidates()}
        return self._by_key.get(key)

    # -- the Optuna boundary: a candidate is known by its key everywhere else --
    def params(self, cand: Candidate) -> dict:
        """Optuna params that select `cand` (for enqueue_trial): the inverse of `candidate`."""
        params = {"backend": cand.backend}
        for knob, values in self.knobs[cand.backend].items():
            params[f"{cand.backend}.{knob}"] = values.index(getattr(cand.config, knob))
        return params

    def candidate(self, params: dict) -> Candidate | None:
        """The candidate Optuna params select, snapped to the nearest valid config as `suggest` does (None
        when they name no backend of this space or an index outside a knob's values)."""
        if self._by_params is None:  # a study reads every queued trial's params on each step: exact ones by lookup
            self._by_params = {_frozen(self.params(c)): c for c in self.candidates()}
        exact = self._by_params.get(_frozen(params))
        if exact is not None:
            return exact
        name = params.get("backend")
        if name not in self.configs:
            return None
        try:
            wanted = {k: values[params.get(f"{name}.{k}", 0)] for k, values in self.knobs[name].items()}
        except (IndexError, TypeError):
            return None
        return Candidate(name, self._nearest(name, wanted))

    def suggest(self, trial) -> Candidate:
        name = trial.suggest_categorical("backend", list(self.configs))
        # Knobs are ordinal (an index into their sorted values): TPE then learns "larger is better".
        params = {"backend": name, **{f"{name}.{knob}": trial.suggest_int(f"{name}.{knob}", 0, len(values) - 1)
                                      for knob, values in self.knobs[name].items()}}
        return self.candidate(params)

    def _distance(self, name: str, config: Config, wanted: dict) -> int:
        return sum(abs(values.index(getattr(config, k)) - values.index(wanted[k]))
                   for k, values in self.knobs[name].items())

    def _nearest(self, name: str, wanted: dict) -> Config:
        """The valid config closest to the sampled knob values (exact when valid)."""
        return min(self.configs[name], key=lambda c: self._distance(name, c, wanted))

    def nearest_new(self, cand: Candidate, exclude: set) -> Candidate | None:
        """The unevaluated candidate closest to `cand` (same backend first), None when all are evaluated."""
        wanted = {k: getattr(cand.config, k) for k in self.knobs[cand.backend]}
        for c in sorted(self.configs[cand.backend], key=lambda c: self._distance(cand.backend, c, wanted)):
            if Candidate(cand.backend, c).key not in exclude:
                return Candidate(cand.backend, c)
        return next((c for c in self.candidates() if c.key not in exclude), None)


def enumerate_space(spec: NormSpec, backends: dict) -> tuple[dict, dict]:
    """(backend -> its valid configs, backend -> {knob: the values it takes, more than one}) for `spec`: the
    enumeration a space is made of, all of its cost."""
    configs = {name: list(b.space(spec)) for name, b in backends.items()}
    configs = {name: cs for name, cs in configs.items() if cs}
    knobs = {}
    for name, cs in configs.items():
        values = {}
        for knob in cs[0].domain():
            seen = []
            for c in cs:
                v = getattr(c, knob)
                if v not in seen:
                    seen.append(v)
            if len(seen) > 1:
                # In declared-domain order, so "nearest" means neighbouring domain values.
                order = list(type(cs[0]).domain()[knob])
                values[knob] = sorted(seen, key=order.index)
        knobs[name] = values
    return configs, knobs


# Fewer specs than this are enumerated in the tuning process, one after another: a worker process started with
# `spawn` imports torch and autonorm first (a few seconds on a loaded 2-core machine), more than a few spaces'
# enumeration (0.2 to 0.3 s each), and on a 2-core CPU two workers would halve at most that. A grid of many specs
# (the standard GPU grid's 168) is enumerated over the workers, whose start the compile pool pays anyway.
PARALLEL_MIN_SPECS = 16


def _enumerate_registered(spec: NormSpec, names: tuple) -> tuple[dict, dict]:
    """`enumerate_space` in a worker process, for the registry's backends named `names` (a backend object holds
    locks and cannot be sent; the registry makes the same one there)."""
    from ..backends import get_backend

    return enumerate_space(spec, {name: get_backend(name) for name in names})


def build_spaces(specs: list, backends: dict, device=None, executor=None, space_cls=None) -> dict:
    """spec -> its space, the same as `space_cls(spec, backends, device)` for each (default SearchSpace, or a
    subclass of it): enumerated over `executor`'s worker processes (a `concurrent.futures` executor, e.g. the
    compile pool's) when there are PARALLEL_MIN_SPECS specs or more and every backend is the registry's (a worker
    makes its own by name), else here, one after another."""
    from ..backends import get_backend

    space_cls = space_cls or SearchSpace
    names = tuple(backends)
    try:
        registered = all(type(get_backend(name)) is type(b) for name, b in backends.items())
    except Exception:  # a backend the registry does not know (a test's fake): enumerated here
        registered = False
    if executor is None or len(specs) < PARALLEL_MIN_SPECS or not registered:
        return {spec: space_cls(spec, backends, device) for spec in specs}
    try:
        parts = list(executor.map(_enumerate_registered, specs, [names] * len(specs)))
    except Exception as exc:  # workers that died or could not start: the same spaces, built here
        log.warning("building the spaces in worker processes failed (%s: %s); building them here",
                    type(exc).__name__, exc)
        return {spec: space_cls(spec, backends, device) for spec in specs}
    return {spec: space_cls(spec, backends, device, part) for spec, part in zip(specs, parts)}


def _frozen(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def audit_together(requests: list) -> None:
    """Audit the candidates of several spaces not judged yet in one call ([(SearchSpace, [Candidate])], one spec
    each; `autonorm.audit.unfit_specs`): each backend's compiler starts once per batch of candidates across the
    specs, not once per study. The verdicts are kept in each space, where `SearchSpace.unfit` finds them.
    Nothing for a space on a device other than CUDA."""
    todo = {}
    for space, cands in requests:
        if space.device is not None and space.device.type == "cuda":
            new = {c.key: c for c in cands if c.key not in space._unfit}
            if new:
                todo.setdefault(id(space), (space, {}))[1].update(new)
    if not todo:
        return
    from ..audit import unfit_specs

    device = next(iter(todo.values()))[0].device
    verdicts = unfit_specs({space.spec: [(c.backend, c.config) for c in new.values()] for space, new in todo.values()},
                           device)
    for space, new in todo.values():
        space._unfit.update({c.key: verdicts[space.spec].get((c.backend, c.config)) for c in new.values()})
