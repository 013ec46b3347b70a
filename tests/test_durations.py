"""Durations as job code and the CLI write them: one parser for window sizes, gaps, lateness,
TTLs and CLI intervals."""

from __future__ import annotations

import pytest

from runtime.api.durations import duration_ms, format_duration, parse_duration


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (250, 250),
        (0, 0),
        ("250ms", 250),
        ("10s", 10_000),
        ("1.5s", 1500),
        ("1min", 60_000),
        ("2h", 7_200_000),
        ("0", 0),
    ],
)
def test_duration_ms_takes_milliseconds_or_a_duration_string(value: int | str, ms: int) -> None:
    assert duration_ms(value, "window size") == ms


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10 parsecs", r"window size: invalid duration '10 parsecs': use a number with a unit"),
        (
            "3",
            r"window size: invalid duration '3': a duration needs a unit, e\.g\. 3ms, 3s or 3min",
        ),
        (-5, r"window size: must not be negative, got -5"),
        (1.5, r"window size: expected milliseconds \(an int\) or a duration like '10s', got 1\.5"),
        (True, r"window size: expected milliseconds"),
    ],
)
def test_a_bad_duration_names_what_it_was_for(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        duration_ms(value, "window size")  # type: ignore[arg-type]


def test_format_duration_reads_back() -> None:
    for text in ("500ms", "1.5s", "1min", "2h"):
        assert format_duration(parse_duration(text)) == text
