"""Render a template into kernel source: the first of render -> compile -> run.

Templates live in the top-level `templates/` folder, installed as
`autonorm.templates`. Rendering is strict (an undefined name is an error, not an
empty string) and returns the text with its sha256, which keys the compile cache.
Only a spec and a config that passed its domain check ever reach a template.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources

import jinja2

from .config import Config
from .spec import NormSpec


@dataclass(frozen=True)
class Source:
    """Generated kernel source and its identity."""

    text: str
    sha256: str
    template: str

    @classmethod
    def of(cls, text: str, template: str) -> "Source":
        return cls(text, hashlib.sha256(text.encode()).hexdigest(), template)


@functools.cache
def environment() -> jinja2.Environment:
    # PackageLoader works both from a wheel and from an editable install, where
    # autonorm.templates maps to the top-level templates/ folder.
    return jinja2.Environment(
        loader=jinja2.PackageLoader("autonorm.templates", "."),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template: str, spec: NormSpec, config: Config, **context) -> Source:
    """Render `template` (a path under templates/) for a validated spec and config."""
    text = environment().get_template(template).render(spec=spec, config=config, **context)
    return Source.of(text, template)


def template_hash(folder: str, *source_files: str) -> str:
    """sha256 over every template of a templates/ subfolder plus the Python source files given.

    Recorded with every database record: a record whose hash differs was tuned
    for other kernels (or other launch code) and must not be used.
    """
    digest = hashlib.sha256()
    root = resources.files("autonorm.templates") / folder
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_file() and entry.name.endswith(".j2"):
            digest.update(entry.name.encode())
            digest.update(entry.read_bytes())
    for path in source_files:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]
