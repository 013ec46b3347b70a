"""Windowed counts: per user, the number and amount of purchases in each 10-second event-time
window, written exactly once, with records too late for their window in a side output.

    python -m runtime run examples/windowed_counts.py --set output=/tmp/windowed-out \
        --checkpoint-interval 1s --checkpoint-dir /tmp/windowed-chk

    python -m runtime run examples/windowed_counts.py --set bootstrap=127.0.0.1:9092 \
        --set bounded=true --set output=/tmp/windowed-out   # from Kafka (see kafka_etl.py)

Params: ``input`` (JSON lines ``{"user","kind","amount","ts"}``; default the bundled
``data/events.jsonl``), or ``bootstrap`` with ``input_topic`` (default ``events``) and ``bounded``
to read Kafka instead; ``rate`` (records per second per source subtask, 0 = unlimited);
``output`` (a directory; required); ``late_output`` (default ``<output>/late``); ``window``
(default ``10s``), ``out_of_orderness`` (how far behind the newest event a timestamp may be,
default ``2s``), ``lateness`` (how long a window still takes late records, re-emitting its
result, default ``0``).

Each window gives ``{"user", "window_start", "window_end", "purchases", "amount"}`` (times in
ms since the epoch, end exclusive). Records later than the lateness go unchanged to the late
output. Both go through the two-phase-commit file sink: after crashes and ``--restore latest``
every window's result is committed exactly once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from connectors import FileSource, TwoPhaseCommitFileSink
from runtime import (
    AggregateFunction,
    Collector,
    Job,
    OutputTag,
    ProcessWindowFunction,
    TumblingEventTimeWindows,
    WatermarkStrategy,
    WindowContext,
)

BUNDLED_EVENTS = Path(__file__).parent / "data" / "events.jsonl"
LATE = OutputTag("late-purchases")


class PurchasesAndCents(AggregateFunction[dict[str, Any], list[int], tuple[int, int]]):
    """Per window: (purchases, amount in cents); cents keep the sum exact in any order."""

    def create_accumulator(self) -> list[int]:
        return [0, 0]

    def add(self, value: dict[str, Any], accumulator: list[int]) -> list[int]:
        accumulator[0] += 1
        accumulator[1] += round(float(value["amount"]) * 100)
        return accumulator

    def get_result(self, accumulator: list[int]) -> tuple[int, int]:
        return accumulator[0], accumulator[1]

    def merge(self, a: list[int], b: list[int]) -> list[int]:
        return [a[0] + b[0], a[1] + b[1]]


class WindowRecord(ProcessWindowFunction[tuple[int, int], dict[str, Any], str]):
    """The output record of one user's window."""

    def process(
        self,
        key: str,
        context: WindowContext[str],
        elements: Any,
        out: Collector[dict[str, Any]],
    ) -> None:
        for purchases, cents in elements:
            out.collect(
                {
                    "user": key,
                    "window_start": context.window.start,
                    "window_end": context.window.end,
                    "purchases": purchases,
                    "amount": cents / 100,
                }
            )


def events_of(job: Job) -> Any:
    """The event stream with event time: the bundled file (or ``input``), or a Kafka topic with
    ``bootstrap``, whose watermarks are per partition (each partition is in order by itself)."""
    params = job.params
    strategy = WatermarkStrategy.for_bounded_out_of_orderness(
        params.get("out_of_orderness", "2s")
    ).with_timestamp_assigner(lambda event, _record_ts: int(event["ts"]))
    if "bootstrap" in params:
        from connectors.kafka import KafkaSource

        source: Any = KafkaSource(
            params["bootstrap"],
            params.get("input_topic", "events"),
            bounded=params.get_bool("bounded", False),
            rate=params.get_float("rate", 0.0),
            watermark_strategy=strategy,
        )
        return job.from_source(source, name="Source: Kafka events").uid("kafka-events")
    source = FileSource(
        params.get("input", str(BUNDLED_EVENTS)),
        format="json",
        rate=params.get_float("rate", 0.0),
    )
    return job.from_source(source).uid("events").assign_timestamps_and_watermarks(strategy)


def build(job: Job) -> None:
    params = job.params
    output = params.require("output")
    windows = (
        events_of(job)
        .filter(lambda e: e.get("kind") == "purchase", name="purchases")
        .key_by(lambda e: e["user"])
        .window(TumblingEventTimeWindows.of(params.get("window", "10s")))
        .allowed_lateness(params.get("lateness", "0ms"))
        .side_output_late_data(LATE)
        .aggregate(PurchasesAndCents(), WindowRecord(), name="purchases per window")
        .uid("purchases-per-window")
    )
    windows.sink_to(TwoPhaseCommitFileSink(output), name="committed windows").uid("output")
    late_output = params.get("late_output", os.path.join(output, "late"))
    windows.get_side_output(LATE).sink_to(
        TwoPhaseCommitFileSink(late_output), name="committed late purchases"
    ).uid("late-output")
