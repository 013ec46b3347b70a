"""Bounded runs of unbounded jobs from Python: ``run_job(build, max_records=N, timeout=...)``.

The job ends like a bounded job (drain, ``finish()``, a final checkpoint that commits what the
sinks received), without a checkpoint directory too; exactly N records reach the sinks; the
timeout runs on the job's clock (a ``ManualClock`` here: nothing waits on the wall clock)."""

from __future__ import annotations

import asyncio
import inspect
import json
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from loop_helpers import (
    ControlledSource,
    FedSplitsSource,
    start_job_on_master,
    take_checkpoint,
    wait_until,
)

from actors.operator import StreamOperator
from connectors import CollectSink, GeneratorSource, TwoPhaseCommitFileSink, committed_files
from runtime import ExecutionConfig, JobResult, run_job, run_job_async
from runtime.api.async_sink import AsyncSink, AsyncSinkWriter
from runtime.api.functions import RuntimeContext
from runtime.master.restart import FixedDelayRestart
from runtime.plan.limits import RecordLimitedSink, RunLimits
from runtime.testing import ManualClock
from state.storage import CheckpointStorage


def generator_job(sink: Any, parallelism: int | None = None) -> Any:
    """``build(job)``: an unbounded generator of 0, 1, 2, ... -> ``x * 10`` -> ``sink``."""

    def build(job: Any) -> None:
        stream = job.from_source(GeneratorSource(lambda i: i), name="numbers").uid("numbers")
        stream = stream.map(lambda x: x * 10, name="times ten").uid("times-ten")
        sunk = stream.sink_to(sink, name="sink").uid("sink")
        if parallelism is not None:
            sunk.set_parallelism(parallelism)

    return build


def idle_job(sink: Any) -> Any:
    """``build(job)``: an unbounded source that never produces a record -> ``sink``."""

    def build(job: Any) -> None:
        job.from_source(FedSplitsSource(1), name="silent").uid("silent").sink_to(sink).uid("sink")

    return build


def sink_records_in(result: JobResult) -> int:
    return sum(op.records_in for op in result.operators if op.uid == "sink")


def test_max_records_returns_exactly_n_records_committed_by_the_final_checkpoint() -> None:
    sink = CollectSink()
    result = run_job(generator_job(sink), max_records=10)
    assert result.stopped_by == "max_records"
    assert sink.written == [i * 10 for i in range(10)]
    assert sink.committed == sink.written
    assert sink_records_in(result) == 10
    assert result.checkpoints_completed == 1  # the final one, in memory (no checkpoint directory)
    assert result.stopped_with_savepoint is None


@pytest.mark.parametrize(
    "sink_parallelism", [None, 1], ids=["chained-sinks", "one-sink-behind-a-network-edge"]
)
def test_max_records_at_parallelism_2_counts_over_all_sink_subtasks(
    sink_parallelism: int | None,
) -> None:
    sink = CollectSink()
    result = run_job(generator_job(sink, sink_parallelism), parallelism=2, max_records=25)
    assert result.stopped_by == "max_records"
    assert len(sink.committed) == 25
    assert sorted(sink.committed) == sorted(sink.written)
    # Subtask s of the source makes s, s + 2, ...: each sink subtask got a prefix of its own.
    for subtask in (0, 1):
        values = sorted(v // 10 for v in sink.committed if (v // 10) % 2 == subtask)
        assert values == list(range(subtask, subtask + 2 * len(values), 2))
    assert sink_records_in(result) == 25


@pytest.mark.asyncio
@pytest.mark.parametrize("checkpoint_dir", [False, True], ids=["in-memory", "checkpoint-dir"])
@pytest.mark.asyncio
async def test_a_two_phase_file_sink_commits_exactly_what_it_received(
    tmp_path: Path, checkpoint_dir: bool
) -> None:
    out = tmp_path / "out"
    storage = CheckpointStorage(tmp_path / "chk" if checkpoint_dir else None, "job")
    result = await run_job_async(
        generator_job(TwoPhaseCommitFileSink(str(out)), parallelism=2),
        parallelism=2,
        max_records=40,
        storage=storage,
    )
    assert result.stopped_by == "max_records"
    committed = [json.loads(line) for f in committed_files(out) for line in f.read_text().split()]
    assert len(committed) == len(set(committed)) == 40
    assert sink_records_in(result) == 40
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".part-")]
    assert leftovers == []  # nothing pending or in progress: the final checkpoint committed all
    if checkpoint_dir:
        assert [p.name for p in (tmp_path / "chk").glob("chk-*")] == ["chk-1"]


