"""`autonorm bench --json` files read back: each row checked for the fields a report reads (a file that is no
bench output is a BenchFileError naming it), and the rows merged per device, a later file's row replacing an
earlier one of the same case and provider."""
from __future__ import annotations

import json
import re

from ..errors import AutonormError


def provider_of(impl: str) -> str:
    """Provider name of a row's impl ('autonorm[triton]' -> 'autonorm'); rows of older files lack it."""
    return "autonorm" if impl.startswith("autonorm") else impl


def _provider(row: dict) -> str:
    return row.get("provider") or provider_of(row["impl"])


class BenchFileError(AutonormError, ValueError):
    """A file given as `autonorm bench` rows that is not one (not JSON, no rows, a row missing a field)."""


# The fields of a row that the report reads; a row without one is refused by name, not met as a KeyError.
ROW_FIELDS = ("case", "impl", "spec", "rows", "median_us", "gbps")
SPEC_FIELDS = ("op", "direction", "x_dtype", "hidden")


def read_bench_json(path: str) -> dict:
    """The document in an `autonorm bench --json` file; BenchFileError naming the file and what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as exc:
        raise BenchFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: /dev/null, a PNG, a truncated file
        raise BenchFileError(f"{path}: not an `autonorm bench --json` file (not JSON: {exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise BenchFileError(f"{path}: not an `autonorm bench --json` file (no rows list)")
    for number, row in enumerate(doc["rows"]):
        missing = [k for k in ROW_FIELDS if not isinstance(row, dict) or k not in row]
        missing += [f"spec.{k}" for k in SPEC_FIELDS if not missing and not (
            isinstance(row["spec"], dict) and k in row["spec"])]
        if missing:
            raise BenchFileError(f"{path}: row {number} is not a bench row (missing {', '.join(missing)})")
    return doc


def is_cache_resident(row: dict) -> bool:
    """Whether a row's inputs were (partly) read from a cache, so that its GB/s is no DRAM figure: marked so
    by `autonorm bench`, or, in files older than that mark, faster than the DRAM copy probe."""
    return bool(row.get("cache_resident")) or (row.get("pct_copy_bw") or 0) > 100


def load(json_paths: list[str]) -> dict[str, dict]:
    """Bench documents merged per device slug: {slug: {"device", "versions", "copy_gbps", "dates", "rows",
    "skipped"}}. A later file's row for the same (case, provider) replaces an earlier one. The slug is
    made safe as a file name (`file_slug`): it names the output files."""
    out: dict[str, dict] = {}
    for path in json_paths:
        doc = read_bench_json(path)
        device = doc.get("device") if isinstance(doc.get("device"), dict) else {}
        slug = file_slug(device.get("slug") or "unknown")
        d = out.setdefault(slug, {"device": device, "versions": {}, "copy_gbps": [],
                                  "dates": [], "rows": {}, "skipped": {}, "protocol": doc.get("protocol", {})})
        d["versions"].update(doc.get("versions") or {})
        if doc.get("copy_bandwidth_gbps"):
            d["copy_gbps"].append(float(doc["copy_bandwidth_gbps"]))
        d["dates"] += [r.get("date") or doc.get("date") for r in doc["rows"]] + [doc.get("date")]
        for row in doc["rows"]:
            d["rows"][(row["case"], _provider(row))] = row
        d["skipped"].update(doc.get("skipped") or {})
    return out


def file_slug(slug: str) -> str:
    """`slug` as a file-name stem: only [a-z0-9._-], no leading dot (so neither a path nor a hidden file).

    The slug comes from the input JSON, which is untrusted: `../x` or `/abs` must not steer where
    the report is written.
    """
    name = re.sub(r"[^a-z0-9._-]+", "-", str(slug).lower()).lstrip(".")
    return name or "unknown"
