"""A job for the backpressure test across TaskManagers (``tests/test_taskmanagers_e2e.py``).

One source subtask (``numbers``: ``{"i": i, "pid": <the source's process id>}`` for i < ``records``)
feeds, round robin, the sink ``held`` at the job's parallelism. A sink subtask that receives a
record from another process holds that write until the file ``MARKERS/release`` exists (it writes
``MARKERS/holding-<subtask>`` when it starts holding); a subtask in the source's process writes at
once. So with the sink's subtasks on two TaskManagers, the channel that crosses processes is the
only one that stops, and only credit holds the source back. Each sink subtask appends the indexes it
wrote to ``MARKERS/out-<subtask>.txt``, one per line.

Beside it runs the ``clock``: a bounded generator of ``clock_records`` (over all its subtasks) into
a sink that drops them, at the job's parallelism, so it has a subtask on every TaskManager. It shares each
TaskManager's event loop with the tasks there; while the clock runs to its end there, a source
that nothing holds back would emit about as many records as the clock (tasks take turns, one
buffer each).

Params: ``markers`` (a directory; required), ``records``, ``clock_records``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from connectors import GeneratorSource
from runtime import Job, RuntimeContext
from runtime.api.sinks import Sink, SinkWriter

RELEASE_POLL_S = 0.01


class HeldAcrossProcesses(Sink):
    """Holds every write that contains a record from another process until the release file
    exists."""

    def __init__(self, markers: str) -> None:
        self.markers = Path(markers)

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        return _HeldWriter(self.markers, context.subtask_index)


class _HeldWriter(SinkWriter):
    def __init__(self, markers: Path, subtask: int) -> None:
        self.release = markers / "release"
        self.holding = markers / f"holding-{subtask}"
        self.out = markers / f"out-{subtask}.txt"

    async def write(self, values: list[Any]) -> None:
        own = os.getpid()
        if any(value["pid"] != own for value in values) and not self.release.exists():
            self.holding.touch()
            # Waits on the event loop, so the TaskManager's other tasks and its connections run
            # on: only the credit protocol can stop the source. The release is a file the test
            # process creates: there is no event to await.
            while not self.release.exists():  # noqa: ASYNC110
                await asyncio.sleep(RELEASE_POLL_S)
        with self.out.open("a") as out:
            out.writelines(f"{value['i']}\n" for value in values)


class Dropping(Sink):
    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        return _DroppingWriter()


class _DroppingWriter(SinkWriter):
    async def write(self, values: list[Any]) -> None:
        pass


def build(job: Job) -> None:
    params = job.params
    records = int(params.get("records", "300000"))
    numbers = GeneratorSource(lambda i: {"i": i, "pid": os.getpid()}, count=records)
    (
        job.from_source(numbers, name="numbers")
        .uid("numbers")
        .set_parallelism(1)
        .rebalance()
        .sink_to(HeldAcrossProcesses(params.require("markers")), name="held")
        .uid("held")
    )
    clock = GeneratorSource(lambda i: i, count=int(params.get("clock_records", "300000")))
    job.from_source(clock, name="clock").uid("clock").sink_to(Dropping(), name="dropped").uid(
        "dropped"
    )
