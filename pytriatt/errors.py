"""Errors a user can fix: every layer raises them, the command line prints them as one line (exit 2)."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or a setting that cannot mean what was asked; the message says what to do."""


class CalibrationError(ValueError):
    """A GGUF file's TriAttention metadata is missing, malformed or inconsistent."""


class FingerprintMismatchError(CalibrationError):
    """Statistics belong to another model than the one they are used with."""


class EvalError(UserError):
    """A configuration `pytriatt eval` cannot run (a task, policy, budget or text it cannot use)."""
