"""The checkpoint coordinator as scripted sequences of task reports and virtual time.

Each test is a literal list of steps (a report of a task, time passing, a trigger asked for, a task
ending unseen), numbered by index comments, fed one by one into ``CheckpointCoordinator.handle`` and
``tick`` with a virtual clock and scripted task handles; the expectations between steps say which
checkpoints are pending, completed and failed, and which commands each task was sent since the
previous expectation. No task runs, nothing sleeps: like ``tests/test_barriers.py`` for alignment.

Topologies are given as ``{vertex: (upstream vertices...)}``, one subtask per vertex whose only
operator has the vertex's name as uid.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from loop_helpers import ScriptedTaskHandle, VirtualClock

from actors.protocol import (
    AcknowledgeCheckpoint,
    DeclineCheckpoint,
    NotifyCheckpointAborted,
    NotifyCheckpointComplete,
    StopRequest,
    TaskCommand,
    TaskState,
    TaskStateChanged,
    TriggerCheckpoint,
)
from runtime import CheckpointConfig
from runtime.master.coordinator import (
    CheckpointCoordinator,
    CheckpointedOperator,
    CheckpointFailedError,
    CheckpointStatus,
)
from state.storage import CheckpointKind, CompletedCheckpoint

RUNNING = TaskState.RUNNING
FINISHING = TaskState.FINISHING
FINISHED = TaskState.FINISHED

# ------------------------------------------------------------------------------------------------
# the script language


@dataclass(frozen=True)
class Tick:
    """The clock advances by ``seconds``; the coordinator looks at its deadlines."""

    seconds: float


@dataclass(frozen=True)
class Trigger:
    """A checkpoint or savepoint asked for now (its future is kept by checkpoint id)."""

    kind: CheckpointKind = CheckpointKind.CHECKPOINT
    stop: StopRequest | None = None


@dataclass(frozen=True)
class Ack:
    task: str
    checkpoint_id: int
    finished: bool = False


@dataclass(frozen=True)
class Decline:
    task: str
    checkpoint_id: int
    ended: bool = False
    """The task declined because it had already ended when the trigger reached it."""


@dataclass(frozen=True)
class State:
    """The task's state report arrives (its handle learns the state at the same moment)."""

    task: str
    state: TaskState


@dataclass(frozen=True)
class EndsUnseen:
    """The task ends, but no report of it has arrived: commands to it can no longer be delivered,
    while its handle still says what it said before."""

    task: str


@dataclass(frozen=True)
class Reattach:
    """A new job attempt: every handle is replaced by one with ``attempt`` and state RUNNING."""

    attempt: int


@dataclass(frozen=True)
class StaleState:
    """A state report of attempt ``attempt`` of ``task`` arrives (late, from an old attempt)."""

    task: str
    attempt: int
    state: TaskState


_ANY: Any = object()


@dataclass(frozen=True)
class Expect:
    pending: tuple[int, ...] = ()
    completed: tuple[int, ...] = ()
    """Ids of the checkpoints (and stop-with-savepoints) completed so far, in order."""
    failed: tuple[int, ...] = ()
    """Ids of the checkpoints aborted so far, in order."""
    sent: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Commands each task was sent since the previous expectation; tasks absent got none."""
    consecutive_failures: int = 0
    failure: str | None = None
    """A substring of the failure that fails the job over, or None for no failure."""
    wakeup_in: Any = _ANY
    """When given: the seconds until the coordinator's next deadline (None: no deadline)."""


def describe(command: TaskCommand) -> str:
    if isinstance(command, TriggerCheckpoint):
        stop = "" if command.stop is None else f" stop(drain={command.stop.drain})"
        kind = "" if command.kind is CheckpointKind.CHECKPOINT else f" {command.kind.value}"
        return f"trigger {command.checkpoint_id}{kind}{stop}"
    if isinstance(command, NotifyCheckpointComplete):
        return f"complete {command.checkpoint_id}"
    if isinstance(command, NotifyCheckpointAborted):
        return f"abort {command.checkpoint_id}"
    raise AssertionError(command)


