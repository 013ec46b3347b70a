"""Barrier alignment as scripted sequences, in the style of Flink's barrier handler tests.

Each test is a literal list of steps (what one input channel delivered next, in arrival order),
numbered by index comments, fed one by one into ``actors.barriers.CheckpointBarrierHandler``; the
expectations between steps say which channels are blocked and what was triggered or aborted so far.
No event loop: the handler is a pure state machine wired to a recording fake gate.

A ``Data`` step asserts that its channel is not blocked at that moment: a real gate never hands out
data of a blocked channel, so a script that delivers such data would not describe a real run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from actors.barriers import (
    AbortCheckpoint,
    AlignmentState,
    CheckpointBarrierHandler,
    CheckpointingMode,
    TriggerCheckpoint,
)
from actors.events import CheckpointBarrier, EndOfPartition, Watermark
from actors.mailbox import Wakeup
from actors.network import InputGate, ResultSubpartition

EXACTLY_ONCE = CheckpointingMode.EXACTLY_ONCE
AT_LEAST_ONCE = CheckpointingMode.AT_LEAST_ONCE

# ------------------------------------------------------------------------------------------------
# the script language


@dataclass(frozen=True)
class Data:
    channel: int


@dataclass(frozen=True)
class Barrier:
    channel: int
    checkpoint_id: int


@dataclass(frozen=True)
class Cancel:
    channel: int
    checkpoint_id: int


@dataclass(frozen=True)
class End:
    """EndOfPartition on ``channel``."""

    channel: int


@dataclass(frozen=True)
class CoordinatorAbort:
    """The coordinator aborted the checkpoint being aligned (``abort_pending``)."""


@dataclass(frozen=True)
class Tick:
    """The clock advances by ``ms``."""

    ms: float


@dataclass(frozen=True)
class Expect:
    blocked: frozenset[int] = frozenset()
    triggered: tuple[int, ...] = ()
    """Ids of the checkpoints triggered so far, in order."""
    aborted: tuple[int, ...] = ()
    """Ids of every abort action so far (each one is forwarded as a cancel marker), in order."""
    pending: int | None = None


def expect(
    blocked: set[int] | frozenset[int] = frozenset(),
    triggered: tuple[int, ...] = (),
    aborted: tuple[int, ...] = (),
    pending: int | None = None,
) -> Expect:
    return Expect(frozenset(blocked), triggered, aborted, pending)


@dataclass
class Harness:
    num_channels: int
    mode: CheckpointingMode
    now: float = 1000.0
    blocked: set[int] = field(default_factory=set)
    unblock_calls: int = 0
    triggered: list[TriggerCheckpoint] = field(default_factory=list)
    aborted: list[AbortCheckpoint] = field(default_factory=list)
    data_read: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.handler = CheckpointBarrierHandler(
            self.num_channels, self.mode, self._block, self._unblock_all, lambda: self.now
        )

    def _block(self, channel: int) -> None:
        assert channel not in self.blocked, f"channel {channel} blocked twice"
        self.blocked.add(channel)

    def _unblock_all(self) -> None:
        self.unblock_calls += 1
        self.blocked.clear()

    def step(self, item: Any) -> None:
        handler = self.handler
        if isinstance(item, Data):
            assert item.channel not in self.blocked, (
                f"data read from blocked channel {item.channel}"
            )
            self.data_read.append(item.channel)
            return
        if isinstance(item, Tick):
            self.now += item.ms
            return
        if isinstance(item, Barrier):
            actions = handler.on_barrier(item.channel, CheckpointBarrier(item.checkpoint_id, 0))
        elif isinstance(item, Cancel):
            actions = handler.on_cancel_marker(item.checkpoint_id)
        elif isinstance(item, End):
            actions = handler.on_end_of_partition(item.channel)
        elif isinstance(item, CoordinatorAbort):
            actions = handler.abort_pending("aborted by the coordinator")
        else:
            raise AssertionError(item)
        for action in actions:
            if isinstance(action, TriggerCheckpoint):
                self.triggered.append(action)
            else:
                assert isinstance(action, AbortCheckpoint)
                self.aborted.append(action)

    def check(self, index: int, expected: Expect) -> None:
        handler = self.handler
        where = f"after step {index}"
        assert frozenset(self.blocked) == expected.blocked, where
        assert handler.blocked_channels == expected.blocked, where
        assert tuple(t.barrier.checkpoint_id for t in self.triggered) == expected.triggered, where
        assert tuple(a.checkpoint_id for a in self.aborted) == expected.aborted, where
        assert handler.triggered_count == len(expected.triggered), where
        pending = handler.pending.checkpoint_id if handler.pending is not None else None
        assert pending == expected.pending, where
        state = (
            AlignmentState.COLLECTING_BARRIERS
            if expected.pending is not None
            else AlignmentState.WAITING_FOR_FIRST_BARRIER
        )
        assert handler.state is state, where


def run_script(harness: Harness, sequence: list[Any], expectations: dict[int, Expect]) -> Harness:
    assert max(expectations) < len(sequence)
    for index, item in enumerate(sequence):
        harness.step(item)
        if index in expectations:
            harness.check(index, expectations[index])
    return harness


# ------------------------------------------------------------------------------------------------
# exactly-once


def test_exactly_once_blocks_channels_that_delivered_the_barrier_until_all_did() -> None:
    sequence = [
        Data(0),  # 0
        Data(1),  # 1
        Barrier(0, 1),  # 2: channel 0 blocked
        Data(1),  # 3: channel 1 still flows
        Data(2),  # 4: channel 2 still flows
        Tick(5),  # 5
        Barrier(2, 1),  # 6: channels 0 and 2 blocked
        Data(1),  # 7
        Tick(2),  # 8
        Barrier(1, 1),  # 9: the last live channel: trigger, unblock everything
        Data(0),  # 10: all channels flow again
        Data(2),  # 11
        Data(1),  # 12
    ]
    harness = run_script(
        Harness(3, EXACTLY_ONCE),
        sequence,
        {
            1: expect(),
            2: expect(blocked={0}, pending=1),
            4: expect(blocked={0}, pending=1),
            6: expect(blocked={0, 2}, pending=1),
            7: expect(blocked={0, 2}, pending=1),
            9: expect(triggered=(1,)),
            12: expect(triggered=(1,)),
        },
    )
    assert harness.triggered[0].alignment_ms == 7.0
    assert harness.handler.aborted_count == 0
    assert harness.handler.latest_handled_id == 1


def test_exactly_once_consecutive_checkpoints_each_align_separately() -> None:
    sequence = [
        Barrier(1, 1),  # 0
        Barrier(0, 1),  # 1: trigger 1
        Data(0),  # 2
        Barrier(0, 2),  # 3
        Data(1),  # 4
        Barrier(1, 2),  # 5: trigger 2
        Barrier(1, 3),  # 6
        Barrier(0, 3),  # 7: trigger 3
    ]
    run_script(
        Harness(2, EXACTLY_ONCE),
        sequence,
        {
            0: expect(blocked={1}, pending=1),
            1: expect(triggered=(1,)),
            3: expect(blocked={0}, triggered=(1,), pending=2),
            5: expect(triggered=(1, 2)),
            6: expect(blocked={1}, triggered=(1, 2), pending=3),
            7: expect(triggered=(1, 2, 3)),
        },
    )


def test_single_channel_triggers_on_its_barrier_without_blocking() -> None:
    sequence = [
        Data(0),  # 0
        Barrier(0, 1),  # 1: the only channel: trigger at once
        Data(0),  # 2
    ]
    harness = run_script(Harness(1, EXACTLY_ONCE), sequence, {1: expect(triggered=(1,))})
    assert harness.triggered[0].alignment_ms == 0.0


# ------------------------------------------------------------------------------------------------
# at-least-once


def test_at_least_once_never_blocks_and_triggers_when_all_channels_delivered() -> None:
    sequence = [
        Barrier(0, 1),  # 0: nothing blocked
        Data(0),  # 1: channel 0 keeps flowing (records after the barrier may enter the snapshot)
        Data(0),  # 2
        Barrier(2, 1),  # 3
        Data(2),  # 4
        Data(1),  # 5
        Barrier(1, 1),  # 6: trigger
        Barrier(0, 2),  # 7
        Data(0),  # 8
        Barrier(1, 2),  # 9
        Barrier(2, 2),  # 10: trigger
    ]
    harness = run_script(
        Harness(3, AT_LEAST_ONCE),
        sequence,
        {
            0: expect(pending=1),
            3: expect(pending=1),
            6: expect(triggered=(1,)),
            7: expect(triggered=(1,), pending=2),
            10: expect(triggered=(1, 2)),
        },
    )
    assert harness.handler.aborted_count == 0


def test_at_least_once_newer_barrier_subsumes_without_blocking() -> None:
    sequence = [
        Barrier(0, 1),  # 0
        Barrier(0, 2),  # 1: channel 0 ran ahead (not blocked): 1 is subsumed by 2
        Barrier(1, 1),  # 2: late, ignored
        Barrier(1, 2),  # 3: trigger 2
    ]
    run_script(
        Harness(2, AT_LEAST_ONCE),
        sequence,
        {
            0: expect(pending=1),
            1: expect(aborted=(1,), pending=2),
            2: expect(aborted=(1,), pending=2),
            3: expect(aborted=(1,), triggered=(2,)),
        },
    )


# ------------------------------------------------------------------------------------------------
# subsumption and late barriers


def test_newer_barrier_aborts_the_alignment_in_progress_and_starts_its_own() -> None:
    sequence = [
        Barrier(0, 1),  # 0: channel 0 blocked for 1
        Barrier(1, 2),  # 1: 2 subsumes 1: abort 1, release channel 0, block channel 1 for 2
        Data(0),  # 2: channel 0 flows again (its data up to barrier 2 belongs to checkpoint 2)
        Data(2),  # 3
        Barrier(2, 1),  # 4: late barrier of the aborted 1: ignored, channel 2 not blocked
        Data(2),  # 5
        Barrier(0, 2),  # 6
        Barrier(2, 2),  # 7: trigger 2
    ]
    harness = run_script(
        Harness(3, EXACTLY_ONCE),
        sequence,
        {
            0: expect(blocked={0}, pending=1),
            1: expect(blocked={1}, aborted=(1,), pending=2),
            4: expect(blocked={1}, aborted=(1,), pending=2),
            6: expect(blocked={0, 1}, aborted=(1,), pending=2),
            7: expect(aborted=(1,), triggered=(2,)),
        },
    )
    assert "subsumed by checkpoint 2" in harness.aborted[0].reason
    assert harness.handler.aborted_count == 1


def test_barrier_of_an_older_checkpoint_does_not_count_for_the_newer_alignment() -> None:
    """Checkpoint 2 started on channel 0 before this task saw anything of checkpoint 1; a barrier
    1 arriving afterwards belongs to a subsumed checkpoint and must not stand in for barrier 2."""
    sequence = [
        Barrier(0, 2),  # 0: channel 0 blocked for 2
        Barrier(1, 1),  # 1: older than the alignment in progress: ignored, channel 1 keeps flowing
        Data(1),  # 2
        Barrier(1, 2),  # 3: trigger 2
    ]
    run_script(
        Harness(2, EXACTLY_ONCE),
        sequence,
        {
            0: expect(blocked={0}, pending=2),
            1: expect(blocked={0}, pending=2),
            3: expect(triggered=(2,)),
        },
    )


def test_barriers_of_a_triggered_checkpoint_arriving_late_are_ignored() -> None:
    sequence = [
        Barrier(0, 1),  # 0
        End(2),  # 1: channel 2 ends, so it no longer counts
        Barrier(1, 1),  # 2: trigger 1
        Barrier(0, 1),  # 3: duplicate/late barrier 1: ignored, no blocking, no second trigger
        Data(0),  # 4
    ]
    run_script(
        Harness(3, EXACTLY_ONCE),
        sequence,
        {
            0: expect(blocked={0}, pending=1),
            1: expect(blocked={0}, pending=1),
            2: expect(triggered=(1,)),
            3: expect(triggered=(1,)),
        },
    )


# ------------------------------------------------------------------------------------------------
# cancel markers and aborts


def test_cancel_marker_aborts_the_alignment_unblocks_and_is_forwarded_once() -> None:
    sequence = [
        Barrier(0, 3),  # 0
        Barrier(1, 3),  # 1: channels 0 and 1 blocked
        Cancel(2, 3),  # 2: upstream of channel 2 declined 3: abort, unblock, forward one marker
        Data(0),  # 3
        Data(1),  # 4
        Cancel(3, 3),  # 5: the same cancel through another channel: nothing more
        Barrier(2, 3),  # 6: a barrier of the aborted checkpoint: ignored
        Data(2),  # 7
        Barrier(0, 4),  # 8: the next checkpoint aligns normally
        Barrier(1, 4),  # 9
        Barrier(2, 4),  # 10
        Barrier(3, 4),  # 11: trigger 4
    ]
    harness = run_script(
        Harness(4, EXACTLY_ONCE),
        sequence,
        {
            1: expect(blocked={0, 1}, pending=3),
            2: expect(aborted=(3,)),
            5: expect(aborted=(3,)),
            6: expect(aborted=(3,)),
            10: expect(blocked={0, 1, 2}, aborted=(3,), pending=4),
            11: expect(aborted=(3,), triggered=(4,)),
        },
    )
    assert harness.handler.aborted_count == 1
    assert harness.aborted[0].reason == "cancelled upstream"


def test_cancel_marker_without_alignment_in_progress_is_forwarded_once() -> None:
    sequence = [
        Cancel(0, 5),  # 0: nothing was being aligned: forward the marker
        Cancel(1, 5),  # 1: forwarded already
        Barrier(1, 5),  # 2: late barrier of 5: ignored
        Data(1),  # 3
    ]
    run_script(
        Harness(2, EXACTLY_ONCE),
        sequence,
        {0: expect(aborted=(5,)), 1: expect(aborted=(5,)), 2: expect(aborted=(5,))},
    )


def test_cancel_marker_of_a_newer_checkpoint_aborts_the_older_alignment_too() -> None:
    sequence = [
        Barrier(0, 1),  # 0
        Cancel(1, 2),  # 1: abort 1 (subsumed) and 2 (cancelled), unblock
        Data(0),  # 2
        Barrier(1, 1),  # 3: late
        Barrier(0, 2),  # 4: late
    ]
    run_script(
        Harness(2, EXACTLY_ONCE),
        sequence,
        {
            0: expect(blocked={0}, pending=1),
            1: expect(aborted=(1, 2)),
            4: expect(aborted=(1, 2)),
        },
    )


def test_cancel_marker_of_an_older_checkpoint_leaves_the_alignment_alone() -> None:
    sequence = [
        Barrier(0, 2),  # 0
        Cancel(1, 1),  # 1: 1 is older than the alignment of 2: ignored, channel 0 stays blocked
        Barrier(1, 2),  # 2: trigger 2
    ]
    run_script(
        Harness(2, EXACTLY_ONCE),
        sequence,
        {
            0: expect(blocked={0}, pending=2),
            1: expect(blocked={0}, pending=2),
            2: expect(triggered=(2,)),
        },
    )


def test_coordinator_abort_releases_blocked_channels() -> None:
    sequence = [
        Barrier(0, 1),  # 0
        Barrier(1, 1),  # 1
        CoordinatorAbort(),  # 2: the checkpoint timed out elsewhere: abort, unblock
        Data(0),  # 3
        Barrier(2, 1),  # 4: late
        CoordinatorAbort(),  # 5: nothing pending: no action
        Barrier(0, 2),  # 6
        Barrier(1, 2),  # 7
        Barrier(2, 2),  # 8: trigger 2
    ]
    run_script(
        Harness(3, EXACTLY_ONCE),
        sequence,
        {
            1: expect(blocked={0, 1}, pending=1),
            2: expect(aborted=(1,)),
            4: expect(aborted=(1,)),
            5: expect(aborted=(1,)),
            8: expect(aborted=(1,), triggered=(2,)),
        },
    )


# ------------------------------------------------------------------------------------------------
# end of partition


def test_end_of_partition_on_the_last_missing_channel_completes_the_alignment() -> None:
    sequence = [
        Barrier(0, 1),  # 0
        Barrier(1, 1),  # 1: channels 0 and 1 blocked; only channel 2 missing
        Data(2),  # 2
        End(2),  # 3: channel 2 ended: alignment complete, trigger 1
        Data(0),  # 4
        Barrier(1, 2),  # 5: the ended channel no longer counts for the next checkpoint
        Barrier(0, 2),  # 6: trigger 2
        End(0),  # 7
        Barrier(1, 3),  # 8: the only live channel left: trigger at once
    ]
    run_script(
        Harness(3, EXACTLY_ONCE),
        sequence,
        {
            1: expect(blocked={0, 1}, pending=1),
            3: expect(triggered=(1,)),
            5: expect(blocked={1}, triggered=(1,), pending=2),
            6: expect(triggered=(1, 2)),
            8: expect(triggered=(1, 2, 3)),
        },
    )


def test_end_of_partition_without_alignment_triggers_nothing() -> None:
    sequence = [
        End(0),  # 0
        Data(1),  # 1
        End(1),  # 2
    ]
    harness = run_script(Harness(2, EXACTLY_ONCE), sequence, {0: expect(), 2: expect()})
    assert harness.handler.live_channels == set()


# ------------------------------------------------------------------------------------------------
# wired to a real input gate


def test_blocked_channel_of_a_real_gate_hands_out_nothing_until_alignment_completes() -> None:
    gate = InputGate("receiver (1/1)", Wakeup(), floating_buffers=0)
    subs = [ResultSubpartition(f"sender ({i + 1}/2)") for i in range(2)]
    for sub in subs:
        gate.add_channel(sub, exclusive_credits=1)
    gate.open()
    handler = CheckpointBarrierHandler(2, EXACTLY_ONCE, gate.block, gate.unblock_all, lambda: 0.0)
    # Channel 0: barrier 1, then a watermark that belongs after the checkpoint.
    subs[0].add_event(CheckpointBarrier(1, 0))
    subs[0].add_event(Watermark(100))
    # Channel 1: a watermark before its barrier, then the barrier, then one after.
    subs[1].add_event(Watermark(5))
    subs[1].add_event(CheckpointBarrier(1, 0))
    subs[1].add_event(Watermark(200))

    delivered: list[tuple[int, Any]] = []
    triggered_after: list[int] = []

    def drain() -> None:
        while (polled := gate.poll_next()) is not None:
            channel, item = polled
            delivered.append((channel.index, item))
            if isinstance(item, CheckpointBarrier):
                for action in handler.on_barrier(channel.index, item):
                    if isinstance(action, TriggerCheckpoint):
                        triggered_after.append(len(delivered))
            elif isinstance(item, EndOfPartition):
                handler.on_end_of_partition(channel.index)

    drain()
    barrier = CheckpointBarrier(1, 0)
    # Channel 0 is blocked after its barrier: channel 1's items up to its barrier come first.
    assert delivered[:3] == [(0, barrier), (1, Watermark(5)), (1, barrier)]
    # The snapshot was taken before anything that followed a barrier on either channel...
    assert triggered_after == [3]
    # ...and then both channels flow again.
    assert sorted(delivered[3:], key=repr) == [(0, Watermark(100)), (1, Watermark(200))]
    assert gate.blocked_channels == frozenset()


@pytest.mark.parametrize("mode", [EXACTLY_ONCE, AT_LEAST_ONCE])
def test_blocked_channels_property_follows_the_mode(mode: CheckpointingMode) -> None:
    harness = Harness(2, mode)
    harness.step(Barrier(0, 1))
    expected = frozenset({0}) if mode is EXACTLY_ONCE else frozenset()
    assert harness.handler.blocked_channels == expected
    assert frozenset(harness.blocked) == expected
