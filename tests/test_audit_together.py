"""Under --budget on a GPU, every study's seeds are audited together before the plan: one audit for all the specs
(each backend's compiler starts once per batch, not once per study), its verdicts kept in each spec's space so that
no study asks again. A fake sm_90 device and audit (test_space_audit's) count what is compiled, and when."""
import torch
from test_budget import fake_is_a_backend  # noqa: F401 (autouse: the fake backend is known by name)
from test_space_audit import REJECTED, fake_gpu_audit  # noqa: F401 (fixture)

from autonorm.backends import get_backend
from autonorm.spec import NormSpec
from autonorm.tune import SearchSpace
from autonorm.tune.space import audit_together


def test_the_seeds_of_several_specs_are_audited_in_one_call_and_no_study_asks_again(
        fake_gpu_audit, monkeypatch):  # noqa: F811 (the fixture)
    from autonorm import audit

    calls = []
    real = audit.run.audit  # the fixture's fake
    monkeypatch.setattr(audit.run, "audit", lambda jobs, **kw: calls.append(len(jobs)) or real(jobs, **kw))
    triton = get_backend("triton")
    spaces = [SearchSpace(NormSpec("rmsnorm", "fwd", "float32", "float32", n), {"triton": triton},
                          torch.device("cuda", 0)) for n in (1024, 4096)]
    asked = [(space, space.candidates()[:3]) for space in spaces]
    audit_together(asked + [(spaces[0], spaces[0].candidates()[:2])])  # a spec asked twice: audited once
    assert calls == [6] and len(fake_gpu_audit) == 6
    for space, cands in asked:  # the studies find the verdicts kept
        assert space.unfit(cands) == {c.key: REJECTED for c in cands if c.config.num_warps == 8}
    assert calls == [6]


def test_spaces_off_the_gpu_are_not_audited(fake_gpu_audit):  # noqa: F811 (the fixture)
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 1024)
    space = SearchSpace(spec, {"triton": get_backend("triton")}, torch.device("cpu"))
    audit_together([(space, space.candidates()[:3])])
    assert fake_gpu_audit == []


def test_a_budgeted_grid_audits_every_studys_seeds_before_the_plan(tmp_path, monkeypatch):
    import test_budget

    from autonorm.tune import run

    asked, shown = [], []
    timer = test_budget.ScriptedClockTimer()
    monkeypatch.setattr(run, "audit_together", lambda requests: asked.append(
        ([space.spec for space, _ in requests], sum(len(c) for _, c in requests), len(timer.timed), len(shown))))
    test_budget.tune(tmp_path, 60.0, timer, shown)
    # once, with both specs' seeds, before anything was timed or the plan shown
    assert len(asked) == 1 and asked[0][0] == test_budget.SPECS and asked[0][1] > 0 and asked[0][2:] == (0, 0)