class Harness:
    def __init__(
        self,
        topology: dict[str, tuple[str, ...]],
        config: CheckpointConfig,
        states: dict[str, TaskState] | None = None,
    ) -> None:
        self.topology = topology
        self.clock = VirtualClock()
        self.coordinator = CheckpointCoordinator(
            config,
            None,
            {vertex: CheckpointedOperator(vertex, 1, 128) for vertex in topology},
            clock=self.clock,
        )
        self.results: dict[int, asyncio.Future[CompletedCheckpoint]] = {}
        self.tasks: dict[str, ScriptedTaskHandle] = {}
        self._attach(1, states or {})

    def _attach(self, attempt: int, states: dict[str, TaskState]) -> None:
        self.tasks = {}
        for vertex in self.topology:
            self.tasks[vertex] = ScriptedTaskHandle(
                vertex, state=states.get(vertex, RUNNING), attempt=attempt
            )
        for vertex, upstream in self.topology.items():
            self.tasks[vertex].upstream = tuple(self.tasks[u].task_id for u in upstream)
        self.coordinator.attach(list(self.tasks.values()))

    async def step(self, item: Any) -> None:
        coordinator = self.coordinator
        if isinstance(item, Tick):
            self.clock.advance(item.seconds)
            coordinator.tick()
        elif isinstance(item, Trigger):
            checkpoint_id = coordinator.next_id
            self.results[checkpoint_id] = coordinator.trigger(item.kind, stop=item.stop)
        elif isinstance(item, Ack):
            task = self.tasks[item.task].task_id
            await coordinator.handle(
                AcknowledgeCheckpoint(task, item.checkpoint_id, {}, item.finished, 1.5, 0.25)
            )
        elif isinstance(item, Decline):
            task = self.tasks[item.task].task_id
            reason = f"{item.task} declined checkpoint {item.checkpoint_id}"
            await coordinator.handle(
                DeclineCheckpoint(task, item.checkpoint_id, reason, task_ended=item.ended)
            )
        elif isinstance(item, State):
            handle = self.tasks[item.task]
            handle.state = item.state
            await coordinator.handle(TaskStateChanged(handle.task_id, item.state))
        elif isinstance(item, EndsUnseen):
            self.tasks[item.task].accepts = False
        elif isinstance(item, Reattach):
            self._attach(item.attempt, {})
        elif isinstance(item, StaleState):
            old = ScriptedTaskHandle(item.task, attempt=item.attempt).task_id
            await coordinator.handle(TaskStateChanged(old, item.state))
        else:
            raise AssertionError(item)

    def check(self, index: int, expected: Expect) -> None:
        coordinator = self.coordinator
        where = f"after step {index}"
        assert tuple(sorted(coordinator.pending)) == expected.pending, where
        assert tuple(coordinator.completed_ids) == expected.completed, where
        failed = tuple(
            s.checkpoint_id for s in coordinator.history if s.status is CheckpointStatus.FAILED
        )
        assert failed == expected.failed, where
        sent = {
            vertex: tuple(describe(c) for c in task.take_sent())
            for vertex, task in self.tasks.items()
        }
        assert {v: c for v, c in sent.items() if c} == expected.sent, where
        assert coordinator.consecutive_failures == expected.consecutive_failures, where
        if expected.failure is None:
            assert coordinator.failure is None, (where, coordinator.failure)
        else:
            assert expected.failure in str(coordinator.failure), (where, coordinator.failure)
        if expected.wakeup_in is not _ANY:
            assert coordinator.next_wakeup() == expected.wakeup_in, where


async def run_script(
    harness: Harness, sequence: list[Any], expectations: dict[int, Expect]
) -> Harness:
    assert max(expectations) < len(sequence)
    for index, item in enumerate(sequence):
        await harness.step(item)
        if index in expectations:
            harness.check(index, expectations[index])
    return harness


def failure_of(harness: Harness, checkpoint_id: int) -> str:
    stats = next(s for s in harness.coordinator.history if s.checkpoint_id == checkpoint_id)
    assert stats.failure is not None
    return stats.failure


PIPELINE = {"src": (), "sink": ("src",)}
BOTH = ("src", "sink")


def to_all(*commands: str, tasks: tuple[str, ...] = BOTH) -> dict[str, tuple[str, ...]]:
    return {task: commands for task in tasks}


# ------------------------------------------------------------------------------------------------
# triggering by time


