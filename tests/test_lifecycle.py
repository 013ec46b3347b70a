"""Operator lifecycle: open -> (records) -> end_input -> finish -> close on a graceful end, close
without finish on failure, finish only after every input ended, and failures that name their place.

User functions are deep-copied per subtask, so they record into the module-level ``LOG``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from loop_helpers import wait_until

from actors.task import TaskState
from connectors import CollectionSource, CollectSink
from runtime import (
    Collector,
    ExecutionConfig,
    JobFailedError,
    KeyedCoProcessFunction,
    KeyedProcessFunction,
    MapFunction,
    RuntimeContext,
    run_job,
    run_job_async,
)
from runtime.api.sources import END_OF_INPUT, EndOfInput, Source, SourceReader, SourceReaderContext
from runtime.master.jobmaster import JobMaster, JobResult
from runtime.shell.runner import build_graph

LOG: list[tuple[str, int, str, Any]] = []
"""(label, subtask, call, detail) for every lifecycle call and record seen."""


@pytest.fixture(autouse=True)
def clear_log() -> Any:
    LOG.clear()
    yield
    LOG.clear()


def calls(label: str, subtask: int = 0, with_records: bool = False) -> list[Any]:
    return [
        (call, detail) if with_records else call
        for lab, sub, call, detail in LOG
        if lab == label and sub == subtask and (with_records or call != "record")
    ]


class Recording(MapFunction[Any, Any]):
    def __init__(self, label: str, fail_on: Any = None) -> None:
        self.label = label
        self.fail_on = fail_on
        self.subtask = -1

    def open(self, ctx: RuntimeContext) -> None:
        self.subtask = ctx.subtask_index
        LOG.append((self.label, self.subtask, "open", None))

    def map(self, value: Any) -> Any:
        if self.fail_on is not None and value == self.fail_on:
            msg = f"cannot handle {value!r}"
            raise ValueError(msg)
        LOG.append((self.label, self.subtask, "record", value))
        return value

    def finish(self) -> None:
        LOG.append((self.label, self.subtask, "finish", None))

    def close(self) -> None:
        LOG.append((self.label, self.subtask, "close", None))


class RecordingProcess(KeyedProcessFunction[Any, Any, Any]):
    def __init__(self, label: str, fail_on: Any = None) -> None:
        self.label = label
        self.fail_on = fail_on
        self.subtask = -1

    def open(self, ctx: RuntimeContext) -> None:
        self.subtask = ctx.subtask_index
        LOG.append((self.label, self.subtask, "open", None))

    def process_element(self, value: Any, ctx: Any, out: Collector[Any]) -> None:
        if value == self.fail_on:
            msg = f"process_element cannot handle {value!r}"
            raise RuntimeError(msg)
        out.collect(value)

    def finish(self) -> None:
        LOG.append((self.label, self.subtask, "finish", None))

    def close(self) -> None:
        LOG.append((self.label, self.subtask, "close", None))


class GatedSource(Source[Any]):
    """One split: emits ``before``, then nothing until :meth:`release`, then ``after``, then ends."""

    def __init__(self, before: list[Any], after: list[Any]) -> None:
        self.before = list(before)
        self.after = list(after)
        self.released = False
        self._contexts: list[SourceReaderContext] = []

    def name(self) -> str:
        return "Gated"

    def create_splits(self, parallelism: int) -> list[Any]:
        return [{"split": 0, "phase": 0}]

    def create_reader(self, context: SourceReaderContext) -> SourceReader[Any]:
        self._contexts.append(context)
        return _GatedReader(self)

    def release(self) -> None:
        self.released = True
        for context in self._contexts:
            context.notify_available()


class _GatedReader(SourceReader[Any]):
    def __init__(self, source: GatedSource) -> None:
        self.source = source
        self.splits: list[dict[str, Any]] = []

    def add_splits(self, splits: list[Any]) -> None:
        self.splits.extend(dict(s) for s in splits)

    def poll(self, max_records: int) -> list[Any] | EndOfInput | None:
        for split in self.splits:
            if split["phase"] == 0:
                split["phase"] = 1
                return list(self.source.before)
            if split["phase"] == 1:
                if not self.source.released:
                    return None
                split["phase"] = 2
                return list(self.source.after)
        return END_OF_INPUT

    def snapshot_splits(self) -> list[Any]:
        return [dict(s) for s in self.splits]


async def settle(steps: int = 300) -> None:
    for _ in range(steps):
        await asyncio.sleep(0)


async def stop(job: asyncio.Task[Any]) -> None:
    if not job.done():
        job.cancel()
    try:
        await job
    except (asyncio.CancelledError, Exception):
        pass


# ------------------------------------------------------------------------------------------------
# finish before close on a graceful end; close without finish on failure


@pytest.mark.parametrize("parallelism", [1, 3])
def test_graceful_end_calls_open_finish_close_in_that_order(parallelism: int) -> None:
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(range(30)))
            .map(Recording("first"), name="first")
            .rebalance()
            .map(Recording("second"), name="second")
            .sink_to(sink)
        )

    run_job(build, parallelism=parallelism)
    assert sorted(sink.results) == list(range(30))
    for label in ("first", "second"):
        for subtask in range(parallelism):
            assert calls(label, subtask) == ["open", "finish", "close"], (label, subtask)
            seen = calls(label, subtask, with_records=True)
            # Every record was processed after open and before finish.
            assert seen[0] == ("open", None)
            assert seen[-2:] == [("finish", None), ("close", None)]


def test_failure_calls_close_without_finish_on_every_operator_of_the_job() -> None:
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(range(20)))
            .map(Recording("upstream", fail_on=12), name="upstream")
            .map(Recording("chained"), name="chained")
            .rebalance()
            .map(Recording("downstream"), name="downstream")
            .sink_to(sink)
        )

    with pytest.raises(JobFailedError):
        run_job(build)
    for label in ("upstream", "chained", "downstream"):
        assert calls(label) == ["open", "close"], label
    assert [d for c, d in calls("upstream", with_records=True) if c == "record"] == list(range(12))


def test_failure_in_a_keyed_process_function_closes_without_finish() -> None:
    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(range(10)))
            .key_by(lambda x: x % 3)
            .process(RecordingProcess("process", fail_on=4), name="process")
            .sink_to(CollectSink())
        )

    with pytest.raises(JobFailedError, match="process_element cannot handle 4"):
        run_job(build)
    assert calls("process") == ["open", "close"]


@pytest.mark.asyncio
async def test_failed_job_names_operator_subtask_and_record() -> None:
    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource([f"rec-{i}" for i in range(10)]))
            .map(Recording("explode", fail_on="rec-7"), name="explode")
            .sink_to(CollectSink())
        )

    # Elements 5..9 are subtask 2's slice of the collection.
    with pytest.raises(JobFailedError) as info:
        await asyncio.wait_for(run_job_async(build, parallelism=2), 10)
    message = str(info.value)
    assert "'explode'" in message
    assert "subtask 2/2" in message
    assert "'rec-7'" in message
    assert "ValueError: cannot handle 'rec-7'" in message
    assert isinstance(info.value.cause.__cause__, ValueError)


# ------------------------------------------------------------------------------------------------
# finish (and end_input) only after every input ended


@pytest.mark.asyncio
async def test_downstream_finishes_only_after_all_union_inputs_ended() -> None:
    held = GatedSource(before=[("b", i) for i in range(5)], after=[("b", i) for i in range(5, 10)])
    early = [("a", i) for i in range(20)]

    def build(job: Any) -> None:
        a = job.from_source(CollectionSource(early)).uid("a").set_parallelism(2)
        b = job.from_source(held).uid("b").set_parallelism(1)
        (
            a.union(b)
            .map(Recording("merge"), name="merge")
            .uid("merge")
            .disable_chaining()
            .set_parallelism(1)
            .sink_to(CollectSink())
        )

    master = JobMaster(build_graph(build), ExecutionConfig())
    job: asyncio.Task[JobResult] = asyncio.create_task(master.run())
    try:
        await wait_until(lambda: len(master.tasks) == 5, "deployment", job)
        a_tasks = [t for t in master.tasks if t.vertex_id == "a"]
        b_task = next(t for t in master.tasks if t.vertex_id == "b")
        merge_task = next(t for t in master.tasks if t.vertex_id == "merge")
        gate = merge_task.gate
        assert gate is not None and len(gate.channels) == 3

        def records_seen() -> set[Any]:
            return {d for lab, _, c, d in LOG if lab == "merge" and c == "record"}

        await wait_until(
            lambda: (
                records_seen() >= set(early) | set(held.before)
                and all(t.state is TaskState.FINISHING for t in a_tasks)
                and not any(c.has_data() for c in gate.channels)
            ),
            "the merge to read all of a (through its EndOfData) and the first part of b",
            job,
        )
        await settle()
        # Both channels from a delivered EndOfData, b did not: no finish yet.
        assert "finish" not in calls("merge")
        assert merge_task.state is TaskState.RUNNING
        assert b_task.state is TaskState.RUNNING

        held.release()
        await asyncio.wait_for(job, 10)
    finally:
        await stop(job)
    seen = calls("merge", with_records=True)
    assert seen[-2:] == [("finish", None), ("close", None)]
    records = [d for c, d in seen if c == "record"]
    assert sorted(records) == sorted(early + held.before + held.after)
    # finish came after the last record of the input that ended last.
    assert seen.index(("finish", None)) > seen.index(("record", ("b", 9)))


class EndInputRecorder(KeyedCoProcessFunction[Any, Any, Any]):
    def process_element1(self, value: Any, ctx: Any, out: Collector[Any]) -> None:
        LOG.append(("co", 0, "record", value))
        out.collect(value)

    def process_element2(self, value: Any, ctx: Any, out: Collector[Any]) -> None:
        LOG.append(("co", 0, "record", value))
        out.collect(value)

    def end_input(self, input_number: int, out: Collector[Any]) -> None:
        LOG.append(("co", 0, "end_input", input_number))
        out.collect(("end", input_number))

    def finish(self) -> None:
        LOG.append(("co", 0, "finish", None))

    def close(self) -> None:
        LOG.append(("co", 0, "close", None))


@pytest.mark.asyncio
async def test_two_input_operator_ends_each_input_separately_and_finishes_after_both() -> None:
    held = GatedSource(before=[("k", "late-0")], after=[("k", "late-1")])
    sink = CollectSink()

    def build(job: Any) -> None:
        first = job.from_source(CollectionSource([("k", f"early-{i}") for i in range(5)])).uid(
            "first"
        )
        second = job.from_source(held).uid("second")
        (
            first.connect(second)
            .key_by(lambda r: r[0], lambda r: r[0])
            .process(EndInputRecorder(), name="co")
            .uid("co")
            .sink_to(sink)
        )

    master = JobMaster(build_graph(build), ExecutionConfig())
    job: asyncio.Task[JobResult] = asyncio.create_task(master.run())
    try:
        await wait_until(
            lambda: (
                ("co", 0, "end_input", 1) in LOG and ("co", 0, "record", ("k", "late-0")) in LOG
            ),
            "input 1 to end while input 2 is held",
            job,
        )
        await settle()
        assert [d for _, _, c, d in LOG if c == "end_input"] == [1]
        assert ("co", 0, "finish", None) not in LOG
        held.release()
        await asyncio.wait_for(job, 10)
    finally:
        await stop(job)
    sequence = [(c, d) for _, _, c, d in LOG]
    assert sequence[-3:] == [("end_input", 2), ("finish", None), ("close", None)]
    assert sequence.index(("end_input", 2)) > sequence.index(("record", ("k", "late-1")))
    assert ("end", 1) in sink.results and ("end", 2) in sink.results
    assert sink.results.index(("end", 2)) == len(sink.results) - 1
