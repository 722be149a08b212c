"""Under --budget on a GPU, the winners transferred to a tier's neighbours are audited together when the tier
starts (`run.audit_tier`): one audit across the tier's studies the plan runs, each winner mapped as its study
maps it, and no study audits them again. The grid run calls it at the start of each tier, its sources' winners
known by then.
"""
from types import SimpleNamespace

import pytest
from test_transfer import BlockBackend, BlockConfig, BlockTimer, register_fake, spec, tune

from autonorm.backends.torch_eager import TorchBackend
from autonorm.spec import rows_bucket
from autonorm.tune import SearchSpace, run, transfer
from autonorm.tune.space import Candidate

pytest.importorskip("optuna")
BACKENDS = {"fake": BlockBackend(), "torch": TorchBackend()}
ROWS = 64


def test_a_tiers_transferred_winners_are_audited_in_one_call_and_not_again(monkeypatch):
    # anchors 256, 1024 and 4096 (each 4x the one before); 512, 768 and 2048 their neighbours (tier 1)
    shapes = [(spec(h), ROWS) for h in (256, 512, 768, 1024, 2048, 4096)]
    jobs = [(s, r, f"study-{s.hidden}", SearchSpace(s, BACKENDS, device="cuda"), []) for s, r in shapes]
    jobs, roles = transfer.arrange(jobs)
    winners = {(transfer.problem(s), s.hidden, rows_bucket(ROWS)): Candidate("fake", BlockConfig(512, 4, 2))
               for s, _ in shapes if s.hidden in (256, 1024, 4096)}
    plans = [SimpleNamespace(status="left out" if job[0].hidden == 2048 else "run") for job in jobs]
    calls = []

    def unfit_specs(requests, device):
        calls.append({s.hidden: sorted(c.block for _, c in cands) for s, cands in requests.items()})
        return {s: {} for s in requests}

    def unfit(*args):
        raise AssertionError("a study audited a transferred winner again")
    monkeypatch.setattr("autonorm.audit.unfit_specs", unfit_specs)
    monkeypatch.setattr("autonorm.audit.unfit", unfit)
    first = next(i for i, role in enumerate(roles) if role.tier == 1)
    run.audit_tier(jobs, roles, plans, first, winners)
    # block 512 is invalid below hidden 1024 (at most hidden / 2): mapped to 256 at 512, to 256 at 768
    # (768 // 2 = 384); 2048 is left out by the plan, so nothing of it is audited
    assert calls == [{512: [256], 768: [256]}]
    for spec_, _, _, space, _ in jobs:
        if spec_.hidden in (512, 768):
            assert space.unfit([Candidate("fake", BlockConfig(256, 4, 2))]) == {}
    run.audit_tier(jobs, roles, plans, 0, winners)  # tier 0: anchors have nothing transferred to audit
    assert len(calls) == 1



def test_the_grid_audits_each_tier_when_it_starts_with_its_sources_winners_known(tmp_path, monkeypatch):
    register_fake(monkeypatch)
    seen = []

    def audit_tier(jobs, roles, plans, first, winners):
        seen.append((roles[first].tier, jobs[first][0].hidden, sorted(h for _, h, _ in winners)))
    monkeypatch.setattr(run, "audit_tier", audit_tier)
    tune(tmp_path, [256, 512, 1024], BlockTimer(), [])
    assert seen == [(0, 256, []), (1, 512, [256, 1024])]