@pytest.mark.asyncio
async def test_periodic_checkpoints_follow_the_virtual_clock() -> None:
    sequence = [
        Tick(0.5),  # 0: half an interval: nothing
        Tick(0.5),  # 1: the interval: trigger 1, to the source only
        Ack("src", 1),  # 2
        Ack("sink", 1),  # 3: complete, every task is notified
        Tick(0.75),  # 4
        Tick(0.25),  # 5: the next interval: trigger 2
    ]
    await run_script(
        Harness(PIPELINE, CheckpointConfig(interval_s=1.0)),
        sequence,
        {
            0: Expect(wakeup_in=0.5),
            1: Expect(pending=(1,), sent={"src": ("trigger 1",)}),
            2: Expect(pending=(1,)),
            3: Expect(completed=(1,), sent=to_all("complete 1")),
            4: Expect(completed=(1,)),
            5: Expect(pending=(2,), completed=(1,), sent={"src": ("trigger 2",)}),
        },
    )


@pytest.mark.asyncio
async def test_the_minimum_pause_skips_periodic_triggers_after_a_completion() -> None:
    sequence = [
        Tick(1),  # 0: trigger 1
        Tick(0.5),  # 1
        Ack("src", 1),  # 2
        Ack("sink", 1),  # 3: completed at +1.5s
        Tick(0.5),  # 4: the interval: only 0.5s since the completion
        Tick(1),  # 5: the interval: 1.5s since
        Tick(1),  # 6: the interval: 2.5s since: trigger 2
    ]
    await run_script(
        Harness(PIPELINE, CheckpointConfig(interval_s=1.0, min_pause_s=2.5)),
        sequence,
        {
            0: Expect(pending=(1,), sent={"src": ("trigger 1",)}),
            3: Expect(completed=(1,), sent=to_all("complete 1")),
            4: Expect(completed=(1,)),
            5: Expect(completed=(1,)),
            6: Expect(pending=(2,), completed=(1,), sent={"src": ("trigger 2",)}),
        },
    )


@pytest.mark.asyncio
async def test_no_more_than_max_concurrent_checkpoints_are_pending() -> None:
    sequence = [
        Tick(1),  # 0: trigger 1
        Tick(1),  # 1: trigger 2
        Tick(1),  # 2: two pending: none
        Ack("src", 1),  # 3
        Ack("sink", 1),  # 4: 1 completes; 2 is newer, not subsumed
        Tick(1),  # 5: trigger 3
    ]
    await run_script(
        Harness(PIPELINE, CheckpointConfig(interval_s=1.0, max_concurrent=2)),
        sequence,
        {
            0: Expect(pending=(1,), sent={"src": ("trigger 1",)}),
            1: Expect(pending=(1, 2), sent={"src": ("trigger 2",)}),
            2: Expect(pending=(1, 2)),
            4: Expect(pending=(2,), completed=(1,), sent=to_all("complete 1")),
            5: Expect(pending=(2, 3), completed=(1,), sent={"src": ("trigger 3",)}),
        },
    )


@pytest.mark.asyncio
async def test_a_checkpoint_expires_at_its_timeout() -> None:
    sequence = [
        Trigger(),  # 0
        Tick(4.5),  # 1
        Ack("src", 1),  # 2
        Tick(0.5),  # 3: the timeout: aborted, every task notified; one failure tolerated
        Ack("sink", 1),  # 4: too late, ignored
    ]
    harness = await run_script(
        Harness(PIPELINE, CheckpointConfig(timeout_s=5.0, tolerable_failures=1)),
        sequence,
        {
            0: Expect(pending=(1,), sent={"src": ("trigger 1",)}, wakeup_in=5.0),
            1: Expect(pending=(1,)),
            3: Expect(failed=(1,), sent=to_all("abort 1"), consecutive_failures=1, wakeup_in=None),
            4: Expect(failed=(1,), consecutive_failures=1),
        },
    )
    assert "expired after the checkpoint timeout of 5s" in failure_of(harness, 1)
    with pytest.raises(CheckpointFailedError, match="checkpoint 1 failed: expired"):
        await harness.results[1]


# ------------------------------------------------------------------------------------------------
# declines and failures


