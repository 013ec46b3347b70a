"""Durations as users write them: ``500ms``, ``5s``, ``1min``, ``2h``; always with a unit.

A bare number (``"5"``) is refused: it reads as seconds to one user and milliseconds to the next
(job code passes sizes as int milliseconds), so the error shows the accepted forms instead. Zero
alone is accepted, being zero in every unit. The one parser of the project. It sits in ``state/``, the lowest layer, so that state TTLs read
durations exactly as the CLI and the job API do; ``runtime.api.durations`` re-exports it.
"""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|min|m|h)?\s*$")
ACCEPTED_FORMS = "500ms, 5s, 1.5s, 1min, 2h"
"""What the errors of :func:`parse_duration` show."""


def parse_duration(text: str) -> float:
    """Seconds in ``text``, a number with a unit (``ms``, ``s``, ``min``, ``h``) or ``0``; raises
    ValueError naming the text and showing the accepted forms otherwise."""
    match = _PATTERN.match(text)
    if not match:
        msg = f"invalid duration {text!r}: use a number with a unit, e.g. {ACCEPTED_FORMS}"
        raise ValueError(msg)
    number, unit = float(match.group(1)), match.group(2)
    if unit is None and number != 0:
        digits = match.group(1)
        msg = (
            f"invalid duration {text!r}: a duration needs a unit, e.g. {digits}ms, {digits}s or "
            f"{digits}min (accepted forms: {ACCEPTED_FORMS})"
        )
        raise ValueError(msg)
    return number * _UNITS[unit or "s"]


def duration_ms(value: int | str, what: str) -> int:
    """Milliseconds from what job code passes for a window size, a gap, a lateness or a TTL: an
    int of milliseconds, or a duration string with its unit (``"10s"``, ``"1min"``, ``"250ms"``).
    Raises ValueError naming ``what`` otherwise (also for negative values and unit-less
    strings)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        msg = f"{what}: expected milliseconds (an int) or a duration like '10s', got {value!r}"
        raise ValueError(msg)
    if isinstance(value, str):
        try:
            ms = round(parse_duration(value) * 1000)
        except ValueError as exc:
            msg = f"{what}: {exc}"
            raise ValueError(msg) from None
    else:
        ms = value
    if ms < 0:
        msg = f"{what}: must not be negative, got {value!r}"
        raise ValueError(msg)
    return ms


def format_duration(seconds: float) -> str:
    """``seconds`` as users write durations: ``500ms``, ``1.5s``, ``1min``, ``2h``."""
    for unit, size in (("h", 3600.0), ("min", 60.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:g}{unit}"
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
