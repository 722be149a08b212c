"""Shared test helpers: the parts of a fake backend every test's fake shares, and loading a script of scripts/."""
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


class TorchBackedFake(FakeBackendBase):
    """A fake whose kernels compute with torch eager (always right) and carry their config, for a scripted
    timer to read."""

    def build(self, source, spec, config, device):
        from autonorm.backends.torch_eager import TorchBackend

        inner = TorchBackend().build(None, spec, None, device)

        def kernel(*args):
            return inner(*args)
        kernel.config = config
        return kernel


class ScriptedTimer:
    """A timer for the tuner whose search timings are steady (`search_us`, p80/p20 1.1) and whose interleaved
    re-timings follow a script: each call takes the next (median, p20, p80) and repeats the last one after."""

    def __init__(self, search_us=10.0, retimes=((10.0, 9.5, 10.5),)):
        self.search_us, self.retimes, self.interleaved_calls = search_us, list(retimes), 0

    def measure(self, spec, kernel, rows):
        from autonorm.measure import Timing

        return Timing(self.search_us, self.search_us * 0.95, self.search_us * 1.045, 10)

    def interleaved(self, spec, kernels, rows):
        from autonorm.measure import Timing

        median, p20, p80 = self.retimes[min(self.interleaved_calls, len(self.retimes) - 1)]
        self.interleaved_calls += 1
        return [Timing(median, p20, p80, 10) for _ in kernels]

    def describe(self):
        return {"timer": "scripted"}


def audited(job, *, registers=32, spill_stores=0, threads=256, global_loads=1):
    """The audit's answer for `job` (an audit job) as a fake audit gives it: a profile with these figures, the
    rest zero or one, and its occupancy on the job's architecture."""
    from autonorm import audit

    profile = audit.Profile(job.backend, "", "", job.arch, "k", registers=registers, spill_stores=spill_stores,
                            spill_loads=0, stack=0, smem_static=0, smem_dynamic=0, threads=threads,
                            global_loads=global_loads, global_loads_128=global_loads, global_loads_64=0,
                            global_stores=1, global_stores_128=1, cp_async=0, sass_sha256="")
    return audit.occupancy(profile, audit.ARCHS[job.arch])


def load_script(name: str):
    """scripts/<name>.py as a module, with scripts/ on the path while it loads (it imports the scripts beside it)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "scripts"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module
