"""The parts of a fake backend every test's fake shares; each test adds its config, hash and build."""
from autonorm.backends.base import Backend
from autonorm.render import Source


class FakeBackendBase(Backend):
    """Always available (unless a test sets `reason`), on any device, with a template hash of its own."""

    name = "fake"
    reason = None
    fake_hash = "fake-1"

    def unavailable_reason(self):
        return self.reason

    def version(self):
        return "1"

    def supports_device(self, device):
        return True

    def template_name(self, spec):
        return ""

    def template_hash(self):
        return self.fake_hash

    def render(self, spec, config):
        self.validate(spec, config)
        return Source.of(f"fake {spec!r} {config!r}", "")
