"""Helpers for in-process tests: step the event loop until a condition holds (no sleeps); a job
running in the background, its ``/status`` and its operators' metrics; a ``ManualClock`` moved
until the tasks ran what became due; a virtual clock and scripted task handles to drive the
checkpoint coordinator without tasks; a source that emits what the test pushes; an unbounded
source whose splits the test feeds while the job runs, and a process function that shows the
watermark each record and timer saw; a sink the test holds back (backpressure) and a word
count job over them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from cli_helpers import get_json, get_metrics

from actors.protocol import TaskCommand, TaskId, TaskMetrics, TaskState
from runtime.api.functions import (
    Collector,
    KeyedProcessContext,
    KeyedProcessFunction,
    RuntimeContext,
)
from runtime.api.sinks import Sink, SinkWriter
from runtime.api.sources import END_OF_INPUT, Source, SourceReader, SourceReaderContext
from runtime.config import ExecutionConfig
from runtime.master.jobmaster import JobMaster
from runtime.plan.jobfile import build_graph
from runtime.shell.rest import ControlServer
from runtime.testing import ManualClock


async def wait_until(
    predicate: Callable[[], bool],
    what: str,
    job: asyncio.Task[Any] | None = None,
    steps: int = 100_000,
) -> None:
    """Step the loop until ``predicate`` holds; a job that ended meanwhile raises its own error."""
    for _ in range(steps):
        if predicate():
            return
        if job is not None and job.done():
            job.result()  # raises the job's failure
            msg = f"the job ended while waiting for {what}"
            raise AssertionError(msg)
        await asyncio.sleep(0)
    msg = f"gave up waiting for {what}"
    raise AssertionError(msg)


@contextlib.asynccontextmanager
async def running_job(
    build: Callable[[Any], None], parallelism: int = 1, config: ExecutionConfig | None = None
) -> AsyncIterator[tuple[JobMaster, asyncio.Task[Any]]]:
    """Runs the job in the background; cancels it (every task closes) on exit."""
    master = JobMaster(build_graph(build, None, parallelism), config)
    job = asyncio.create_task(master.run())
    try:
        yield master, job
    finally:
        if not job.done():
            job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job


async def control_status(master: JobMaster) -> Any:
    """``GET /status`` of the job, through a control endpoint started for the call."""
    return await control_call(master, get_json, "/status")


async def control_metrics(master: JobMaster) -> dict[str, Any]:
    """``GET /metrics`` of the job, parsed (see ``cli_helpers.get_metrics``), through a control
    endpoint started for the call."""
    families: dict[str, Any] = await control_call(master, get_metrics)
    return families


async def control_call(master: JobMaster, call: Callable[..., Any], *args: Any) -> Any:
    """``call(address, *args)`` in a thread, against a control endpoint of the job started for
    the call."""
    async with serving_control(master) as (_, address):
        return await asyncio.to_thread(call, address, *args)


@contextlib.asynccontextmanager
async def serving_control(
    master: JobMaster, cancel: Callable[[], None] = lambda: None, **options: Any
) -> AsyncIterator[tuple[ControlServer, str]]:
    """The job's control endpoint on a free port (``options``: ``host``, ``savepoint_dir``,
    ``allowed_savepoint_dirs``...) and its address; its token is ``server.token``."""
    server = ControlServer(master, cancel, port=0, **options)
    address = await server.start()
    try:
        yield server, address
    finally:
        await server.stop()


def operator_metric(master: JobMaster, uid: str, metric: str) -> int:
    """The sum of ``OperatorMetrics.<metric>`` (``records_in``, ``late_records_dropped``, ...)
    of the operator ``uid`` over its subtasks running in this process."""
    return sum(subtask_metrics(master, uid, metric))


def subtask_metrics(master: JobMaster, uid: str, metric: str) -> list[Any]:
    """``OperatorMetrics.<metric>`` (``watermark``, ``idle``, ...) of the operator ``uid`` in each
    of its subtasks running in this process, by subtask index."""
    return [
        getattr(op.metrics, metric)
        for task in sorted(master.tasks, key=lambda t: t.subtask_index)
        for op in task.operators
        if op.uid == uid
    ]


async def advance_clock(
    clock: ManualClock, ms: int, scheduled: int, job: asyncio.Task[Any] | None = None
) -> None:
    """Move ``clock`` ``ms`` forward and wait until the tasks ran the callbacks that became due
    and ``scheduled`` callbacks are pending on the clock again: ``scheduled`` is how many the job
    keeps there (one periodic watermark emission per subtask of an operator with a watermark
    strategy, which schedules its next one after emitting). The watermarks and idleness that this
    time causes have then left the operators that emit them."""
    clock.advance(ms)
    await wait_until(
        lambda: clock.pending == scheduled,
        f"the callbacks due at {clock.now_ms()} ms on the clock to run and reschedule",
        job,
    )


class VirtualClock:
    """A coordinator clock that moves only when the test advances it."""

    def __init__(self, start_s: float = 1000.0, start_wall_ms: int = 1_700_000_000_000) -> None:
        self.now_s = start_s
        self._wall_offset_ms = start_wall_ms - int(start_s * 1000)

    def monotonic_s(self) -> float:
        return self.now_s

    def wall_ms(self) -> int:
        return self._wall_offset_ms + int(self.now_s * 1000)

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


class ScriptedTaskHandle:
    """A task handle whose state the test sets (as a late report would leave it) and which records
    the commands sent to it; ``accepts = False`` makes ``send`` fail as for a task that ended."""

    def __init__(
        self,
        vertex_id: str,
        subtask_index: int = 0,
        *,
        state: TaskState = TaskState.RUNNING,
        upstream: tuple[TaskId, ...] = (),
        operator_uids: tuple[str, ...] | None = None,
        attempt: int = 1,
    ) -> None:
        self.task_id = TaskId(vertex_id, subtask_index, attempt)
        self.name = f"{vertex_id} ({subtask_index + 1})"
        self.state = state
        self.upstream = upstream
        self.operator_uids = operator_uids if operator_uids is not None else (vertex_id,)
        self.accepts = True
        self.sent: list[TaskCommand] = []
        self.metrics: TaskMetrics | None = None
        """What ``latest_metrics`` gives (the test sets it, as a TaskManager's report would)."""

    def send(self, command: TaskCommand) -> bool:
        if not self.accepts:
            return False
        self.sent.append(command)
        return True

    def latest_metrics(self) -> TaskMetrics | None:
        return self.metrics

    def take_sent(self) -> list[TaskCommand]:
        """The commands sent since the last call."""
        sent, self.sent = self.sent, []
        return sent


class ControlledSource(Source[Any]):
    """One split over ``elements``, which the test extends with ``push``; ends when the test
    calls ``end``. The split's position is its state, so a restored reader replays from there.

    ``hold``: while set to an unset event, ``prepare_snapshot`` (the start of this source's
    snapshot) waits on it, which delays this source's barrier.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self.elements: list[Any] = []
        self.ended = False
        self.hold: asyncio.Event | None = None
        self.snapshots_started = 0
        self._notify: Callable[[], None] | None = None

    def name(self) -> str:
        return self._name

    def create_splits(self, parallelism: int) -> list[Any]:
        return [{"split": 0, "next": 0}]

    def create_reader(self, context: Any) -> SourceReader[Any]:
        self._notify = context.notify_available
        return _ControlledReader(self)

    def push(self, *values: Any) -> None:
        self.elements.extend(values)
        if self._notify is not None:
            self._notify()

    def end(self) -> None:
        self.ended = True
        if self._notify is not None:
            self._notify()


def ended_source(name: str, elements: list[Any]) -> ControlledSource:
    """A :class:`ControlledSource` that has all of ``elements`` and has ended: a bounded source
    of one split, whose position a restored job resumes from."""
    source = ControlledSource(name)
    source.push(*elements)
    source.end()
    return source


class _ControlledReader(SourceReader[Any]):
    def __init__(self, source: ControlledSource) -> None:
        self.source = source
        self.splits: list[dict[str, Any]] = []

    def add_splits(self, splits: list[Any]) -> None:
        self.splits.extend(dict(s) for s in splits)

    def poll(self, max_records: int) -> Any:
        source = self.source
        for split in self.splits:
            start = split["next"]
            if start < len(source.elements):
                values = source.elements[start : start + max_records]
                split["next"] = start + len(values)
                return values
        if source.ended:
            return END_OF_INPUT
        return None

    async def prepare_snapshot(self) -> None:
        self.source.snapshots_started += 1
        hold = self.source.hold
        if hold is not None:
            await hold.wait()

    def snapshot_splits(self) -> list[Any]:
        return [dict(s) for s in self.splits]


async def start_job_on_master(
    build: Callable[[Any], None],
    config: Any,
    parallelism: int = 1,
    name: str = "test-job",
    **master_kw: Any,
) -> tuple[Any, asyncio.Task[Any]]:
    """A job master running ``build`` as a task of this loop, once every task of it runs; the
    test triggers checkpoints with :func:`take_checkpoint` and ends sources itself."""
    from runtime.master.jobmaster import JobMaster
    from runtime.shell.runner import build_graph

    graph = build_graph(build, {}, parallelism, name=name)
    master = JobMaster(graph, config, **master_kw)
    job = asyncio.create_task(master.run())
    await wait_until(
        lambda: bool(master.tasks) and all(t.state is TaskState.RUNNING for t in master.tasks),
        "every task running",
        job,
    )
    return master, job


async def take_checkpoint(master: Any, timeout_s: float = 10.0) -> Any:
    """Trigger a checkpoint on ``master`` and return it once completed (``.path`` is its folder
    when the job has a checkpoint directory)."""
    from state.storage import CheckpointKind

    trigger = master.coordinator.request_trigger(CheckpointKind.CHECKPOINT)
    return await asyncio.wait_for(trigger, timeout_s)


class FedSplitsSource(Source[Any]):
    """An unbounded source of ``splits`` splits that emit what the test feeds them while the job
    runs (:meth:`feed`), and otherwise nothing: it never ends. Each poll returns records of one
    split and names it, so a watermark strategy runs per split."""

    bounded = False

    def __init__(self, splits: int) -> None:
        self.fed: list[list[Any]] = [[] for _ in range(splits)]
        self.readers: list[_FedSplitsReader] = []
        self._contexts: list[SourceReaderContext] = []

    def name(self) -> str:
        return "FedSplits"

    def create_splits(self, parallelism: int) -> list[Any]:
        return [{"split": i, "next": 0} for i in range(len(self.fed))]

    def create_reader(self, context: SourceReaderContext) -> SourceReader[Any]:
        self._contexts.append(context)
        reader = _FedSplitsReader(self)
        self.readers.append(reader)
        return reader

    def feed(self, split: int, records: list[Any]) -> None:
        self.fed[split].extend(records)
        for context in self._contexts:
            context.notify_available()

    def all_read(self) -> bool:
        """Every record fed so far was polled (by the readers of the latest attempt)."""
        return bool(self.readers) and all(
            split["next"] == len(self.fed[split["split"]])
            for reader in self.readers
            for split in reader.splits
        )


class _FedSplitsReader(SourceReader[Any]):
    watermarks_per_split = True

    def __init__(self, source: FedSplitsSource) -> None:
        self.source = source
        self.splits: list[dict[str, Any]] = []
        self._last: Any = None

    def add_splits(self, splits: list[Any]) -> None:
        self.splits.extend(dict(s) for s in splits)

    def poll(self, max_records: int) -> list[Any] | None:
        for split in self.splits:
            fed = self.source.fed[split["split"]]
            start = split["next"]
            if start < len(fed):
                records = fed[start : start + max_records]
                split["next"] = start + len(records)
                self._last = split["split"]
                return records
        return None

    def split_of_last_poll(self) -> Any:
        return self._last

    def snapshot_splits(self) -> list[Any]:
        return [dict(s) for s in self.splits]


class EventTimeTimers(KeyedProcessFunction[Any, Any, Any]):
    """Emits ``("record", key, timestamp, watermark)`` per record and registers an event-time
    timer ``delay`` after it; a firing emits ``("timer", key, timestamp, watermark)``."""

    def __init__(self, delay: int) -> None:
        self.delay = delay

    def process_element(
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        assert ctx.timestamp is not None
        out.collect(("record", ctx.current_key, ctx.timestamp, ctx.current_watermark()))
        ctx.timer_service().register_event_time_timer(ctx.timestamp + self.delay)

    def on_timer(self, timestamp: int, ctx: KeyedProcessContext[Any], out: Collector[Any]) -> None:
        out.collect(("timer", ctx.current_key, timestamp, ctx.current_watermark()))


def fired(sink: Any) -> list[tuple[Any, ...]]:
    """The timer firings an :class:`EventTimeTimers` wrote to ``sink``, sorted."""
    return sorted(r for r in sink.results if r[0] == "timer")


def records(sink: Any) -> list[tuple[Any, ...]]:
    """The records an :class:`EventTimeTimers` wrote to ``sink``, in order."""
    return [r for r in sink.results if r[0] == "record"]


async def wait_until_in_time(
    predicate: Callable[[], bool],
    what: str,
    job: asyncio.Task[Any] | None = None,
    timeout_s: float = 10.0,
) -> None:
    """:func:`wait_until` for conditions that need wall time to pass (rates and milliseconds per
    second, which are means over about the last second): polls every 10 ms until ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if job is not None and job.done():
            job.result()
            msg = f"the job ended while waiting for {what}"
            raise AssertionError(msg)
        if asyncio.get_running_loop().time() > deadline:
            msg = f"gave up waiting for {what} after {timeout_s:g}s"
            raise AssertionError(msg)
        await asyncio.sleep(0.01)


class HeldSink(Sink):
    """Collects what it writes, but holds every write while ``release`` is not set (the test sets
    and clears it; ``held`` starts it clear), so its upstream runs out of credit (backpressure);
    ``entered`` is set at the first write; each subtask's snapshot raises while
    ``fail_snapshots`` is set."""

    def __init__(self, held: bool = False) -> None:
        self.results: list[Any] = []
        self.release = asyncio.Event()
        if not held:
            self.release.set()
        self.entered = asyncio.Event()
        self.fail_snapshots = False
        self.snapshot_failures = 0

    @property
    def count(self) -> int:
        """Records written so far."""
        return len(self.results)

    def name(self) -> str:
        return "Held"

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        return _HeldWriter(self)


class _HeldWriter(SinkWriter):
    def __init__(self, sink: HeldSink) -> None:
        self.sink = sink

    async def write(self, values: list[Any]) -> None:
        self.sink.entered.set()
        await self.sink.release.wait()
        self.sink.results.extend(values)

    async def snapshot_state(self, checkpoint_id: int) -> list[Any]:
        if self.sink.fail_snapshots:
            self.sink.snapshot_failures += 1
            msg = f"snapshot {checkpoint_id} of the held sink fails, as the test asked"
            raise OSError(msg)
        return []


def _split_words(line: str) -> list[tuple[str, int]]:
    return [(word, 1) for word in line.split()]


def _add_counts(a: tuple[str, int], b: tuple[str, int]) -> tuple[str, int]:
    return a[0], a[1] + b[1]


def word_count_job(source: Source[Any], sink: Sink, count_parallelism: int = 2) -> Any:
    """``build(job)`` of a word count: ``source`` of lines -> ``split words`` -> key by word ->
    ``count`` (a reduce, uid ``word-counts``, value state ``reduce`` holding ``(word, count)``,
    ``count_parallelism`` subtasks) -> ``sink`` (parallelism 1). Three vertices, joined by a hash
    and a rebalance edge."""

    def build(job: Any) -> None:
        (
            job.from_source(source, name="lines")
            .flat_map(_split_words, name="split words")
            .key_by(lambda pair: pair[0])
            .reduce(_add_counts, name="count")
            .uid("word-counts")
            .set_parallelism(count_parallelism)
            .sink_to(sink, name="counts sink")
            .set_parallelism(1)
        )

    return build
