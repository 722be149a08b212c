"""The dispatcher's ladder on crafted databases, stale records, forcing, explain and logging.

A tiny fake backend (registered by monkeypatching the registry) has one knob,
`block`, valid only when it covers the row; its kernels are the torch
backend's, so results can be checked against torch while the chosen config
tells which database record won.
"""
import json
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fakes import FakeBackendBase

import autonorm
from autonorm import backends, db_sources, dispatch
from autonorm.config import Config, knob
from autonorm.db import now_iso
from autonorm.device import identity
from autonorm.errors import DatabaseError, UnknownBackendError

FAKE_HASH = "fake-template-v1"
TIMING = {"median_us": 2.0, "p20_us": 1.9, "p80_us": 2.1}


@dataclass(frozen=True)
class FakeConfig(Config):
    backend = "fake"
    block: int = knob((16, 64, 256, 1024))

    @classmethod
    def is_valid(cls, spec, config):
        return None if config.block >= spec.hidden else f"block {config.block} < hidden {spec.hidden}"

    @classmethod
    def heuristic(cls, spec):
        return next(c for c in cls.all_configs() if cls.is_valid(spec, c) is None)


class FakeBackend(FakeBackendBase):
    config_cls = FakeConfig
    fake_hash = FAKE_HASH

    def build(self, source, spec, config, device):
        torch_backend = backends.get_backend("torch")
        return torch_backend.build(torch_backend.render(spec, torch_backend.heuristic(spec)), spec, config, device)


class GoneBackend(FakeBackend):
    name = "gone"
    reason = "its compiler is not installed (pip install gone)"


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for var in ("AUTONORM_BACKEND", "AUTONORM_DB_PATH", "AUTONORM_DISABLE", "AUTONORM_LOG",
                "AUTONORM_TUNE_ON_MISS", "AUTONORM_VERIFY_DB"):
        monkeypatch.delenv(var, raising=False)
    for name, cls in (("fake", FakeBackend), ("gone", GoneBackend)):
        monkeypatch.setitem(backends.BACKENDS, name, f"tests:{cls.__name__}")
        monkeypatch.setitem(backends._instances, name, cls())
    # Only the crafted databases count: no shipped file may answer for this machine.
    monkeypatch.setattr(db_sources, "_shipped", lambda: [])
    # The automatic rung without databases: the fake backend, then torch.
    monkeypatch.setitem(dispatch.DEFAULT_ORDER, "cpu", ("gone", "fake", "torch"))
    db_sources.forget(user_paths=True)
    dispatch.reset()
    yield
    db_sources.forget(user_paths=True)
    dispatch.reset()


def record(hidden, bucket, block=None, *, backend="fake", template_hash=FAKE_HASH, config=None):
    return {
        "key": {"op": "rmsnorm", "direction": "fwd", "x_dtype": "float32", "w_dtype": "float32",
                "features": "weight", "hidden": hidden, "rows_bucket": bucket},
        "winner": {"backend": backend, "config": config if config is not None else {"block": block},
                   "median_us": 1.0, "p20_us": 0.9, "p80_us": 1.1, "gbps": 100.0, "pct_copy_bw": 50.0},
        "runners_up": [], "baselines": {"torch_eager": TIMING, "torch_compile": TIMING},
        "template_hash": template_hash, "trials": 10, "failed": 0, "date": now_iso(),
    }


def write_db(path, records, *, slug=None, kind="cpu", cc=None):
    slug = slug or identity("cpu")["slug"]
    obj = {"schema_version": 1,
           "device": {"name": slug, "slug": slug, "kind": kind, "compute_capability": cc, "sm_count": 2,
                      "l2_bytes": 0, "copy_gbps": None},
           "versions": {"autonorm": autonorm.__version__, "torch": torch.__version__},
           "protocol": {}, "records": records}
    path.write_text(json.dumps(obj))
    return path


