"""The audit as a table (terminal or Markdown), as the hardware-fit page (docs/benchmarks/hardware-fit.md),
and as a saved report: every kernel's profile keyed by what was compiled (docs/benchmarks/hardware-fit.json),
which the CI gate checks against the kernels the code renders today without compiling them again, and
which `compare` holds a fresh audit against (another compiler version: the same sources, other registers)."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from ..hardware import ARCHS
from .jobs import Job
from .profile import PROFILE_VERSION, Profile, gate_failures, occupancy

# What a saved report keeps of a profile: what the compiler said. Occupancy is recomputed on load
# from the architecture's limits, and the mangled kernel name is left out (it is long and says nothing).
_SAVED = tuple(f.name for f in dataclasses.fields(Profile)
               if f.name not in ("kernel", "blocks_per_sm", "warps_per_sm", "occupancy", "limiter"))


class ReportError(ValueError):
    """A saved report that cannot be read: it names the file and what is wrong."""


def save_report(path, jobs: list[Job], profiles: list[Profile], versions: dict, command: str) -> None:
    """Write the profiles of `jobs`, keyed by `Job.identity()`, atomically (one kernel per line)."""
    import datetime

    head = {"profile_version": PROFILE_VERSION, "generated": datetime.date.today().isoformat(),
            "command": command, "toolchain": versions}
    kernels = sorted((dict(identity=j.identity(), **{k: getattr(p, k) for k in _SAVED})
                      for j, p in zip(jobs, profiles)), key=lambda k: (k["backend"], k["spec"], k["arch"]))
    lines = [json.dumps(head, sort_keys=True)[:-1] + ', "kernels": [']
    lines += [json.dumps(k, sort_keys=True) + ("," if i < len(kernels) - 1 else "") for i, k in enumerate(kernels)]
    lines.append("]}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def load_report(path) -> dict[str, Profile]:
    """`Job.identity()` -> Profile of a saved report (occupancy recomputed); ReportError if unreadable."""
    try:
        data = json.loads(Path(path).read_text())
        if data["profile_version"] != PROFILE_VERSION:
            raise ReportError(f"{path}: profile version {data['profile_version']}, expected {PROFILE_VERSION}; "
                              "regenerate it with the command it names")
        out = {}
        for k in data["kernels"]:
            if k["arch"] not in ARCHS:
                raise ReportError(f"{path}: unknown arch {k['arch']!r}")
            p = Profile(kernel="", **{name: k[name] for name in _SAVED})
            out[k["identity"]] = occupancy(p, ARCHS[p.arch])
        return out
    except ReportError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"{path}: not a saved audit report ({type(exc).__name__}: {exc})") from exc


def saved_toolchain(path) -> dict:
    """The compiler versions a saved report was made with (empty if it does not say)."""
    try:
        return dict(json.loads(Path(path).read_text()).get("toolchain") or {})
    except (OSError, ValueError, AttributeError) as exc:
        raise ReportError(f"{path}: not a saved audit report ({type(exc).__name__}: {exc})") from exc


def compare(jobs: list[Job], profiles: list[Profile], saved: dict[str, Profile]) -> tuple[str, int]:
    """This audit against a saved report of the same kernels (matched by `Job.identity()`), typically made
    with another compiler version: a summary, then one row per kernel whose fit, occupancy or spills
    changed. Returns the text and how many kernels fit in the report but do not fit now."""
    rows, lost, gained, lower, higher, regs_changed, missing = [], 0, 0, 0, 0, 0, 0
    for job, new in zip(jobs, profiles):
        old = saved.get(job.identity())
        if old is None:
            missing += 1
            continue
        fit_old, fit_new = not gate_failures(old, job.spec), not gate_failures(new, job.spec)
        lost += fit_old and not fit_new
        gained += fit_new and not fit_old
        lower += new.occupancy < old.occupancy
        higher += new.occupancy > old.occupancy
        regs_changed += new.registers != old.registers
        if (fit_old, old.occupancy, old.spill_bytes) != (fit_new, new.occupancy, new.spill_bytes):
            wide = "global_loads_64" if job.backend == "numba" else "global_loads_128"
            rows.append((new.backend, new.arch, new.spec, new.config, f"{old.registers} -> {new.registers}",
                         f"{old.spill_bytes} -> {new.spill_bytes}", f"{old.occupancy:.0%} -> {new.occupancy:.0%}",
                         f"{getattr(old, wide)}/{old.global_loads} -> {getattr(new, wide)}/{new.global_loads}",
                         f"{'yes' if fit_old else 'no'} -> {'yes' if fit_new else 'no'}"))
    compared = len(jobs) - missing
    lines = [f"{compared} of {len(jobs)} kernels compared ({missing} not in the report); registers differ in "
             f"{regs_changed}; occupancy lower in {lower}, higher in {higher}; {lost} fit there and not here, "
             f"{gained} fit here and not there"]
    if rows:
        head = ("backend", "arch", "spec", "config", "regs", "spill", "occupancy", "wide loads", "fits")
        lines += ["", *_aligned([head, *rows])]
    return "\n".join(lines), lost


COLUMNS = ("backend", "arch", "spec", "config", "regs", "spill", "stack", "smem", "threads", "blocks/SM",
           "occupancy", "ld128", "ld64", "st128", "cp.async")


def row(p: Profile) -> tuple:
    return (p.backend, p.arch, p.spec, p.config, p.registers, p.spill_bytes, p.stack,
            p.smem_static + p.smem_dynamic, p.threads, p.blocks_per_sm, f"{p.occupancy:.0%}",
            f"{p.global_loads_128}/{p.global_loads}", f"{p.global_loads_64}/{p.global_loads}",
            f"{p.global_stores_128}/{p.global_stores}", p.cp_async)


def table(profiles: list[Profile], markdown: bool = False) -> str:
    rows = [tuple(map(str, COLUMNS))] + [tuple(map(str, row(p))) for p in profiles]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        lines.insert(1, "|" + "|".join("---" for _ in COLUMNS) + "|")
        return "\n".join(lines)
    return "\n".join(_aligned(rows))


def _aligned(rows: list[tuple]) -> list[str]:
    """Rows as lines of left-aligned columns, two spaces apart."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def doc(jobs: list[Job], profiles: list[Profile], versions: dict, command: str) -> str:
    """The hardware-fit page: per backend, one row per spec with both architectures side by side."""
    import datetime

    archs = list(dict.fromkeys(p.arch for p in profiles))
    by_key = {(j.backend, j.spec, j.arch): (j, p) for j, p in zip(jobs, profiles)}
    fits = sum(not gate_failures(p, j.spec) for j, p in zip(jobs, profiles))
    lines = [
        "# Hardware fit of the heuristic kernels",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()} (no GPU: cross-compiled).",
        "Toolchain: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        "Per kernel and architecture: registers per thread, spill bytes (stores + loads), threads per block,",
        "resident blocks per SM and theoretical occupancy (warps resident / 64), and wide global loads out",
        "of all global loads (from the SASS): 128-bit, or 64-bit for Numba CUDA, whose widest access is one",
        "64-bit word. A kernel fits when it does not spill, a block can be resident (registers x threads <=",
        "65,536) and x is loaded 16 bytes at a time wherever N * itemsize is a multiple of 16 (Numba CUDA: 8",
        "bytes wherever it is a multiple of 8). Regenerate with the command above; `autonorm audit --grid",
        "standard --save docs/benchmarks/hardware-fit.json` writes the same profiles as JSON, keyed by the",
        "rendered source, which `tests/test_audit.py` checks in every CI run against the kernels the code",
        "renders then.",
        "",
        f"**{fits} of {len(profiles)} kernels fit.**",
    ]
    for backend in dict.fromkeys(j.backend for j in jobs):
        lines += ["", f"## {backend}", ""]
        head = ["op", "dir", "dtype", "N", "config"]
        wide = "ld64" if backend == "numba" else "ld128"
        for a in archs:
            head += [f"{a} regs", f"{a} spill", f"{a} threads", f"{a} blocks/SM", f"{a} occ.", f"{a} {wide}"]
        head.append("fits")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for spec in dict.fromkeys(j.spec for j in jobs if j.backend == backend):
            cells = [spec.op, spec.direction, spec.x_dtype, str(spec.hidden)]
            ok = True
            config = ""
            for a in archs:
                job, p = by_key[(backend, spec, a)]
                config = job.config.short()
                ok &= not gate_failures(p, spec)
                wide_loads = p.global_loads_64 if backend == "numba" else p.global_loads_128
                cells += [str(p.registers), str(p.spill_bytes), str(p.threads), str(p.blocks_per_sm),
                          f"{p.occupancy:.0%}", f"{wide_loads}/{p.global_loads}"]
            cells.insert(4, f"`{config}`")
            cells.append("yes" if ok else "**no**")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
