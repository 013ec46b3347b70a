"""Fault injection for users' own exactly-once tests (and ours).

- :class:`TestingSource`: a bounded source over a list whose elements may include control markers:
  ``TestingSource.CRASH`` (the first time it is reached, the task raises ``InjectedCrash``, so the
  restart strategy restarts from the latest checkpoint) and ``TestingSource.END`` (end of input;
  later elements are never read).
- :class:`TestingSink`: list-backed; ``written`` is every record written by any attempt,
  ``committed`` only what the checkpoints committed, which is what an exactly-once run promises.
- Named crash points: ``--set testing.crash-at=POINT[:N]`` and ``--set testing.crash-mode=raise|exit``
  crash at the N-th pass of ``before-snapshot``, ``before-commit`` or ``during-restore``.
- :class:`ManualClock`: processing time that moves only when the test says so; pass it as
  ``ExecutionConfig(clock=ManualClock())`` and ``advance(ms)`` fires processing-time timers,
  periodic watermarks and idleness without waiting on the wall clock.
- :class:`SimulatedService`: an async service for ``map_async`` (random latencies from a seed, a
  gate that holds every call, failures), counting calls and the most in flight at once.

A test then reads: run, crash, restore, and assert ``committed`` equals the expected output.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from typing import Any

from actors.faults import POINTS, InjectedCrash, arm, crash_point, disarm_all
from actors.timers import ManualClock
from runtime.api.functions import RuntimeContext
from runtime.api.sinks import Sink, SinkWriter
from runtime.api.sources import (
    END_OF_INPUT,
    EndOfInput,
    Source,
    SourceReader,
    SourceReaderContext,
    contiguous_splits,
)

__all__ = [
    "POINTS",
    "InjectedCrash",
    "ManualClock",
    "SimulatedService",
    "TestingSink",
    "TestingSource",
    "arm",
    "arm_from_params",
    "crash_point",
    "disarm_all",
]


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"TestingSource.{self.name}"


class TestingSource(Source[Any]):
    """Elements split into one contiguous slice per subtask; markers are positions too."""

    CRASH = _Marker("CRASH")
    END = _Marker("END")

    def __init__(self, elements: list[Any], rate: float = 0.0) -> None:
        self.elements = list(elements)
        self.rate = rate
        self.crashed: set[int] = set()
        """Positions of CRASH markers that already fired (shared by all attempts in-process)."""

    def name(self) -> str:
        return "Testing"

    def create_splits(self, parallelism: int) -> list[Any]:
        return list(contiguous_splits(len(self.elements), parallelism))

    def create_reader(self, context: SourceReaderContext) -> SourceReader[Any]:
        return _TestingReader(self)


class _TestingReader(SourceReader[Any]):
    def __init__(self, source: TestingSource) -> None:
        self.source = source
        self.splits: list[dict[str, Any]] = []

    def add_splits(self, splits: list[Any]) -> None:
        self.splits.extend(dict(s) for s in splits)

    def poll(self, max_records: int) -> list[Any] | EndOfInput | None:
        elements = self.source.elements
        for split in self.splits:
            out: list[Any] = []
            while split["next"] < split["end"] and len(out) < max_records:
                position = split["next"]
                element = elements[position]
                if element is TestingSource.CRASH:
                    if out:
                        return out  # emit what precedes the marker first
                    split["next"] += 1
                    if position not in self.source.crashed:
                        self.source.crashed.add(position)
                        msg = f"TestingSource.CRASH at element {position}"
                        raise InjectedCrash(msg)
                    continue
                if element is TestingSource.END:
                    split["end"] = position
                    break
                out.append(element)
                split["next"] += 1
            if out:
                return out
        return END_OF_INPUT

    def snapshot_splits(self) -> list[Any]:
        return [dict(s) for s in self.splits]

    def describe_position(self) -> str | None:
        return ", ".join(f"split {s['split']} at element {s['next']}" for s in self.splits) or None


class TestingSink(Sink):
    """Shared lists of what was written (``written``) and what checkpoints committed (``committed``).

    It behaves like a two-phase-commit sink: records written before a checkpoint are pre-committed
    in its state and become committed when it completes, or on restore from it (a crash between
    the two loses nothing). Each pre-committed batch has an id, so committing it again is a no-op.
    Records must be msgpack-encodable, since they travel in the checkpoint.
    """

    def __init__(self) -> None:
        self.written: list[Any] = []
        self.committed: list[Any] = []
        self._committed_batches: set[str] = set()

    @property
    def results(self) -> list[Any]:
        return self.written

    def name(self) -> str:
        return "Testing"

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        return _TestingWriter(self)

    def _commit(self, batch: dict[str, Any]) -> None:
        if batch["id"] not in self._committed_batches:
            self._committed_batches.add(batch["id"])
            self.committed.extend(batch["records"])


class _TestingWriter(SinkWriter):
    def __init__(self, sink: TestingSink) -> None:
        self.sink = sink
        self.staged: list[Any] = []
        self.pending: list[dict[str, Any]] = []

    async def restore(self, state: list[Any]) -> None:
        crash_point("during-restore", "TestingSink")
        for batch in state:
            self.sink._commit(batch)

    async def write(self, values: list[Any]) -> None:
        self.sink.written.extend(values)
        self.staged.extend(values)

    async def snapshot_state(self, checkpoint_id: int) -> list[Any]:
        if self.staged:
            batch_id = f"{id(self):x}-{checkpoint_id}-{os.urandom(4).hex()}"
            self.pending.append(
                {"id": batch_id, "checkpoint": checkpoint_id, "records": self.staged}
            )
            self.staged = []
        return [dict(b) for b in self.pending]

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        due = [b for b in self.pending if b["checkpoint"] <= checkpoint_id]
        if not due:
            return
        crash_point("before-commit", f"TestingSink, checkpoint {checkpoint_id}")
        for batch in due:
            self.sink._commit(batch)
        self.pending = [b for b in self.pending if b["checkpoint"] > checkpoint_id]


def arm_from_params(params: dict[str, str]) -> None:
    """Arm the crash point named by ``testing.crash-at=POINT[:N]`` (mode ``testing.crash-mode``)."""
    spec = params.get("testing.crash-at")
    if not spec:
        return
    point, _, hit = spec.partition(":")
    arm(point, int(hit) if hit else 1, params.get("testing.crash-mode", "raise"))


class SimulatedService:
    """An async service to call from ``map_async`` in tests, examples and benchmarks.

    ``await service.call(value)`` returns ``respond(value)`` after a latency: ``latency_s``
    seconds, or a uniform draw from a ``(low, high)`` range with a generator seeded by ``seed``.
    While :meth:`hold` is in effect every call also waits until :meth:`release`. ``fail(value)``
    returning an exception makes that call raise it. Counts every call (``calls``, ``requests``:
    the values asked for, repeats included), the calls in flight now and the most at once.
    One instance is shared by every subtask in the process (copying a function keeps it).
    """

    def __init__(
        self,
        respond: Callable[[Any], Any] = lambda value: value,
        latency_s: float | tuple[float, float] = 0.0,
        seed: int = 0,
        fail: Callable[[Any], BaseException | None] | None = None,
    ) -> None:
        self.respond = respond
        self.latency_s = latency_s
        self.fail = fail
        self._random = random.Random(seed)
        self._gate: asyncio.Event | None = None
        self.calls = 0
        self.requests: list[Any] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> SimulatedService:
        return self

    def hold(self) -> None:
        """Calls from now on wait until :meth:`release` (calls already waiting stay held)."""
        if self._gate is None:
            self._gate = asyncio.Event()

    def release(self) -> None:
        """Let every held call go on."""
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    async def call(self, value: Any) -> Any:
        self.calls += 1
        self.requests.append(value)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            latency = self.latency_s
            if isinstance(latency, tuple):
                latency = self._random.uniform(*latency)
            await asyncio.sleep(latency)
            gate = self._gate
            if gate is not None:
                await gate.wait()
            if self.fail is not None:
                error = self.fail(value)
                if error is not None:
                    raise error
            return self.respond(value)
        finally:
            self.in_flight -= 1
