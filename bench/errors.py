"""The bench's exceptions: one root; the CLI turns each into a one-line message and exit code 2."""

from __future__ import annotations


class BenchError(Exception):
    """Root of every error the bench raises on purpose."""


class ProfileError(BenchError):
    """A profile file that is missing, unreadable or does not validate."""


class UsageError(BenchError):
    """Command-line arguments that conflict or cannot be used."""


class ResultError(BenchError):
    """A result file that is missing, corrupt, or of another schema version."""


class AccountingError(BenchError):
    """A run whose outcomes do not add up to the devices it started."""
