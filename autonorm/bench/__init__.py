"""Benchmarking: autonorm's dispatched kernels against torch eager, torch.compile, Liger and quack.

    providers.py  what is compared, as data (a provider builds a callable per case)
    run.py        cases timed with the tuner's protocol (`autonorm.measure`), one JSON row each
    report.py     markdown tables and PNG plots from those rows

The `autonorm bench` command is `autonorm/cli/bench.py`.
"""
from .providers import PROVIDERS, Provider, ProviderUnavailable, build_case, check_providers, make_sets
from .report import provider_of, write_report
from .run import SCHEMA_VERSION, case_name, parse_shape, run_cases, timer_for

__all__ = ["PROVIDERS", "Provider", "ProviderUnavailable", "SCHEMA_VERSION", "build_case", "case_name",
           "check_providers", "make_sets", "parse_shape", "provider_of", "run_cases", "timer_for", "write_report"]
