"""Durations as users write them: ``500ms``, ``5s``, ``1min``, ``2h``; always with a unit.

The parser lives in :mod:`state.durations` (the lowest layer, so that state TTLs share it); this
module is where the job API and the CLI import it from.
"""

from __future__ import annotations

from state.durations import duration_ms, format_duration, parse_duration

__all__ = ["duration_ms", "format_duration", "parse_duration"]