@pytest.mark.asyncio
async def test_declines_abort_and_more_than_the_tolerated_failures_fail_the_job() -> None:
    sequence = [
        Trigger(),  # 0
        Decline("src", 1),  # 1: aborted, counted (1 of 1 tolerated)
        Trigger(),  # 2
        Ack("src", 2),  # 3
        Ack("sink", 2),  # 4: a completion resets the count
        Trigger(),  # 5
        Decline("sink", 3),  # 6: counted (1 of 1)
        Trigger(),  # 7
        Decline("src", 4),  # 8: a second consecutive failure: the job fails over
    ]
    harness = await run_script(
        Harness(PIPELINE, CheckpointConfig(tolerable_failures=1)),
        sequence,
        {
            1: Expect(
                failed=(1,),
                sent={"src": ("trigger 1", "abort 1"), "sink": ("abort 1",)},
                consecutive_failures=1,
            ),
            4: Expect(
                completed=(2,),
                failed=(1,),
                sent={"src": ("trigger 2", "complete 2"), "sink": ("complete 2",)},
            ),
            6: Expect(
                completed=(2,),
                failed=(1, 3),
                sent={"src": ("trigger 3", "abort 3"), "sink": ("abort 3",)},
                consecutive_failures=1,
            ),
            8: Expect(
                completed=(2,),
                failed=(1, 3, 4),
                sent={"src": ("trigger 4", "abort 4"), "sink": ("abort 4",)},
                consecutive_failures=2,
                failure="2 consecutive checkpoint failures (tolerated: 1); last: checkpoint 4",
            ),
        },
    )
    assert failure_of(harness, 4) == "src declined checkpoint 4"


@pytest.mark.asyncio
async def test_an_acknowledged_checkpoint_records_who_finished_and_notifies_the_living() -> None:
    sequence = [
        State("src", FINISHING),  # 0
        Trigger(),  # 1
        Ack("src", 1, finished=True),  # 2
        State("src", FINISHED),  # 3: after its ack: no harm
        Ack("sink", 1),  # 4: complete; the finished source is not notified
    ]
    harness = await run_script(
        Harness(PIPELINE, CheckpointConfig()),
        sequence,
        {
            1: Expect(pending=(1,), sent={"src": ("trigger 1",)}),
            3: Expect(pending=(1,)),
            4: Expect(completed=(1,), sent={"sink": ("complete 1",)}),
        },
    )
    completed = harness.results[1].result()
    assert completed.operators["src"].fully_finished
    assert not completed.operators["sink"].fully_finished
    [stats] = harness.coordinator.history
    assert stats.alignment_ms == {"src/0": 1.5, "sink/0": 1.5}
    assert stats.snapshot_ms == {"src/0": 0.25, "sink/0": 0.25}


@pytest.mark.asyncio
async def test_a_completed_checkpoint_subsumes_older_pending_checkpoints_not_savepoints() -> None:
    sequence = [
        Trigger(),  # 0: checkpoint 1
        Trigger(CheckpointKind.SAVEPOINT),  # 1: savepoint 2
        Trigger(),  # 2: checkpoint 3
        Ack("src", 3),  # 3
        Ack("sink", 3),  # 4: 3 completes: 1 is subsumed (not a failure), savepoint 2 stays
        Ack("src", 2),  # 5
        Ack("sink", 2),  # 6: an intermediate savepoint completes without notifying the tasks
    ]
    harness = await run_script(
        Harness(PIPELINE, CheckpointConfig(max_concurrent=3, tolerable_failures=0)),
        sequence,
        {
            2: Expect(
                pending=(1, 2, 3),
                sent={"src": ("trigger 1", "trigger 2 savepoint", "trigger 3")},
            ),
            4: Expect(
                pending=(2,), completed=(3,), failed=(1,), sent=to_all("abort 1", "complete 3")
            ),
            6: Expect(completed=(3,), failed=(1,)),
        },
    )
    assert failure_of(harness, 1) == "subsumed by checkpoint 3"
    assert harness.results[2].result().kind is CheckpointKind.SAVEPOINT


# ------------------------------------------------------------------------------------------------
# tasks that finish (FLIP-147)


@pytest.mark.asyncio
async def test_a_task_finishing_before_its_ack_aborts_without_failure() -> None:
    sequence = [
        Trigger(),  # 0
        State("src", FINISHED),  # 1: it can never acknowledge: aborted, not a failure
        Trigger(),  # 2: the sink's upstream finished: it is triggered itself, and alone awaited
        Ack("sink", 2),  # 3
    ]
    harness = await run_script(
        Harness(PIPELINE, CheckpointConfig(tolerable_failures=0)),
        sequence,
        {
            1: Expect(failed=(1,), sent={"src": ("trigger 1",), "sink": ("abort 1",)}),
            2: Expect(pending=(2,), failed=(1,), sent={"sink": ("trigger 2",)}),
            3: Expect(completed=(2,), failed=(1,), sent={"sink": ("complete 2",)}),
        },
    )
    assert "task src (1) finished before acknowledging" in failure_of(harness, 1)
    assert harness.results[2].result().operators["src"].fully_finished


