"""A GPU search space is audited candidate by candidate, just before a candidate is compiled: building the space
compiles nothing, and a candidate the audit rejects (spills, cannot launch) is a failed trial with the audit's
reason, never compiled by the tuner or timed."""
import types

import optuna
import pytest
import torch
from fakes import audited
from test_budget import ROWS, SPECS, RowsBackend, ScriptedClockTimer, fake_is_a_backend  # noqa: F401 (fixture)

from autonorm import audit
from autonorm.backends import get_backend
from autonorm.backends.torch_eager import TorchBackend
from autonorm.spec import NormSpec
from autonorm.tune import SearchSpace, StudyOptions, make_storage
from autonorm.tune.study import StudyRunner

REJECTED = "audit: spills 8 bytes on sm_90"


@pytest.fixture
def fake_gpu_audit(monkeypatch):
    """An sm_90 device and an audit that says every 8-warp Triton config spills; the jobs it compiled."""
    props = types.SimpleNamespace(major=9, minor=0, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(audit.run, "check_backends", lambda names: None)
    compiled = []

    def fake_audit(jobs, progress=None, workers=2):
        compiled.extend(jobs)
        return [audited(j, spill_stores=8 * (j.config.num_warps == 8), threads=32 * j.config.num_warps) for j in jobs]

    monkeypatch.setattr(audit.run, "audit", fake_audit)
    return compiled


def test_a_gpu_space_keeps_every_config_and_audits_only_the_candidates_asked_once_each(fake_gpu_audit):
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 4096)
    triton = get_backend("triton")
    space = SearchSpace(spec, {"triton": triton}, torch.device("cuda", 0))
    assert space.configs["triton"] == list(triton.space(spec)) and fake_gpu_audit == []  # nothing compiled
    cands = space.candidates()
    spills = [c for c in cands if c.config.num_warps == 8][:2]
    asked = spills + [c for c in cands if c.config.num_warps != 8][:3]
    assert space.unfit(asked) == {c.key: REJECTED for c in spills}
    assert sorted(j.config.short() for j in fake_gpu_audit) == sorted(c.config.short() for c in asked)
    assert space.unfit(asked[:1] + asked) == {c.key: REJECTED for c in spills}  # a verdict is kept
    assert len(fake_gpu_audit) == len(asked)


class ScriptedAuditSpace(SearchSpace):
    """The audit's verdict scripted: every config of 64 rows per block spills."""

    def unfit(self, cands):
        return {c.key: REJECTED for c in cands if c.backend == "fake" and c.config.rows == 64}


def test_a_candidate_the_audit_rejects_fails_with_its_reason_and_is_never_compiled_or_timed(tmp_path):
    built = []

    class CountingBackend(RowsBackend):
        def build(self, source, spec, config, device):
            built.append(config)
            return super().build(source, spec, config, device)

    spec, backends = SPECS[0], {"fake": CountingBackend(), "torch": TorchBackend()}
    space = ScriptedAuditSpace(spec, backends)
    timer, storage = ScriptedClockTimer(), make_storage(None, tmp_path / "j.journal")
    options = StudyOptions(trials=40, time_budget=600, compile_workers=2, compile_baseline=False)
    result = StudyRunner(spec, ROWS, backends, timer, options, storage=storage, name="s", space=space,
                         clock=timer.clock).run()
    rejected = {c.key for c in space.candidates() if c.backend == "fake" and c.config.rows == 64}
    failed = {t.user_attrs["candidate"]: t.user_attrs["failed"]
              for t in optuna.load_study(study_name="s", storage=storage).trials if "failed" in t.user_attrs}
    assert result.completeness == "exhaustive" and len(rejected) == 2
    assert {k: failed[k] for k in rejected} == {k: REJECTED for k in rejected}
    assert all(c.rows != 64 for c in built)  # never compiled
    assert [c for _, c in timer.timed if c != "torch" and c.rows == 64] == []  # never timed
    assert result.record.winner.config.rows != 64
