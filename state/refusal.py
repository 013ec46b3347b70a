"""Refused restores: state or output that does not fit the job, where a retry cannot help.

It lives at the bottom layer because state (incompatible keyed state), operators and connectors
(output that a restore would duplicate) all raise it, and the job master and CLI recognise it.
"""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class RestoreRefusedError(RuntimeError):
    """An operator refuses the restore (or the fresh start) of its attempt: its restored state or
    its output does not fit, and retrying cannot change that. The job fails at once, without a
    restart; the CLI prints the message as one line and exits 2. The message names the operator,
    the checkpoint, the path or output concerned, and what the user can do."""


def restore_refusal(failure: BaseException) -> RestoreRefusedError | None:
    """The :class:`RestoreRefusedError` that caused ``failure`` (itself or along its causes)."""
    return find_cause(failure, RestoreRefusedError)


def find_cause(failure: BaseException, kind: type[E]) -> E | None:
    """The exception of class ``kind`` that caused ``failure``: itself, or the first along its
    ``__cause__`` chain."""
    seen: set[int] = set()
    current: BaseException | None = failure
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None