@pytest.mark.asyncio
async def test_a_final_checkpoint_is_triggered_once_every_living_task_is_finishing() -> None:
    sequence = [
        Tick(1),  # 0: periodic checkpoint 1
        Ack("src", 1),  # 1
        Ack("sink", 1),  # 2
        State("src", FINISHING),  # 3: the sink still runs: no final checkpoint
        Tick(0),  # 4
        State("sink", FINISHING),  # 5
        Tick(0),  # 6: everyone waits for it: at once, despite interval and minimum pause
        Ack("src", 2, finished=True),  # 7
        Ack("sink", 2, finished=True),  # 8
        Tick(0),  # 9: covered: no further one
        State("src", FINISHED),  # 10
        State("sink", FINISHED),  # 11
        Tick(0),  # 12
    ]
    await run_script(
        Harness(PIPELINE, CheckpointConfig(interval_s=1.0, min_pause_s=60.0)),
        sequence,
        {
            2: Expect(
                completed=(1,), sent={"src": ("trigger 1", "complete 1"), "sink": ("complete 1",)}
            ),
            4: Expect(completed=(1,)),
            6: Expect(pending=(2,), completed=(1,), sent={"src": ("trigger 2",)}),
            8: Expect(completed=(1, 2), sent=to_all("complete 2")),
            9: Expect(completed=(1, 2)),
            12: Expect(completed=(1, 2)),
        },
    )


@pytest.mark.asyncio
async def test_triggers_go_to_the_tasks_whose_upstream_all_finished() -> None:
    topology = {"left": (), "right": (), "join": ("left", "right"), "sink": ("join",)}
    living = ("right", "join", "sink")
    sequence = [
        State("left", FINISHED),  # 0
        Trigger(),  # 1: the join still has a running input: only the right source
        Ack("right", 1),  # 2
        Ack("join", 1),  # 3
        Ack("sink", 1),  # 4
        State("right", FINISHED),  # 5
        Trigger(),  # 6: both inputs finished: the join is triggered, the sink is not
        Ack("join", 2),  # 7
        Ack("sink", 2),  # 8
    ]
    harness = await run_script(
        Harness(topology, CheckpointConfig()),
        sequence,
        {
            1: Expect(pending=(1,), sent={"right": ("trigger 1",)}),
            4: Expect(completed=(1,), sent=to_all("complete 1", tasks=living)),
            6: Expect(pending=(2,), completed=(1,), sent={"join": ("trigger 2",)}),
            8: Expect(completed=(1, 2), sent=to_all("complete 2", tasks=("join", "sink"))),
        },
    )
    second = harness.results[2].result()
    assert second.operators["left"].fully_finished
    assert second.operators["right"].fully_finished
    assert not second.operators["join"].fully_finished


@pytest.mark.asyncio
async def test_a_stop_with_savepoint_suppresses_periodic_checkpoints() -> None:
    stop = StopRequest(drain=False)
    sequence = [
        Tick(1),  # 0: periodic checkpoint 1
        Ack("src", 1),  # 1
        Ack("sink", 1),  # 2
        Trigger(CheckpointKind.SAVEPOINT, stop),  # 3: stop with savepoint 2
        State("src", FINISHING),  # 4: the source stopped for it
        Tick(5),  # 5: no periodic checkpoint any more
        State("sink", FINISHING),  # 6
        Ack("src", 2),  # 7
        Ack("sink", 2),  # 8: it completes and commits (notified like a checkpoint)
        Tick(5),  # 9: the savepoint covers the finishing tasks: no final checkpoint either
    ]
    harness = await run_script(
        Harness(PIPELINE, CheckpointConfig(interval_s=1.0)),
        sequence,
        {
            2: Expect(
                completed=(1,), sent={"src": ("trigger 1", "complete 1"), "sink": ("complete 1",)}
            ),
            3: Expect(
                pending=(2,),
                completed=(1,),
                sent={"src": ("trigger 2 savepoint stop(drain=False)",)},
                wakeup_in=600.0,
            ),
            5: Expect(pending=(2,), completed=(1,)),
            8: Expect(completed=(1, 2), sent=to_all("complete 2")),
            9: Expect(completed=(1, 2), wakeup_in=None),
        },
    )
    assert harness.results[2].result().kind is CheckpointKind.SAVEPOINT


