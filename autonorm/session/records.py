"""The session's files: one JSON line per finished case, appended at once, read back by the parent,
the summary and the import."""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

# The out folder holds at most these files, whatever ran.
FILES = ("session.log", "session.jsonl", "smoke.jsonl", "bench.jsonl", "variants.jsonl", "tune.jsonl", "sweep.jsonl")
CASE_MARK = "@case "  # a phase prints this before each case: the parent knows where a cut or crash hit
EXIT_OUT_OF_SHARE = 3  # a phase stopped before its next case for lack of time: cases are left
EXIT_CONTEXT_LOST = 70  # a phase exits with this after a sticky CUDA error: restarted fresh


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def append_line(path: Path, obj: dict) -> None:
    """One finished case, on disk at once (a killed process loses nothing it finished)."""
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_lines(path: Path) -> list[dict]:
    """The JSON lines of a file; a line cut by a kill (the last one) is skipped."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def phase_file(out: Path, phase: str) -> Path:
    """The file a phase appends its cases to: the smoke phases share one; env's facts go to session.jsonl."""
    if phase == "env":
        return out / "session.jsonl"
    return out / ("smoke.jsonl" if phase.startswith("smoke-") else f"{phase}.jsonl")


def env_facts(out: Path) -> dict:
    """{'identity': ..., 'copy bandwidth': ...} from the env phase's lines (missing keys: not measured)."""
    facts = {}
    for line in read_lines(out / "session.jsonl"):
        if line.get("case") in ("identity", "copy bandwidth") and line.get("status") == "ok":
            facts[line["case"]] = line
    return facts


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 600 else text[:600] + " ..."
