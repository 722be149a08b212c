"""Tuning: search each spec's kernel space with Optuna and record the winners in a database.

    options.py   StudyOptions: how every study of a run searches and records (frozen; the defaults)
    space.py     the valid configs of every candidate backend, and the one map to and from Optuna params
    study.py     one study: seeds, TPE, patience, verify-then-time every candidate
    race.py      how many repetitions a candidate gets: clear losers few, close contenders more
    compile_pool.py  candidates compiled ahead of the timer, in worker processes that fill the disk caches
    trials.py    a study's trials in Optuna storage: what is measured, failed, queued; closing trials
    finalize.py  the best few re-timed with the torch baselines into the study's record
    quality.py   the measurement gate: noisy re-timings are re-timed, then flagged or refused
    fleet.py     Optuna storage for one machine (a journal file) or a fleet (a database URL)
    journal.py   the journal file's safety: never a tuning database, a cut last line dropped
    presets.py   the default and --quick grids (plain data)
    run.py       native backends, `tune_grid` (what `autonorm tune` runs) and `tune_one`
    plan.py      `--budget`: the plan that divides one time budget across a grid's studies
    rank.py      the static cost model that orders each study's candidates before any timing
    transfer.py  `--budget` across shapes: anchors first, neighbours seeded from their winners

Needs Optuna (`pip install "autonorm[tune]"`); importing this package imports it
only when a study starts.
"""
from ..lazy import lazy_exports

# Names load on first use, so that `autonorm tune --help` (which needs only the presets, the fleet's
# defaults and the quality gate) does not import torch.
_WHERE = {"StudyResult": "finalize", "DEFAULT_FEATURES": "presets", "DEFAULTS": "presets", "QUICK": "presets",
          "native_backends": "run", "protocol": "run", "tune_grid": "run", "tune_one": "run", "Candidate": "space",
          "SearchSpace": "space", "make_storage": "fleet", "IMPROVEMENT": "study", "MAX_TRIALS_FACTOR": "study",
          "STARTUP_TRIALS": "trials", "StudyOptions": "options", "StudyRunner": "study", "study_name": "study"}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(globals(), _WHERE)
