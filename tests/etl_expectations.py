"""The expected output of the purchases-per-user ETL (examples/file_etl.py, examples/kafka_etl.py)
over the bundled events, and the check that committed output matches it exactly once."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import orjson

from connectors.files import committed_files

EVENTS = Path(__file__).resolve().parents[1] / "examples" / "data" / "events.jsonl"


def expected_output() -> dict[str, list[tuple[int, float]]]:
    """Per user, [(n, total)] for n = 1..k, as the ETL examples compute them."""
    totals: dict[str, float] = collections.defaultdict(float)
    result: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for line in EVENTS.read_bytes().splitlines():
        if not line.strip():
            continue
        event = orjson.loads(line)
        if event.get("kind") != "purchase":
            continue
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
