"""A package's lazy attributes (autonorm/lazy.py): each loads from its submodule on first read, an unknown
name is an AttributeError naming the package, and `dir` lists the lazy names before any has loaded."""
import subprocess
import sys
import types

import pytest

import autonorm
from autonorm import bench, tune
from autonorm.lazy import lazy_exports


def _package(name: str, where: dict, *, bind: bool) -> types.ModuleType:
    """A stand-in package named `name` whose lazy names come from autonorm's submodules."""
    package = types.ModuleType(name)
    package.__path__ = autonorm.__path__
    package.__getattr__, package.__dir__ = lazy_exports(vars(package), where, bind=bind)
    return package


@pytest.mark.parametrize("package", [autonorm, bench, tune])
def test_an_unknown_name_is_an_attribute_error_naming_the_package(package):
    with pytest.raises(AttributeError, match=rf"module '{package.__name__}' has no attribute 'nope'"):
        package.nope  # noqa: B018


def test_a_name_loads_from_its_submodule():
    package = _package("autonorm", {"NormSpec": "spec"}, bind=False)
    from autonorm.spec import NormSpec

    assert package.NormSpec is NormSpec


def test_a_bound_name_is_kept_in_the_package_and_an_unbound_one_follows_its_module(monkeypatch):
    bound = _package("autonorm", {"rows_bucket": "spec"}, bind=True)
    unbound = _package("autonorm", {"rows_bucket": "spec"}, bind=False)
    first = bound.rows_bucket
    assert vars(bound)["rows_bucket"] is first and "rows_bucket" not in vars(unbound)
    monkeypatch.setattr("autonorm.spec.rows_bucket", lambda m: 0)
    assert bound.rows_bucket is first
    assert unbound.rows_bucket(5) == 0


def test_dir_lists_lazy_names_before_they_load():
    code = ("import autonorm, autonorm.tune as t, autonorm.bench as b, sys; print('rms_norm' in dir(autonorm), "
            "'tune_grid' in dir(t), 'write_report' in dir(b), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "True", "False"]
