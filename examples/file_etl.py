"""File ETL: purchases per user, with a running total and purchase counter, written exactly once.

    python -m runtime run examples/file_etl.py --set output=/tmp/etl-out \
        --checkpoint-interval 1s --checkpoint-dir /tmp/etl-chk

Params: ``input`` (JSON lines ``{"user","kind","amount","ts"}``; default the bundled
``data/events.jsonl``), ``output`` (a directory; required), ``rate`` (records per second per source
subtask, 0 = unlimited). Each purchase gives ``{"user", "total", "n"}`` where ``n`` counts that
user's purchases 1, 2, 3, ... Output goes through the two-phase-commit file sink, so after any number
of crashes and ``--restore latest`` the committed files hold every (user, n) exactly once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connectors import FileSource, TwoPhaseCommitFileSink
from runtime import Collector, Job, KeyedProcessContext, KeyedProcessFunction, RuntimeContext
from state import ValueStateDescriptor

BUNDLED_EVENTS = Path(__file__).parent / "data" / "events.jsonl"


class RunningTotals(KeyedProcessFunction[str, dict[str, Any], dict[str, Any]]):
    """Per user: the running total of purchase amounts and the purchase number."""

    def open(self, ctx: RuntimeContext) -> None:
        self.total = ctx.get_state(ValueStateDescriptor("total", default=0.0))
        self.count = ctx.get_state(ValueStateDescriptor("count", default=0))

    def process_element(
        self, value: dict[str, Any], ctx: KeyedProcessContext[str], out: Collector[dict[str, Any]]
    ) -> None:
        total = round(self.total.value() + float(value["amount"]), 2)
        n = self.count.value() + 1
        self.total.update(total)
        self.count.update(n)
        out.collect({"user": value["user"], "total": total, "n": n})


def purchases_per_user(job: Job, events: Any) -> Any:
    """The ETL logic, shared with ``kafka_etl.py``."""
    return (
        events.filter(lambda e: e.get("kind") == "purchase", name="purchases")
        .key_by(lambda e: e["user"])
        .process(RunningTotals(), name="running totals")
        .uid("running-totals")
    )


def build(job: Job) -> None:
    source = FileSource(
        job.params.get("input", str(BUNDLED_EVENTS)),
        format="json",
        rate=job.params.get_float("rate", 0.0),
    )
    events = job.from_source(source).uid("events")
    totals = purchases_per_user(job, events)
    totals.sink_to(
        TwoPhaseCommitFileSink(job.params.require("output")), name="committed files"
    ).uid("output")
