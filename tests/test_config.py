"""A backend's Config: a frozen set of knobs, each taking only the values of its declared domain, rebuilt from
untrusted data (a database) only through that domain, and seen by templates only through its declared fields."""
import dataclasses

import jinja2
import pytest

from autonorm.backends import get_backend
from autonorm.config import Config, knob
from autonorm.errors import InvalidConfigError
from autonorm.render import environment
from autonorm.spec import NormSpec


@dataclasses.dataclass(frozen=True)
class DemoConfig(Config):
    backend = "demo"
    BLOCK: int = knob((64, 128, 256))
    mode: str = knob(("registers", "shared"))
    fast: bool = knob((False, True))


def test_a_config_takes_only_its_domain_values_and_from_dict_only_its_keys():
    assert DemoConfig(128, "shared", True).to_dict() == {"BLOCK": 128, "mode": "shared", "fast": True}
    assert len(list(DemoConfig.all_configs())) == 12
    with pytest.raises(InvalidConfigError, match="BLOCK=100"):
        DemoConfig(100, "shared", False)
    with pytest.raises(InvalidConfigError, match="unknown keys"):
        DemoConfig.from_dict({"BLOCK": 64, "mode": "shared", "fast": False, "extra": 1})
    with pytest.raises(InvalidConfigError, match="missing keys"):
        DemoConfig.from_dict({"BLOCK": 64})
    # A value carrying code is not a domain literal, so it never reaches a template.
    with pytest.raises(InvalidConfigError, match="outside its domain"):
        DemoConfig.from_dict({"BLOCK": 64, "mode": "shared\n}\nimport os; os.system('x')", "fast": False})
    # bool and int are different types even though True == 1.
    with pytest.raises(InvalidConfigError):
        DemoConfig.from_dict({"BLOCK": 64, "mode": "shared", "fast": 1})
    with pytest.raises(InvalidConfigError, match="must be an object"):
        DemoConfig.from_dict(["BLOCK", 64])


def test_a_template_reading_an_undeclared_config_field_fails_to_render():
    with pytest.raises(jinja2.UndefinedError):
        environment().from_string("{{ config.NOT_A_FIELD }}").render(config=DemoConfig(64, "shared", False))


def test_a_backend_refuses_another_backends_config():
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 8)
    with pytest.raises(InvalidConfigError, match="expects a NoConfig"):
        get_backend("torch").render(spec, DemoConfig(64, "shared", False))
