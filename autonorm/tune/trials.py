"""A study's trials in Optuna storage: opening the study, reading what it holds, closing trials.

The search loop (`study.py`) knows a candidate by its `Candidate.key` only. Optuna
params appear at the boundary alone: a trial is enqueued with `SearchSpace.params`
and a trial that has not said its candidate yet (WAITING) is read back with
`SearchSpace.candidate`. Each evaluated trial carries its key in the user attribute
`candidate` and its outcome in `timing` (COMPLETE), `failed` (FAIL) or `duplicate`
(PRUNED: a candidate evaluated before, which costs no timing).
"""
from __future__ import annotations

import logging
import os
import socket
import warnings
from dataclasses import dataclass, field

from . import fleet

log = logging.getLogger("autonorm.tune")

# TPE samples at random until the study holds this many trials (seeds included); patience starts counting
# after the seeds plus this many candidates, so the random phase never ends a study.
STARTUP_TRIALS = 5


@dataclass
class StudyState:
    """What a study's storage holds now, by candidate key."""

    measured: dict = field(default_factory=dict)  # key -> timing (Timing.to_json())
    failed: dict = field(default_factory=dict)  # key -> why it failed
    waiting: set = field(default_factory=set)  # keys of enqueued trials: whoever pops one measures it
    running: set = field(default_factory=set)  # keys of trials being measured (by any worker)

    @property
    def evaluated(self) -> set:
        return set(self.measured) | set(self.failed)

    @property
    def taken(self) -> set:
        """Keys a new trial must not measure: evaluated, or being measured."""
        return self.evaluated | self.running

    @property
    def done(self) -> int:
        """Distinct candidates evaluated (a duplicate costs nothing)."""
        return len(self.measured) + len(self.failed)


def make_sampler(seed: int):
    """The tuner's sampler: independent TPE with STARTUP_TRIALS random trials.

    On the three measured numba-cpu tables it needs fewer trials to come within 2% than multivariate,
    grouped TPE with 10 startup trials, and its 40-trial winners are as good or better
    (docs/benchmarks/search-efficiency.md). constant_liar keeps workers apart."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constant_liar
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=STARTUP_TRIALS)


def open_study(storage, name: str, sampler):
    """Create or load the study `name`, without Optuna's "A new study created" INFO in the user's log."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=sampler,
                                   load_if_exists=True)
    finally:
        optuna.logging.set_verbosity(verbosity)


def read_state(study, space) -> StudyState:
    """Measured, failed, waiting and running candidates as the storage has them now."""
    from optuna.trial import TrialState

    state = StudyState()
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("candidate")
        if t.state == TrialState.COMPLETE and t.user_attrs.get("timing"):
            state.measured.setdefault(key, t.user_attrs["timing"])
        elif t.state == TrialState.FAIL and "failed" in t.user_attrs:
            state.failed[key] = t.user_attrs["failed"]
        elif t.state == TrialState.WAITING:
            # Whoever pops it measures the candidate its params select: enqueued ones keep them in
            # system_attrs until popped, re-queued ones (after their worker died) in params.
            cand = space.candidate(t.system_attrs.get("fixed_params") or t.params)
            if cand is not None:
                state.waiting.add(cand.key)
        elif t.state == TrialState.RUNNING and key is not None:
            state.running.add(key)
    return state


def finished(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))


def has_waiting(study) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def fail_orphans(study) -> list[dict]:
    """Fail the RUNNING trials of this host's dead workers (by PID) and return their params, to re-queue.
    Other hosts' dead workers are failed by heartbeat (`fleet.fail_stale_trials`)."""
    from optuna.trial import TrialState

    host, orphans = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        whost, _, pid = t.user_attrs.get("worker", "").rpartition(":")
        if whost == host and pid.isdigit() and not _pid_alive(int(pid)):
            fleet.force_state(study, t, TrialState.FAIL)
            orphans.append(t.params)
    return orphans


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_waiting(study) -> None:
    """Close the WAITING trials of a study whose trial budget is spent (PRUNED, marked `unused`): a seed
    never reached, or a dead worker's trial that a heartbeat re-queued after the last candidate was
    claimed. No worker pops them any more, and left WAITING they would stay so for good."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        fleet.force_state(study, t, TrialState.PRUNED, unused="the trial budget was spent first")


def others_running(study, storage) -> bool:
    """Whether other workers hold RUNNING trials that can still end (with heartbeats: not yet stale)."""
    from optuna.trial import TrialState

    if not fleet.heartbeat_enabled(storage):
        return False  # no way to tell a dead worker on another host from a slow one
    fleet.fail_stale_trials(study)
    return any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))


def close(study, trial, beats, attrs: dict, **tell) -> bool:
    """Set the trial's result attributes and tell Optuna; False when other workers had already failed the
    trial by heartbeat while this one still held it (its beats stopped: a storage outage longer than the
    grace period, a starved process). Its candidate was re-queued then, so this result is dropped, not
    an error that ends the worker."""
    import optuna

    try:
        for attr, value in attrs.items():  # each raises once the trial was failed: all are the result
            trial.set_user_attr(attr, value)
        study.tell(trial, skip_if_finished=True, **tell)  # failed in between: Optuna logs it
        return True
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning("trial %d was failed by heartbeat while this worker still held it; its candidate "
                    "was re-queued and this result is dropped", trial.number)
        return False
    finally:
        beats.discard(fleet.trial_id(trial))


def close_duplicate(study, trial, beats) -> None:
    """A trial that drew an evaluated candidate: PRUNED (no timing), so FAIL means a broken candidate."""
    from optuna.trial import TrialState

    close(study, trial, beats, {"duplicate": True}, state=TrialState.PRUNED)
