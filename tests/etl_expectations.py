"""The expected output of the purchases-per-user ETL (examples/file_etl.py, examples/kafka_etl.py)
over the bundled events, and the check that committed output matches it exactly once."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from connectors.files import committed_files

EVENTS = Path(__file__).resolve().parents[1] / "examples" / "data" / "events.jsonl"


def purchases() -> Iterator[dict[str, Any]]:
    """The purchase events of the bundled events file, in file order."""
    for line in EVENTS.read_bytes().splitlines():
        if line.strip():
            event = orjson.loads(line)
            if event.get("kind") == "purchase":
                yield event


def expected_output() -> dict[str, list[tuple[int, float]]]:
    """Per user, [(n, total)] for n = 1..k, as the ETL examples compute them."""
    totals: dict[str, float] = collections.defaultdict(float)
    result: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for event in purchases():
        user = event["user"]
        totals[user] = round(totals[user] + float(event["amount"]), 2)
        result[user].append((len(result[user]) + 1, totals[user]))
    return dict(result)


def committed_records(out: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for path in committed_files(out)
        for line in path.read_bytes().splitlines()
        if line.strip()
    ]


def assert_exact_output(out: Path) -> None:
    records = committed_records(out)
    expected = expected_output()
    by_user: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for record in records:
        assert set(record) == {"user", "total", "n"}, record
        by_user[record["user"]].append((record["n"], record["total"]))
    assert set(by_user) == set(expected), "users missing from (or unknown to) the output"
    for user, rows in by_user.items():
        numbers = sorted(n for n, _ in rows)
        assert numbers == list(range(1, len(expected[user]) + 1)), (
            f"user {user}: purchase numbers {numbers[:20]}... (expected 1..{len(expected[user])},"
            " each once)"
        )
        assert sorted(rows) == expected[user], f"user {user}: wrong running totals"
    assert len(records) == sum(len(v) for v in expected.values())


WINDOW_MS = 10_000
"""The window of ``examples/windowed_counts.py`` (its default)."""


def expected_windowed_counts() -> dict[tuple[str, int], tuple[int, int]]:
    """Per (user, window start): (purchases, amount in cents) over the bundled events in the
    10-second tumbling windows of ``examples/windowed_counts.py``."""
    result: dict[tuple[str, int], tuple[int, int]] = {}
    for event in purchases():
        start = event["ts"] - event["ts"] % WINDOW_MS
        count, cents = result.get((event["user"], start), (0, 0))
        result[(event["user"], start)] = (count + 1, cents + round(float(event["amount"]) * 100))
    return result


def assert_exact_windowed_counts(out: Path) -> None:
    """The committed output of ``examples/windowed_counts.py`` holds every window's result once."""
    records = committed_records(out)
    expected = expected_windowed_counts()
    windows = [(r["user"], r["window_start"]) for r in records]
    duplicates = sorted({w for w in windows if windows.count(w) > 1})
    assert not duplicates, f"windows committed more than once: {duplicates[:10]}"
    got = {
        (r["user"], r["window_start"]): (r["purchases"], round(r["amount"] * 100))
        for r in records
        if r["window_end"] == r["window_start"] + WINDOW_MS
    }
    assert got == expected
    assert len(records) == len(expected)
