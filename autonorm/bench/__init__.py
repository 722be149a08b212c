"""Benchmarking: autonorm's dispatched kernels against torch eager, torch.compile, Liger and quack.

    options.py    the command line's choices (provider names, default shapes), torch-free
    providers.py  what is compared, as data (a provider builds a callable per case)
    run.py        cases timed with the tuner's protocol (`autonorm.measure`), one JSON row each
    rows.py       those rows read back from their JSON files, checked and merged per device
    report.py     markdown tables and PNG plots from those rows

The `autonorm bench` command is `autonorm/cli/bench.py`.
"""
from ..lazy import lazy_exports

# Names load on first use, so that `autonorm bench --help` (which needs only .options) does not import torch.
_WHERE = {"PROVIDERS": "providers", "Provider": "providers", "ProviderUnavailable": "providers",
          "build_case": "providers", "check_providers": "providers", "make_sets": "providers",
          "provider_of": "rows", "write_report": "report", "SCHEMA_VERSION": "run", "case_name": "run",
          "parse_shape": "options", "run_cases": "run", "timer_for": "run"}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(globals(), _WHERE)
