"""An endless click stream enriched with a bounded side input (user → country), exactly once.

    python -m runtime run examples/bounded_with_stream.py --set output=/tmp/enriched \
        --checkpoint-interval 1s --checkpoint-dir /tmp/enriched-chk

The side input (``countries``, default the bundled ``data/user_countries.jsonl``) is read once and
its source finishes within a second; the click stream (``rate`` clicks per second, default 200;
``count`` makes it bounded) goes on. Checkpoints keep completing after the file source finished
(FLIP-147): see ``python -m runtime checkpoints /tmp/enriched-chk`` or the control endpoint's
``/checkpoints``. Stop it with ``python -m runtime stop bounded_with_stream`` (the savepoint goes
into ``/tmp/enriched-chk/savepoints``).

Output lines: ``{"user": ..., "click": n, "country": ...}``, each click exactly once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connectors import FileSource, GeneratorSource, TwoPhaseCommitFileSink
from runtime import Collector, Job, KeyedCoProcessFunction, KeyedProcessContext, RuntimeContext
from state import ListStateDescriptor, ValueStateDescriptor

BUNDLED_COUNTRIES = Path(__file__).parent / "data" / "user_countries.jsonl"
USERS = 50


def click(index: int) -> dict[str, Any]:
    return {"user": f"u{index % USERS:02d}", "click": index}


class EnrichWithCountry(KeyedCoProcessFunction[str, dict[str, Any], dict[str, Any]]):
    """Input 1: clicks; input 2: the side input. Clicks of a user whose country is not known yet
    wait in keyed list state and are emitted when it arrives."""

    def open(self, ctx: RuntimeContext) -> None:
        self.country = ctx.get_state(ValueStateDescriptor("country"))
        self.waiting = ctx.get_state(ListStateDescriptor("waiting"))

    def process_element1(
        self, value: dict[str, Any], ctx: KeyedProcessContext[str], out: Collector[dict[str, Any]]
    ) -> None:
        country = self.country.value()
        if country is None:
            self.waiting.add(value)
        else:
            out.collect({**value, "country": country})

    def process_element2(
        self, value: dict[str, Any], ctx: KeyedProcessContext[str], out: Collector[dict[str, Any]]
    ) -> None:
        self.country.update(value["country"])
        for pending in self.waiting.get():
            out.collect({**pending, "country": value["country"]})
        self.waiting.clear()


def build(job: Job) -> None:
    count = job.params.get("count")
    clicks = job.from_source(
        GeneratorSource(
            click, rate=job.params.get_float("rate", 200.0), count=int(count) if count else None
        ),
        name="Source: clicks",
    ).uid("clicks")
    countries = job.from_source(
        FileSource(job.params.get("countries", str(BUNDLED_COUNTRIES)), format="json"),
        name="Source: countries",
    ).uid("countries")
    enriched = (
        clicks.connect(countries)
        .key_by(lambda c: c["user"], lambda u: u["user"])
        .process(EnrichWithCountry(), name="enrich")
        .uid("enrich")
    )
    enriched.sink_to(
        TwoPhaseCommitFileSink(job.params.require("output")), name="committed files"
    ).uid("output")
