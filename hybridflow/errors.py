"""The errors HybridFlow raises on purpose, under one base class.

The command line tells two kinds apart: a :class:`UserError` is bad input (a malformed or
impossible cluster, model, job, plan, profile or flag; a plan that does not fit in memory)
and gets one line and exit code 2; a :class:`RunStopped` is a run that could not go on (a
worker process died) and gets one line and exit code 1. Anything else is a bug: it keeps
its traceback (exit code 1).
"""

from __future__ import annotations


class HybridflowError(Exception):
    """Every error HybridFlow raises on purpose."""


class UserError(HybridflowError, ValueError):
    """Bad input: the message names what is wrong (and, where it can, what would work)."""


class RunStopped(HybridflowError, RuntimeError):
    """A run that stopped part-way (a worker died); its last whole checkpoint is kept."""


def unreadable(what: str, path: object, error: OSError) -> UserError:
    """A UserError for a file of the user's that cannot be read or written."""
    reason = error.strerror or type(error).__name__
    return UserError(f"{what} {str(path)!r}: {reason}")
