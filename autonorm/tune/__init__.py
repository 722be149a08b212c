"""Tuning: search each spec's kernel space with Optuna and record the winners in a database.

    space.py     the valid configs of every candidate backend, as Optuna parameters
    study.py     one study: seeds, TPE, patience, verify-then-time every candidate
    finalize.py  the best few re-timed with the torch baselines into the study's record
    quality.py   the measurement gate: noisy re-timings are re-timed, then flagged or refused
    storage.py   Optuna storage for one machine (a journal file) or a fleet (a database URL)
    journal.py   the journal file's safety: never a tuning database, a cut last line dropped
    run.py       presets, native backends, `tune_grid` (what `autonorm tune` runs) and `tune_one`
    plan.py      `--budget`: the plan that divides one time budget across a grid's studies
    rank.py      the static cost model that orders each study's candidates before any timing

Needs Optuna (`pip install "autonorm[tune]"`); importing this package imports it
only when a study starts.
"""
from .finalize import StudyResult
from .run import DEFAULT_FEATURES, DEFAULTS, QUICK, native_backends, tune_grid, tune_one
from .space import Candidate, SearchSpace
from .storage import make_storage
from .study import IMPROVEMENT, MAX_TRIALS_FACTOR, STARTUP_TRIALS, StudyRunner, study_name

__all__ = ["Candidate", "DEFAULTS", "DEFAULT_FEATURES", "IMPROVEMENT", "MAX_TRIALS_FACTOR", "QUICK", "STARTUP_TRIALS",
           "SearchSpace", "StudyResult", "StudyRunner", "make_storage", "native_backends", "study_name", "tune_grid",
           "tune_one"]
