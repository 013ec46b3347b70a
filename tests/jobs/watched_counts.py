"""The job the ``--watch`` tests edit: numbered records (``{"key", "seq"}`` JSON lines from
``input``, ``rate`` per second) through a keyed running count into the two-phase file sink at
``output``. The tests change what the ``shape`` map emits, the running count's uid, or the
``label`` of the helper module ``watched_labels`` next to this file."""

from __future__ import annotations

from typing import Any

from watched_labels import label

from connectors import FileSource, TwoPhaseCommitFileSink
from runtime import Collector, Job, KeyedProcessContext, KeyedProcessFunction, RuntimeContext
from state import ValueStateDescriptor


class RunningCount(KeyedProcessFunction[str, dict[str, Any], dict[str, Any]]):
    """Per key: the number of records so far (state that must carry over a reload)."""

    def open(self, ctx: RuntimeContext) -> None:
        self.count = ctx.get_state(ValueStateDescriptor("count", default=0))

    def process_element(
        self, value: dict[str, Any], ctx: KeyedProcessContext[str], out: Collector[dict[str, Any]]
    ) -> None:
        n = self.count.value() + 1
        self.count.update(n)
        out.collect({"key": value["key"], "seq": value["seq"], "n": n})


def shape(record: dict[str, Any]) -> dict[str, Any]:
    return {"key": record["key"], "seq": record["seq"], "n": record["n"], "label": label()}


def build(job: Job) -> None:
    source = FileSource(
        job.params.require("input"), format="json", rate=job.params.get_float("rate", 0.0)
    )
    counted = (
        job.from_source(source)
        .uid("events")
        .key_by(lambda e: e["key"])
        .process(RunningCount(), name="running count")
        .uid("running-count")
    )
    counted.map(shape, name="shape").uid("shape").sink_to(
        TwoPhaseCommitFileSink(job.params.require("output")), name="committed files"
    ).uid("output")
