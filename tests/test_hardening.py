"""Edges a new user and an adversarial run hit: work lost to a wrong path, figures that mislead, memory,
tracebacks where one line says it, and the database's and the fleet's edges."""
import json
import os
from pathlib import Path

import pytest

from autonorm import knobs

# --- folders from the environment ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "  ", "relative/cache"])
def test_an_empty_or_relative_xdg_cache_home_counts_as_unset(monkeypatch, value):
    monkeypatch.delenv("AUTONORM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", value)
    assert knobs.cache_dir() == Path.home() / ".cache" / "autonorm"


def test_a_relative_autonorm_cache_dir_is_ignored_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("AUTONORM_CACHE_DIR", "autonorm")  # from the project root: the package folder
    with pytest.warns(RuntimeWarning, match="AUTONORM_CACHE_DIR='autonorm' is a relative path"):
        assert knobs.cache_dir() == tmp_path / "autonorm"
    monkeypatch.setenv("AUTONORM_CACHE_DIR", str(tmp_path / "mine"))
    assert knobs.cache_dir() == tmp_path / "mine"


def test_the_user_database_folder_follows_the_same_rule(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", "relative")
    monkeypatch.setenv("AUTONORM_USER_DB_DIR", "")
    assert knobs.user_db_dir() == Path.home() / ".local" / "share" / "autonorm"
    monkeypatch.setenv("AUTONORM_USER_DB_DIR", "db")
    with pytest.warns(RuntimeWarning, match="AUTONORM_USER_DB_DIR"):
        assert knobs.user_db_dir() == Path.home() / ".local" / "share" / "autonorm"


# --- memory: the copy-bandwidth probe ---------------------------------------------------------------------


def test_the_copy_probe_is_capped_by_size_and_by_the_memory_left():
    from autonorm import measure

    big_l3 = 480 << 20  # a VM reporting a 480 MiB L3 made each buffer 1.9 GB (4.2 GB peak with randn)
    assert measure.probe_bytes(big_l3, None) == measure.PROBE_MAX_BYTES
    assert measure.probe_bytes(big_l3, 2 << 30) == (2 << 30) // measure.PROBE_MEMORY_SHARE  # a 2 GiB container
    assert measure.probe_bytes(8 << 20, 64 << 30) == 64 << 20  # a small cache: 64 MiB, as before
    available = measure.available_memory()
    assert available is None or available > 0


def test_the_copy_probe_stops_sampling_at_its_time_limit(monkeypatch):
    from autonorm import measure

    clock = iter(range(0, 10_000, 10))  # every reading 10 s after the last
    monkeypatch.setattr(measure.time, "perf_counter", lambda: float(next(clock)))
    sampled = []
    real_median = measure.statistics.median
    monkeypatch.setattr(measure.statistics, "median", lambda xs: sampled.append(len(xs)) or real_median(xs))
    assert measure.copy_bandwidth("cpu", nbytes=1 << 20, reps=1000, max_s=1.0) > 0
    assert sampled == [5]  # the minimum after 3 fault-in copies, not 1,000
