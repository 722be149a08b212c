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
