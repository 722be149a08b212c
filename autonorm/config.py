"""Launch configurations: frozen dataclasses whose every field has a finite domain.

A backend declares its `Config` subclass with `knob(...)` fields. The domain is
the whole truth about what may be rendered: a config read from a tuning database
(untrusted input) goes through `Config.from_dict`, which refuses unknown keys,
missing keys, wrong types and values outside the domain, so nothing a database
holds can reach a template unless it is one of the declared literals.

Spec-dependent rules (e.g. "BLOCK_N must cover the row or the kernel loops")
live next to the config as `is_valid(spec) -> str | None` (None means valid, a
string says why not), with `heuristic(spec)` and `space(spec)` beside it.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

from .errors import InvalidConfigError
from .spec import NormSpec


def candidate_key(backend: str, config: dict) -> str:
    """The one name of a tuning candidate (a backend and its config as a dict): the tuner's trials, search tables
    and session files all key candidates by it."""
    return json.dumps([backend, config], sort_keys=True)


def knob(domain: tuple, doc: str = "") -> Any:
    """A tunable field: `domain` lists every value it may take (finite, literal)."""
    if not domain:
        raise ValueError("a knob needs a non-empty domain")
    for value in domain:
        if not isinstance(value, (int, str, bool)):
            raise TypeError(f"domain values must be int, str or bool literals, got {value!r}")
    return field(metadata={"domain": tuple(domain), "doc": doc})


@dataclass(frozen=True)
class Config:
    """Base of every backend's launch configuration."""

    backend: ClassVar[str] = "?"

    def __post_init__(self):
        for name, domain in self.domain().items():
            value = getattr(self, name)
            # bool is an int subclass: keep True from passing for 1 and back.
            if not any(type(value) is type(d) and value == d for d in domain):
                raise InvalidConfigError(
                    f"{self.backend} config: {name}={value!r} is outside its domain {list(domain)}")

    @classmethod
    def domain(cls) -> dict[str, tuple]:
        """Field name -> tuple of allowed values."""
        return {f.name: f.metadata["domain"] for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, data: Any) -> "Config":
        """Build from untrusted data (a database record, a CLI string)."""
        if not isinstance(data, dict):
            raise InvalidConfigError(f"{cls.backend} config must be an object, got {type(data).__name__}")
        names = set(cls.domain())
        unknown, missing = set(data) - names, names - set(data)
        if unknown:
            raise InvalidConfigError(f"{cls.backend} config: unknown keys {sorted(unknown)} (known: {sorted(names)})")
        if missing:
            raise InvalidConfigError(f"{cls.backend} config: missing keys {sorted(missing)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def short(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.to_dict().items()) or "-"

    def min_compute_capability(self) -> int:
        """The oldest GPU generation (major * 10 + minor) the config can run on: 0 for any. A config that
        needs a newer one (thread-block clusters: 90) is refused when built on an older device and left
        out of that device's audited search space."""
        return 0

    # --- spec-dependent rules: overridden by each backend's config -------------
    @classmethod
    def is_valid(cls, spec: NormSpec, config: "Config") -> str | None:
        """None when `config` can run `spec`, else the reason it cannot."""
        return None

    @classmethod
    def heuristic(cls, spec: NormSpec) -> "Config":
        """A good config without measuring (the dispatcher's last rung before torch)."""
        return cls(**{name: domain[0] for name, domain in cls.domain().items()})

    @classmethod
    def all_configs(cls) -> Iterator["Config"]:
        """Every point of the declared domain (the product of the knobs)."""
        domain = cls.domain()
        for values in itertools.product(*domain.values()):
            yield cls(**dict(zip(domain, values)))

    @classmethod
    def space(cls, spec: NormSpec) -> list["Config"]:
        """The search space for `spec`: the domain pruned by validity."""
        return [c for c in cls.all_configs() if cls.is_valid(spec, c) is None]


@dataclass(frozen=True)
class NoConfig(Config):
    """For backends without tunables (torch eager)."""

    backend: ClassVar[str] = "torch"
