"""Enrichment through broadcast state: each event gets its user's segment and country from
reference data that every subtask holds whole (the broadcast state pattern), written exactly once.

    python -m runtime run examples/enrichment_broadcast.py --set output=/tmp/enriched   # no Kafka
    python -m runtime broker                                   # or: terminal 1, a local broker
    python examples/load_events.py --bootstrap 127.0.0.1:9092  # sample events into topic "events"
    python -m runtime run examples/enrichment_broadcast.py --set bootstrap=127.0.0.1:9092 \
        --set bounded=true --set output=/tmp/enriched --checkpoint-dir /tmp/enriched-chk

Params: ``bootstrap`` (events from the Kafka topic ``input_topic``, default ``events``, with
``bounded`` and ``rate`` as in ``kafka_etl.py``; without it, events from the JSON lines file
``input``, default the bundled ``data/events.jsonl``), ``reference`` (JSON lines
``{"user","segment","country"}``, default the bundled ``data/user_segments.jsonl``),
``reference_topic`` (with ``bootstrap``: more reference rows from a topic, e.g. a compacted one
keyed by user; a later row of a user replaces the earlier one for the events after it),
``output`` (a directory; required).

Output lines: the event with ``segment`` and ``country`` added. The two inputs have no order
between them: an event whose user has no reference row yet waits in keyed state and is emitted
when the row arrives (an event of a user that never gets one keeps waiting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connectors import FileSource, TwoPhaseCommitFileSink
from connectors.kafka import KafkaSource
from runtime import (
    Collector,
    Job,
    JobDefinitionError,
    KeyedBroadcastContext,
    KeyedBroadcastProcessFunction,
    KeyedBroadcastReadOnlyContext,
    RuntimeContext,
)
from state import ListStateDescriptor, MapStateDescriptor

DATA = Path(__file__).parent / "data"
BUNDLED_EVENTS = DATA / "events.jsonl"
BUNDLED_REFERENCE = DATA / "user_segments.jsonl"

PROFILES = MapStateDescriptor[str, dict[str, Any]]("profiles")
"""Broadcast state: user → {"segment", "country"}."""
WAITING = ListStateDescriptor[dict[str, Any]]("waiting")
"""Keyed state: the user's events that came before the user's reference row."""

Event = dict[str, Any]


class EnrichWithProfile(KeyedBroadcastProcessFunction[str, Event, Event, Event]):
    """Input 1: events keyed by user; input 2 (broadcast): reference rows."""

    def open(self, ctx: RuntimeContext) -> None:
        self.waiting = ctx.get_state(WAITING)

    def process_element(
        self, value: Event, ctx: KeyedBroadcastReadOnlyContext[str], out: Collector[Event]
    ) -> None:
        profile = ctx.get_broadcast_state(PROFILES).get(value["user"])
        if profile is None:
            self.waiting.add(value)
        else:
            out.collect({**value, **profile})

    def process_broadcast_element(
        self, value: Event, ctx: KeyedBroadcastContext, out: Collector[Event]
    ) -> None:
        user = value["user"]
        profile = {"segment": value["segment"], "country": value["country"]}
        ctx.get_broadcast_state(PROFILES).put(user, profile)

        def release(key: str, waiting: Any) -> None:
            if key == user:
                for event in waiting.get():
                    out.collect({**event, **profile})
                waiting.clear()

        # Only the subtask that holds the user's key has waiting events for it.
        ctx.apply_to_keyed_state(WAITING, release)


def build(job: Job) -> None:
    params = job.params
    bootstrap = params.get("bootstrap")
    if bootstrap is not None:
        events_source: Any = KafkaSource(
            bootstrap,
            params.get("input_topic", "events"),
            bounded=params.get_bool("bounded", False),
            rate=params.get_float("rate", 0.0),
        )
        events = job.from_source(events_source, name="Source: Kafka events").uid("kafka-events")
    else:
        file = FileSource(params.get("input", str(BUNDLED_EVENTS)), format="json")
        events = job.from_source(file, name="Source: events").uid("events")
    reference = job.from_source(
        FileSource(params.get("reference", str(BUNDLED_REFERENCE)), format="json"),
        name="Source: reference file",
    ).uid("reference-file")
    if "reference_topic" in params:
        if bootstrap is None:
            msg = "reference_topic=... needs bootstrap=HOST:PORT"
            raise JobDefinitionError(msg)
        topic = KafkaSource(
            bootstrap, params["reference_topic"], bounded=params.get_bool("bounded", False)
        )
        reference = reference.union(
            job.from_source(topic, name="Source: reference topic").uid("reference-topic")
        )
    enriched = (
        events.key_by(lambda e: e["user"])
        .connect(reference.broadcast(PROFILES))
        .process(EnrichWithProfile(), name="enrich")
        .uid("enrich")
    )
    enriched.sink_to(TwoPhaseCommitFileSink(params.require("output")), name="committed files").uid(
        "output"
    )