# ------------------------------------------------------------------------------------------------
# state the master learns late


@pytest.mark.asyncio
async def test_a_trigger_that_cannot_be_delivered_aborts_without_failure() -> None:
    """In this process: the task's mailbox closed, its FINISHED report is still queued."""
    sequence = [
        EndsUnseen("src"),  # 0: the handle still says RUNNING
        Trigger(),  # 1: undeliverable: aborted at once, not counted
        State("src", FINISHED),  # 2: the report arrives
        Trigger(),  # 3: the new set of targets
        Ack("sink", 2),  # 4
    ]
    harness = await run_script(
        Harness(PIPELINE, CheckpointConfig(tolerable_failures=0)),
        sequence,
        {
            1: Expect(failed=(1,), sent={"sink": ("abort 1",)}),
            2: Expect(failed=(1,)),
            3: Expect(pending=(2,), failed=(1,), sent={"sink": ("trigger 2",)}),
            4: Expect(completed=(2,), failed=(1,), sent={"sink": ("complete 2",)}),
        },
    )
    assert "task src (1) finished while being triggered (state running)" in failure_of(harness, 1)


@pytest.mark.asyncio
async def test_a_trigger_to_a_task_believed_running_that_already_finished() -> None:
    """In another process: the trigger is sent, but the task had finished; its FINISHED report,
    sent before, arrives after the trigger went out, and ends the checkpoint without failure."""
    sequence = [
        Trigger(),  # 0: the handle believes the source RUNNING
        State("src", FINISHED),  # 1: the report that was on its way: aborted, not counted
        Decline("src", 1, ended=True),  # 2: its TaskManager's answer to the trigger: ignored
        Trigger(),  # 3
        Ack("sink", 2),  # 4
    ]
    harness = await run_script(
        Harness(PIPELINE, CheckpointConfig(tolerable_failures=0)),
        sequence,
        {
            0: Expect(pending=(1,), sent={"src": ("trigger 1",)}),
            1: Expect(failed=(1,), sent={"sink": ("abort 1",)}),
            2: Expect(failed=(1,)),
            3: Expect(pending=(2,), failed=(1,), sent={"sink": ("trigger 2",)}),
            4: Expect(completed=(2,), failed=(1,), sent={"sink": ("complete 2",)}),
        },
    )
    assert "finished before acknowledging" in failure_of(harness, 1)


@pytest.mark.asyncio
async def test_a_decline_by_a_task_that_had_ended_aborts_without_failure() -> None:
    """The TaskManager answers a trigger for a task that ended with a decline before (or instead
    of) the task's report reaching the master."""
    sequence = [
        Trigger(),  # 0
        Decline("src", 1, ended=True),  # 1: aborted, not counted
        State("src", FINISHED),  # 2
        Trigger(),  # 3
    ]
    harness = await run_script(
        Harness(PIPELINE, CheckpointConfig(tolerable_failures=0)),
        sequence,
        {
            1: Expect(failed=(1,), sent={"src": ("trigger 1", "abort 1"), "sink": ("abort 1",)}),
            2: Expect(failed=(1,)),
            3: Expect(pending=(2,), failed=(1,), sent={"sink": ("trigger 2",)}),
        },
    )
    assert failure_of(harness, 1) == "src declined checkpoint 1"


@pytest.mark.asyncio
async def test_reports_of_an_earlier_attempt_are_ignored() -> None:
    sequence = [
        Trigger(),  # 0: attempt 1
        Reattach(2),  # 1: the attempt ended: 1 aborts
        Trigger(),  # 2: attempt 2
        StaleState("src", 1, FINISHED),  # 3: late, from attempt 1: checkpoint 2 stays
        Ack("src", 2),  # 4
        Ack("sink", 2),  # 5
    ]
    await run_script(
        Harness(PIPELINE, CheckpointConfig(tolerable_failures=5)),
        sequence,
        {
            2: Expect(
                pending=(2,), failed=(1,), sent={"src": ("trigger 2",)}, consecutive_failures=1
            ),
            3: Expect(pending=(2,), failed=(1,), consecutive_failures=1),
            5: Expect(completed=(2,), failed=(1,), sent=to_all("complete 2")),
        },
    )