def choose(rows, hidden):
    x = torch.randn(rows, hidden)
    w = torch.randn(hidden)
    y = autonorm.rms_norm(x, (hidden,), w, 1e-6)
    torch.testing.assert_close(y, F.rms_norm(x, (hidden,), w, 1e-6), rtol=1e-5, atol=1e-5)
    return autonorm.explain("rms_norm", x, (hidden,), w, 1e-6)


@pytest.fixture
def own_db(tmp_path):
    # Exact-rows record (block 64), a far-rows record of the same hidden (block 256), a large hidden (1024).
    return write_db(tmp_path / "own.json", [record(64, 4, 64), record(64, 64, 256), record(1024, 4, 1024)])


def test_exact_record(own_db):
    autonorm.load_db(own_db)
    c = choose(3, 64)
    assert (c.rung, c.backend, c.config.block) == ("exact", "fake", 64)


def test_nearest_rows_bucket(own_db):
    autonorm.load_db(own_db)
    c = choose(200, 64)  # bucket 256: bucket 64 is 2 doublings away, bucket 4 six
    assert (c.rung, c.config.block) == ("nearest-rows", 256)


def test_nearest_hidden_skips_invalid_configs(own_db):
    autonorm.load_db(own_db)
    # N=100: the closest record (N=64, rows 4, block 64) cannot cover the row; the next N=64 one can.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # filtered by validity, not tried and failed at compile time
        c = choose(3, 100)
    assert (c.rung, c.config.block) == ("nearest-hidden", 256)
    c = choose(3, 800)  # only block 1024 covers N=800
    assert (c.rung, c.config.block) == ("nearest-hidden", 1024)


def test_same_architecture(tmp_path, monkeypatch):
    # This "GPU" has no database; another GPU of compute capability 9.0 does, one of 8.0 too.
    me = {"name": "GPU A", "slug": "gpu-a", "kind": "cuda", "compute_capability": "9.0"}
    monkeypatch.setattr("autonorm.device.identity", lambda device=None: me)
    write_db(tmp_path / "b.json", [record(64, 4, 1024)], slug="gpu-b", kind="cuda", cc="9.0")
    write_db(tmp_path / "c.json", [record(64, 4, 64)], slug="gpu-c", kind="cuda", cc="8.0")
    monkeypatch.setenv("AUTONORM_DB_PATH", str(tmp_path))
    c = choose(3, 64)
    assert (c.rung, c.config.block) == ("same-arch", 1024)
    assert "gpu-b" in c.describe()


def test_heuristic_and_torch_rungs(monkeypatch):
    c = choose(3, 100)  # no database: "gone" is unavailable, so the fake backend's heuristic
    assert (c.rung, c.backend, c.config.block) == ("heuristic", "fake", 256)
    monkeypatch.setitem(dispatch.DEFAULT_ORDER, "cpu", ("gone", "torch"))
    autonorm.reset()
    c = choose(3, 100)
    assert (c.rung, c.backend) == ("torch", "torch")


def test_stale_and_unavailable_records_skipped_with_one_warning(tmp_path):
    path = write_db(tmp_path / "stale.json", [record(64, 4, 64, template_hash="old-templates"),
                                              record(64, 8, 64, template_hash="old-templates"),
                                              record(64, 16, 64, backend="gone")])
    autonorm.load_db(path)
    with pytest.warns(RuntimeWarning) as caught:
        c = choose(3, 64)
        choose(10, 64)  # a second key, same file: no second warning
    messages = [str(w.message) for w in caught if "autonorm" in str(w.message)]
    assert len(messages) == 1, messages
    assert "3 of 3 records" in messages[0] and "stale template hash" in messages[0]
    assert "backend gone unavailable" in messages[0] and "stale.json" in messages[0]
    assert c.rung == "heuristic"  # never the stale record


def test_later_databases_override_earlier(tmp_path, monkeypatch):
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    write_db(env_dir / "a.json", [record(64, 4, 64)])
    monkeypatch.setenv("AUTONORM_DB_PATH", str(env_dir))
    assert choose(3, 64).config.block == 64
    autonorm.load_db(write_db(tmp_path / "user.json", [record(64, 4, 256)]))
    assert choose(3, 64).config.block == 256