@pytest.mark.asyncio
async def test_timeout_ends_a_job_whose_source_produces_nothing() -> None:
    clock = ManualClock()
    sink = CollectSink()
    config = ExecutionConfig(clock=clock)
    job = asyncio.create_task(run_job_async(idle_job(sink), config=config, timeout="2s"))
    await wait_until(lambda: clock.pending >= 1, "the timeout scheduled on the job's clock", job)
    clock.advance(1999)
    for _ in range(200):
        await asyncio.sleep(0)
    assert not job.done()
    clock.advance(1)
    result = await asyncio.wait_for(job, 10)
    assert result.stopped_by == "timeout"
    assert sink.written == [] and sink.committed == []
    assert result.checkpoints_completed == 1


@pytest.mark.asyncio
async def test_timeout_commits_what_the_sinks_received() -> None:
    clock = ManualClock()
    sink = CollectSink()
    config = ExecutionConfig(clock=clock)
    job = asyncio.create_task(run_job_async(generator_job(sink), config=config, timeout=500))
    await wait_until(lambda: len(sink.written) >= 100, "records reaching the sink", job)
    clock.advance(500)
    result = await asyncio.wait_for(job, 10)
    assert result.stopped_by == "timeout"
    assert sink.committed == sink.written
    assert sink.written == [i * 10 for i in range(len(sink.written))]
    assert sink_records_in(result) == len(sink.written)


@pytest.mark.asyncio
async def test_run_job_works_where_an_event_loop_already_runs() -> None:
    """As in a Jupyter notebook, whose cells run on the kernel's event loop."""
    sink = CollectSink()
    result = run_job(generator_job(sink), max_records=3)
    assert result.stopped_by == "max_records"
    assert sink.committed == [0, 10, 20]


class CellInterrupted(Exception):
    """What the notebook's stop button raises in the cell (KeyboardInterrupt would stop pytest)."""


@pytest.mark.asyncio
async def test_interrupting_run_job_where_a_loop_runs_cancels_the_job() -> None:
    """The interrupt reaches the thread that waits for the job; the job, on its own loop in a
    worker thread, is cancelled (its tasks close) before the interrupt is raised."""
    source = FedSplitsSource(1)

    class InterruptOnceRunning(FedSplitsSource):
        def create_reader(self, context: Any) -> Any:
            signal.setitimer(signal.ITIMER_REAL, 0.001)  # the interrupt, once the job runs
            return source.create_reader(context)

    def interrupt(signum: int, frame: Any) -> None:
        raise CellInterrupted

    def build(job: Any) -> None:
        job.from_source(InterruptOnceRunning(1)).sink_to(CollectSink())

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with pytest.raises(CellInterrupted):
            run_job(build, timeout="1h")
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert source.readers  # the job ran
    assert [t.name for t in threading.enumerate() if t.name == "run_job"] == []


def test_timeout_on_the_wall_clock_from_synchronous_code() -> None:
    sink = CollectSink()
    result = run_job(idle_job(sink), timeout="50ms")
    assert result.stopped_by == "timeout"
    assert sink.committed == []


@pytest.mark.asyncio
async def test_with_both_limits_the_first_one_reached_ends_the_job() -> None:
    sink = CollectSink()
    result = await run_job_async(generator_job(sink), max_records=5, timeout="1h")
    assert result.stopped_by == "max_records"
    assert sink.committed == [0, 10, 20, 30, 40]

    clock = ManualClock()
    sink = CollectSink()
    config = ExecutionConfig(clock=clock)
    job = asyncio.create_task(
        run_job_async(idle_job(sink), config=config, max_records=5, timeout="1s")
    )
    await wait_until(lambda: clock.pending >= 1, "the timeout scheduled on the job's clock", job)
    clock.advance(1000)
    result = await asyncio.wait_for(job, 10)
    assert result.stopped_by == "timeout"


