"""Every error autonorm raises on purpose, so callers can catch them by kind."""


class AutonormError(Exception):
    """Base of autonorm's own errors."""


class InvalidConfigError(AutonormError, ValueError):
    """A launch config outside its declared domain or invalid for a spec."""


class BackendUnavailableError(AutonormError, RuntimeError):
    """A backend was asked for but cannot run here (not installed, no device)."""


class UnknownBackendError(AutonormError, KeyError):
    """A backend name that the registry does not know."""

    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DatabaseError(AutonormError, ValueError):
    """A tuning database that is corrupt, truncated, of an unknown schema or unsafe."""


class KernelError(AutonormError, RuntimeError):
    """A kernel failed to render, compile or launch."""


class TuneOptionError(AutonormError, ValueError):
    """A tuner option with a value it cannot mean (no trials, a negative time budget, zero finalists)."""
