"""The dispatcher's database rungs: which records of the active databases may answer a spec on a device, in
ladder order (exact, nearest rows bucket, nearest hidden size, then another GPU of the same architecture), each
record checked to fit (its backend runs on the device, its config is valid for the spec). The dispatcher
(autonorm/dispatch.py) compiles and probes them in this order and keeps the first that works."""
from __future__ import annotations

import math

from . import db_sources
from .errors import AutonormError
from .spec import NormSpec


def log_distance(a: int, b: int) -> float:
    return abs(math.log2(a) - math.log2(b))


def fits(record, spec: NormSpec, device) -> bool:
    """Whether a record's winner can run `spec` on `device`: its backend supports the device and its
    config is valid for this hidden size."""
    from .backends import get_backend

    winner = record.winner
    try:
        backend = get_backend(winner.backend)
    except AutonormError:
        return False
    return (backend.supports_device(device) and type(winner.config) is backend.config_cls
            and backend.config_cls.is_valid(spec, winner.config) is None)


def nearest(table, key, spec, device, bucket, *, same_hidden: bool):
    """Records of `table` for `key`'s problem ordered by (hidden distance, rows distance), fitting `spec`."""
    found = []
    for k, record in table.by_problem(key):
        if same_hidden and k.hidden != key.hidden:
            continue
        if fits(record, spec, device):
            # Ties go to the larger size: a config tuned for more work rarely under-fills the device.
            found.append(((log_distance(k.hidden, key.hidden), log_distance(k.rows_bucket, bucket),
                           -k.hidden, -k.rows_bucket), k, record))
    found.sort(key=lambda t: t[0])
    return [(k, r) for _, k, r in found]


def candidates(spec: NormSpec, device, bucket):
    """(rung, record key, record, table) in ladder order, lazily (only as far as needed)."""
    from .db import RecordKey
    from .device import identity

    ident = identity(device)
    key = RecordKey.of(spec, bucket)
    own = db_sources.table(ident["slug"])
    if own is not None and own.records:
        record = own.records.get(key)
        # Every rung, the exact one too, checks that the record's backend runs on this device: a CPU
        # database answers for meta tensors too, whose missing data pointer crashes a CPU kernel.
        if record is not None and fits(record, spec, device):
            yield "exact", key, record, own
        for k, r in nearest(own, key, spec, device, bucket, same_hidden=True):
            if k != key:
                yield "nearest-rows", k, r, own
        for k, r in nearest(own, key, spec, device, bucket, same_hidden=False):
            if k.hidden != key.hidden:
                yield "nearest-hidden", k, r, own
    for other in db_sources.same_architecture(ident):
        for k, r in nearest(other, key, spec, device, bucket, same_hidden=False):
            yield "same-arch", k, r, other
