"""Kafka client log storms folded into one line per cause (``runtime.shell.logfold``)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from runtime.shell.logfold import RepeatFolder


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged() -> Iterator[tuple[io.StringIO, _Clock]]:
    """A handler on the root logger with a folder scoped to aiokafka (interval 10 s)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    clock = _Clock()
    handler.addFilter(RepeatFolder(["aiokafka"], interval_s=10.0, clock=clock))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield out, clock
    finally:
        root.removeHandler(handler)


def test_repeats_of_a_cause_are_counted_and_shown_once_per_interval(
    logged: tuple[io.StringIO, _Clock],
) -> None:
    out, clock = logged
    conn = logging.getLogger("aiokafka.conn")
    for _ in range(58):
        conn.error('Unable connect to "%s:%s": %s', "127.0.0.1", 9092, "Connection refused")
        clock.now += 0.1
    clock.now = 12.0
    conn.error('Unable connect to "%s:%s": %s', "127.0.0.1", 9092, "Connection refused")
    assert out.getvalue().splitlines() == [
        'aiokafka.conn ERROR Unable connect to "127.0.0.1:9092": Connection refused',
        'aiokafka.conn ERROR Unable connect to "127.0.0.1:9092": Connection refused '
        "(repeated 58 times in the last 12s)",
    ]


def test_each_cause_gets_its_first_line(logged: tuple[io.StringIO, _Clock]) -> None:
    out, _ = logged
    client = logging.getLogger("aiokafka.client")
    for _ in range(3):
        client.error("Unable connect to %s", "a:1")
        client.error("Unable connect to %s", "b:2")
        client.warning("Unable connect to %s", "a:1")
    assert out.getvalue().splitlines() == [
        "aiokafka.client ERROR Unable connect to a:1",
        "aiokafka.client ERROR Unable connect to b:2",
        "aiokafka.client WARNING Unable connect to a:1",
    ]


def test_other_loggers_are_not_folded(logged: tuple[io.StringIO, _Clock]) -> None:
    out, _ = logged
    for _ in range(3):
        logging.getLogger("runtime.master.jobmaster").warning("job attempt failed")
        logging.getLogger("aiokafkaesque").warning("not the Kafka client")
    assert len(out.getvalue().splitlines()) == 6
