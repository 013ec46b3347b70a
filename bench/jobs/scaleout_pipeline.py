"""The in-memory pipeline of bench/scaleout.py as a job file (TaskManagers import job files).

    python -m runtime run bench/jobs/scaleout_pipeline.py -p 2 --taskmanagers 2 --set records=1000000

Each source subtask generates its share of ``records`` JSON events (deterministic from the index,
~60% purchases over ``users`` users); then: parse (orjson.loads) → keep purchases → key by user →
running total per user in keyed state → {"user", "total"} serialised with orjson.dumps → a sink
that only counts (``RunningTotal`` of bench/pipeline.py).

Each sink subtask prints ``SPAN <first ns> <last ns> <records>`` when it closes: the wall-clock
times of its first and last buffer, so a benchmark measures the processing alone, without the
start of the processes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import RunningTotal

from connectors import GeneratorSource
from runtime import Job, RuntimeContext, Sink, SinkWriter

KINDS = ("purchase",) * 6 + ("view",) * 3 + ("click",)


def make_event(users: int) -> Any:
    def event(i: int) -> bytes:
        mixed = (i * 2654435761) & 0xFFFFFFFF
        return b'{"user":"u%d","kind":"%s","amount":%d.%02d,"ts":%d}' % (
            mixed % users,
            KINDS[(mixed >> 8) % 10].encode(),
            1 + (mixed >> 12) % 99,
            (mixed >> 4) % 100,
            1_700_000_000_000 + i * 10,
        )

    return event


class SpanCountingSink(Sink):
    """Counts what it is given and drops it; prints its span on close (see the module docstring)."""

    def name(self) -> str:
        return "count"

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        return _SpanCountingWriter()


class _SpanCountingWriter(SinkWriter):
    def __init__(self) -> None:
        self.count = 0
        self.first_ns = 0
        self.last_ns = 0

    async def write(self, values: list[Any]) -> None:
        now = time.time_ns()
        if not self.count:
            self.first_ns = now
        self.last_ns = now
        self.count += len(values)

    async def close(self) -> None:
        if self.count:
            print(f"SPAN {self.first_ns} {self.last_ns} {self.count}", flush=True)


def build(job: Job) -> None:
    records = job.params.get_int("records", 1_000_000)
    users = job.params.get_int("users", 10_000)
    (
        job.from_source(GeneratorSource(make_event(users), count=records), name="events")
        .map(orjson.loads, name="parse")
        .filter(lambda e: e["kind"] == "purchase", name="purchases")
        .key_by(lambda e: e["user"])
        .process(RunningTotal(), name="running total")
        .map(orjson.dumps, name="serialise")
        .sink_to(SpanCountingSink(), name="count")
    )
