"""Durations as users write them: ``500ms``, ``5s``, ``1min``, ``2h``; always with a unit.

The parser lives in :mod:`state.durations` (the lowest layer, so that state TTLs share it); this
module is where the job API and the CLI import it from.
"""

from __future__ import annotations

from state import durations
from state.durations import format_duration, parse_duration

__all__ = ["duration_ms", "format_duration", "parse_duration"]


def duration_ms(value: int | str, what: str) -> int:
    """:func:`state.durations.duration_ms` for the job API (window sizes, lateness, watermark
    bounds): a bad duration, often from a ``--set`` parameter, is a
    :class:`~runtime.api.streams.JobDefinitionError` (the CLI's one line, exit 2)."""
    # Imported here: the stream API imports the modules that import this one.
    from runtime.api.streams import JobDefinitionError

    try:
        return durations.duration_ms(value, what)
    except ValueError as exc:
        raise JobDefinitionError(str(exc)) from None