def test_a_sink_with_its_own_operator_gets_exactly_n_records_flushed_at_the_end() -> None:
    """An ``AsyncSink`` brings its own operator (batches, requests in flight); the drain's
    ``finish()`` flushes its last batch before the final checkpoint."""
    written: list[Any] = []

    class Service(AsyncSinkWriter):
        def __init__(self, context: RuntimeContext) -> None:
            pass

        async def write(self, batch: list[Any]) -> None:
            written.extend(batch)

    sink = AsyncSink(Service, max_batch_size=4, max_batch_time="1h")
    result = run_job(generator_job(sink), max_records=10)
    assert result.stopped_by == "max_records"
    assert written == [i * 10 for i in range(10)]


def test_max_records_needs_the_sinks_in_this_process() -> None:
    with pytest.raises(ValueError, match="max_records counts the records at the sink operators"):
        asyncio.run(run_job_async(generator_job(CollectSink()), max_records=5, deployment=object()))


def test_a_job_that_ends_before_its_limits_returns_as_usual() -> None:
    sink = CollectSink()

    def build(job: Any) -> None:
        job.from_source(GeneratorSource(lambda i: i, count=3)).sink_to(sink).uid("sink")

    result = run_job(build, max_records=10, timeout="1h")
    assert result.stopped_by is None
    assert sink.committed == [0, 1, 2]


@pytest.mark.asyncio
async def test_after_a_failover_the_count_goes_on_from_the_restored_checkpoint() -> None:
    """Records the failed attempt wrote after the checkpoint were never committed: they count
    again when the restarted attempt replays them, so the committed output is still exactly N."""
    source, sink = ControlledSource("numbers"), CollectSink()
    failed: list[int] = []

    def fail_once_at_35(x: int) -> int:
        if x == 35 and not failed:
            failed.append(x)
            raise RuntimeError("the test fails the attempt once at 35")
        return x

    def build(job: Any) -> None:
        numbers = job.from_source(source, name="numbers").uid("numbers")
        numbers.map(fail_once_at_35, name="fail once").uid("fail").sink_to(sink).uid("sink")

    config = ExecutionConfig(restart_strategy=FixedDelayRestart(1, 0))
    master, job = await start_job_on_master(build, config, limits=RunLimits(max_records=45))
    source.push(*range(30))
    await wait_until(lambda: len(sink.written) == 30, "30 records in the sink", job)
    await take_checkpoint(master)
    assert sink.committed == list(range(30))
    source.push(*range(30, 35))
    await wait_until(lambda: len(sink.written) == 35, "5 more records in the sink", job)
    source.push(*range(35, 60))
    result = await asyncio.wait_for(job, 10)
    assert (result.attempts, result.stopped_by) == (2, "max_records")
    assert sink.written[:40] == [*range(35), *range(30, 35)]  # 30..34 again after the failover
    assert sink.committed == list(range(45))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"max_records": 0}, "max_records: expected a positive int"),
        ({"max_records": -3}, "max_records: expected a positive int"),
        ({"max_records": True}, "max_records: expected a positive int"),
        ({"max_records": "10"}, "max_records: expected a positive int"),
        ({"timeout": 0}, "timeout: must be longer than 0"),
        ({"timeout": "0s"}, "timeout: must be longer than 0"),
        ({"timeout": -5}, "timeout: must not be negative"),
        ({"timeout": "5"}, "timeout: invalid duration '5': a duration needs a unit"),
        ({"timeout": "soon"}, "timeout: invalid duration 'soon'"),
    ],
)
def test_bad_limits_are_refused_before_the_job_runs(
    arguments: dict[str, Any], message: str
) -> None:
    sink = CollectSink()
    with pytest.raises(ValueError, match=message):
        run_job(generator_job(sink), **arguments)
    with pytest.raises(ValueError, match=message):
        asyncio.run(run_job_async(generator_job(sink), **arguments))
    assert sink.written == []


def test_the_limited_sink_passes_every_operator_hook_on() -> None:
    """A hook the wrapper does not override would run StreamOperator's default instead of the
    sink's own (a lost flush or commit)."""
    hooks = {
        name
        for name, member in inspect.getmembers(StreamOperator, inspect.isfunction)
        if not name.startswith("_")
    }
    not_passed_on = {name for name in hooks if name not in vars(RecordLimitedSink)}
    assert not_passed_on == set()