def test_broken_databases_are_named(tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, "device": ')
    with pytest.raises(DatabaseError, match="bad.json"):
        autonorm.load_db(bad)
    with pytest.raises(DatabaseError, match="refused|domain"):  # a config outside its declared domain
        autonorm.load_db(write_db(tmp_path / "evil.json", [record(64, 4, config={"block": "__import__('os')"})]))
    monkeypatch.setenv("AUTONORM_DB_PATH", str(tmp_path / "missing.json"))
    autonorm.reset()  # loading is lazy: nothing is read until the first resolution
    with pytest.warns(RuntimeWarning, match="missing.json"):  # a training step warns, never raises
        assert choose(3, 64).rung == "heuristic"


def test_bad_database_files_warn_and_fall_back_in_training_code(tmp_path, monkeypatch):
    import os

    folder = tmp_path / "dbs"
    folder.mkdir()
    write_db(folder / "b-good.json", [record(64, 4, 256)])
    (folder / "a-truncated.json").write_text('{"schema_version": 1, "device": ')
    (folder / "c-utf16.json").write_bytes(json.dumps({"records": []}).encode("utf-16"))
    (folder / "d-deep.json").write_text("[" * 100_000 + "]" * 100_000)
    os.mkfifo(folder / "e-fifo.json")  # must not block the first call
    (folder / "f-zero.json").symlink_to("/dev/zero")  # must not be read into memory
    monkeypatch.setenv("AUTONORM_DB_PATH", str(folder))
    autonorm.reset()
    with pytest.warns(RuntimeWarning) as caught:
        c = choose(3, 64)
    assert (c.rung, c.config.block) == ("exact", 256)  # the good file still answers
    text = "\n".join(str(w.message) for w in caught)
    for name in ("a-truncated", "c-utf16", "d-deep", "e-fifo", "f-zero"):
        assert f"{name}.json" in text
    assert "not a regular file" in text and "not UTF-8" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file, not on every new key
        choose(3, 1024)


def test_forced_disabled_and_unknown_backends(monkeypatch, own_db):
    autonorm.load_db(own_db)
    monkeypatch.setenv("AUTONORM_BACKEND", "torch")
    autonorm.reset()
    assert choose(3, 64).rung == "forced"
    monkeypatch.setenv("AUTONORM_BACKEND", "no-such-backend")
    autonorm.reset()
    with pytest.raises(UnknownBackendError) as err:
        choose(3, 64)
    assert "no-such-backend" in str(err.value) and "triton" in str(err.value) and "torch" in str(err.value)
    monkeypatch.delenv("AUTONORM_BACKEND")
    monkeypatch.setenv("AUTONORM_DISABLE", "1")
    autonorm.reset()
    assert (choose(3, 64).rung, choose(3, 64).backend) == ("disabled", "torch")


def test_explain_forms(own_db):
    autonorm.load_db(own_db)
    x = torch.randn(3, 64)
    module = autonorm.RMSNorm(64, eps=1e-6)
    by_name = autonorm.explain("rms_norm", x, (64,), module.weight, 1e-6)
    assert autonorm.explain(autonorm.rms_norm, x, 64, weight=module.weight) is by_name
    assert autonorm.explain(module, x) is by_name
    assert "rung: exact" in str(by_name) and "block=64" in str(by_name)
    bwd = autonorm.explain(module, x, direction="bwd")
    assert bwd.spec.direction == "bwd" and bwd.rung == "heuristic"  # the database has no backward records
    ln = autonorm.explain("layer_norm", x, (64,), None, torch.zeros(64))
    assert ln.spec.op == "layernorm" and ln.spec.bias
    with pytest.raises(ValueError, match="expected 'rms_norm'"):
        autonorm.explain("group_norm", x, (64,))


def test_log_each_resolution_once(monkeypatch, caplog):
    monkeypatch.setenv("AUTONORM_LOG", "1")
    with caplog.at_level(logging.WARNING, logger="autonorm"):
        for _ in range(3):
            choose(3, 64)
    lines = [r.getMessage() for r in caplog.records if r.name == "autonorm"]
    assert len(lines) == 1 and "rung: heuristic" in lines[0]


def test_database_record_backward_and_residual_keys(tmp_path):
    # A backward record is used by autograd; a residual call has its own key (features differ).
    bwd = record(64, 4, 1024)
    bwd["key"]["direction"] = "bwd"
    autonorm.load_db(write_db(tmp_path / "bwd.json", [bwd]))
    x = torch.randn(3, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    autonorm.rms_norm(x, (64,), w).sum().backward()
    c = autonorm.explain("rms_norm", x, (64,), w, direction="bwd")
    assert (c.rung, c.config.block) == ("exact", 1024)
    r = autonorm.explain("rms_norm", x, (64,), w, residual=torch.randn(3, 64), direction="bwd")
    assert r.spec.residual and r.rung == "heuristic"


def test_tune_on_miss_tunes_once_and_keeps_the_record(tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    monkeypatch.setenv("AUTONORM_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(dispatch.DEFAULT_ORDER, "cpu", ("fake", "torch"))  # a 4-candidate space: exhaustive
    assert choose(3, 64).rung == "heuristic"  # never tunes unless asked
    monkeypatch.setenv("AUTONORM_TUNE_ON_MISS", "1")
    autonorm.reset()
    c = choose(3, 64)
    assert c.rung == "tuned" and db_sources.tuned_path(identity("cpu")["slug"]).exists()
    autonorm.reset()
    again = choose(3, 64)  # a new process would find it the same way: from the saved database
    assert (again.rung, again.backend, again.config) == ("exact", c.backend, c.config)


class FirstLaunchFails(FakeBackend):
    """Compiles fine, like Triton and Numba, and fails only when its kernel is first launched."""

    name = "boom"
    launches = 0

    def build(self, source, spec, config, device):
        def kernel(*args):
            FirstLaunchFails.launches += 1
            raise RuntimeError("out of resources: registers")
        return kernel


def test_first_launch_failure_falls_to_the_next_rung(tmp_path, monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "boom", "tests:FirstLaunchFails")
    monkeypatch.setitem(backends._instances, "boom", FirstLaunchFails())
    monkeypatch.setattr(FirstLaunchFails, "launches", 0)
    # A database record of the failing backend, then the heuristic rung tries it first too.
    autonorm.load_db(write_db(tmp_path / "boom.json", [record(64, 4, 64, backend="boom")]))
    monkeypatch.setitem(dispatch.DEFAULT_ORDER, "cpu", ("boom", "fake", "torch"))
    with pytest.warns(RuntimeWarning) as caught:
        c = choose(3, 64)  # the user's call runs: no exception from the failing kernel
    assert (c.rung, c.backend) == ("heuristic", "fake")
    messages = [str(w.message) for w in caught if "first launch failed" in str(w.message)]
    assert len(messages) == 2, messages  # the record, then the heuristic: one warning each
    assert "record rmsnorm.fwd" in messages[0] and "out of resources: registers" in messages[0]
    assert "boom heuristic" in messages[1]
    assert FirstLaunchFails.launches == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resolved once: later calls neither probe nor warn again
        choose(3, 64)
    assert FirstLaunchFails.launches == 2
    monkeypatch.setitem(dispatch.DEFAULT_ORDER, "cpu", ("boom", "torch"))
    autonorm.reset()
    with pytest.warns(RuntimeWarning, match="first launch failed"):
        assert choose(3, 64).rung == "torch"


class CudaOnlyBackend(FakeBackend):
    """Launches on CUDA tensors only; building it for any other device is the bug under test."""

    name = "cudaonly"

    def supports_device(self, device):
        return torch.device(device).type == "cuda"

    def build(self, source, spec, config, device):
        raise AssertionError(f"a cuda-only kernel was built for {device}")


def test_every_database_rung_checks_the_device(tmp_path, monkeypatch):
    # Exact, nearest-rows and nearest-hidden records all name a backend that cannot run on CPU tensors:
    # none may be compiled for them; the ladder goes on to the heuristic.
    monkeypatch.setitem(backends.BACKENDS, "cudaonly", "tests:CudaOnlyBackend")
    monkeypatch.setitem(backends._instances, "cudaonly", CudaOnlyBackend())
    autonorm.load_db(write_db(tmp_path / "cuda-records.json",
                              [record(64, 4, 64, backend="cudaonly"), record(64, 64, 256, backend="cudaonly"),
                               record(128, 4, 1024, backend="cudaonly")]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # skipped because it cannot run here, not tried and failed
        for rows in (3, 200):  # the exact key, then a nearest-rows one
            c = choose(rows, 64)
            assert (c.rung, c.backend) == ("heuristic", "fake")


def test_meta_tensors_never_get_a_cpu_kernel(tmp_path):
    # A valid record of this CPU's database must not be launched on meta tensors (no data pointer):
    # that crashed the process. Only torch runs meta tensors.
    numba = backends.get_backend("numba-cpu")
    spec = autonorm.spec.NormSpec("rmsnorm", "fwd", "float32", "float32", 64)
    autonorm.load_db(write_db(tmp_path / "cpu.json", [record(64, 4, backend="numba-cpu",
                                                             config=numba.heuristic(spec).to_dict(),
                                                             template_hash=numba.template_hash())]))
    x, w = torch.randn(3, 64), torch.randn(64)
    assert autonorm.explain("rms_norm", x, (64,), w).backend == "numba-cpu"  # the record is valid on CPU
    xm, wm = x.to("meta"), w.to("meta")
    c = autonorm.explain("rms_norm", xm, (64,), wm)
    assert c.backend == "torch"
    assert autonorm.rms_norm(xm, (64,), wm).device.type == "meta"


def test_changed_launch_code_makes_records_stale(tmp_path, monkeypatch):
    # The recorded hash covers the backend's Python module as well as its templates: a record tuned
    # before the launch code changed is skipped, with the stale-hash warning.
    numba = backends.get_backend("numba-cpu")
    module = sys.modules[type(numba).__module__]
    spec = autonorm.spec.NormSpec("rmsnorm", "fwd", "float32", "float32", 64)
    autonorm.load_db(write_db(tmp_path / "cpu.json", [record(64, 4, backend="numba-cpu",
                                                             config=numba.heuristic(spec).to_dict(),
                                                             template_hash=numba.template_hash())]))
    slug = identity("cpu")["slug"]
    assert len(db_sources.table(slug).records) == 1  # tuned for this launcher: usable
    changed = tmp_path / "numba_cpu.py"
    changed.write_text(Path(module.__file__).read_text() + "\n# the launch code changed\n")
    monkeypatch.setattr(module, "__file__", str(changed))
    db_sources.forget()
    with pytest.warns(RuntimeWarning, match="stale template hash for numba-cpu"):
        assert not db_sources.table(slug).records


def test_tune_on_miss_with_an_unusable_cache_dir_falls_back(tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("AUTONORM_CACHE_DIR", str(blocker))
    monkeypatch.setenv("AUTONORM_TUNE_ON_MISS", "1")
    autonorm.reset()
    with pytest.warns(RuntimeWarning, match="not-a-folder"):
        assert choose(3, 64).rung == "heuristic"


def test_a_call_key_reads_by_name_in_make_keys_order():
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    w = torch.ones(24, dtype=torch.float32)
    key = dispatch.CallKey._make(dispatch.make_key("rmsnorm", "bwd", x, w, None, x, 1.0))
    assert (key.op, key.direction, key.x_dtype, key.w_dtype, key.hidden) == (
        "rmsnorm", "bwd", torch.bfloat16, torch.float32, 24)
    assert (key.has_weight, key.has_bias, key.has_residual, key.has_offset) == (True, False, True, True)
    assert (key.device, key.rows_bucket) == (x.device, 8)
    spec = dispatch.spec_from_key(key)
    assert (spec.hidden, spec.x_dtype, spec.w_dtype, spec.residual, spec.offset) == (
        24, "bfloat16", "float32", True, True)
