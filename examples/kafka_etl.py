"""Kafka ETL: the purchases-per-user logic of ``file_etl.py``, reading JSON events from a topic.

    python -m runtime broker                                   # terminal 1: a local broker
    python examples/load_events.py --bootstrap 127.0.0.1:9092  # sample events into topic "events"
    python -m runtime run examples/kafka_etl.py --set bootstrap=127.0.0.1:9092 \
        --set output=/tmp/kafka-etl-out --checkpoint-interval 1s --checkpoint-dir /tmp/kafka-chk

Params: ``bootstrap`` (required), ``input_topic`` (default ``events``), ``group`` (consumer group
for lag tools; offsets live in checkpoints), ``bounded`` (true: stop at the end offsets seen at
start), ``rate`` (records per second per source subtask, 0 = unlimited), ``on_error`` (an
undeserialisable record: ``fail``, default, or ``skip``), ``tombstones`` (records with a key and no
value, e.g. a user's deletion on a compacted topic: ``skip``, default and counted, or ``fail``; they
carry no event, so this ETL never emits them). Output: ``output_topic``
with ``guarantee`` (none, at-least-once, exactly-once; exactly-once needs ``transactional_id``,
a prefix unique to this job), or the two-phase-commit file sink into the ``output`` directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from file_etl import purchases_per_user

from connectors import TwoPhaseCommitFileSink
from connectors.kafka import KafkaSink, KafkaSource
from runtime import Job, JobDefinitionError


def build(job: Job) -> None:
    params = job.params
    bootstrap = params.require("bootstrap")
    source = KafkaSource(
        bootstrap,
        params.get("input_topic", "events"),
        group_id=params.get("group"),
        bounded=params.get_bool("bounded", False),
        rate=params.get_float("rate", 0.0),
        on_error=params.get("on_error", "fail"),
        tombstones=params.get("tombstones", "skip"),
    )
    events = job.from_source(source, name="Source: Kafka events").uid("kafka-events")
    totals = purchases_per_user(job, events)
    if "output_topic" in params:
        sink = KafkaSink(
            bootstrap,
            params["output_topic"],
            key=lambda r: r["user"],
            guarantee=params.get("guarantee", "at-least-once"),
            transactional_id_prefix=params.get("transactional_id"),
        )
        totals.sink_to(sink, name="Sink: Kafka totals").uid("kafka-totals")
    elif "output" in params:
        totals.sink_to(TwoPhaseCommitFileSink(params["output"]), name="committed files").uid(
            "output"
        )
    else:
        msg = "set output_topic=TOPIC (with guarantee=...) or output=DIRECTORY"
        raise JobDefinitionError(msg)
