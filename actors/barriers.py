"""Barrier alignment: when a task with several input channels takes its snapshot.

:class:`CheckpointBarrierHandler` is a pure state machine (no event loop, no I/O) so that protocol
tests can drive it with a scripted sequence of barriers, markers and channel ends. The task calls
it for every barrier-related event and carries out the actions it returns.

States:

- ``WAITING_FOR_FIRST_BARRIER``: no checkpoint is being aligned.
- ``COLLECTING_BARRIERS``: barrier *n* arrived on some live channels but not on all. In
  exactly-once mode those channels are blocked (the task reads no more of their data) until the
  rest deliver *n*; in at-least-once mode nothing is blocked.

Rules:

1. The barrier of checkpoint *n* on the last live channel completes alignment: trigger the snapshot
   for *n*, unblock everything, back to waiting.
2. A barrier of a newer checkpoint *m > n* while collecting *n* aborts *n* (subsumed) and starts *m*.
3. Barriers of a checkpoint that was already triggered, aborted or subsumed by the one being
   aligned are ignored (late arrivals).
4. A :class:`~actors.events.CancelCheckpointMarker` for *n* (or newer) aborts the alignment and is
   forwarded once; channels that ended (``EndOfPartition``) no longer count, which can complete an
   alignment that only waited for them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from actors.events import CheckpointBarrier


class CheckpointingMode(enum.StrEnum):
    EXACTLY_ONCE = "exactly-once"
    AT_LEAST_ONCE = "at-least-once"


class AlignmentState(enum.Enum):
    WAITING_FOR_FIRST_BARRIER = "waiting-for-first-barrier"
    COLLECTING_BARRIERS = "collecting-barriers"


@dataclass(frozen=True)
class TriggerCheckpoint:
    """Every live channel delivered ``barrier``: snapshot now."""

    barrier: CheckpointBarrier
    alignment_ms: float


@dataclass(frozen=True)
class AbortCheckpoint:
    """Alignment of ``checkpoint_id`` was given up; tell the task and forward a cancel marker."""

    checkpoint_id: int
    reason: str


Action = TriggerCheckpoint | AbortCheckpoint


class CheckpointBarrierHandler:
    """Aligns barriers over the channels of one input gate (see the module docstring)."""

    def __init__(
        self,
        num_channels: int,
        mode: CheckpointingMode,
        block: Callable[[int], None],
        unblock_all: Callable[[], None],
        now_ms: Callable[[], float],
    ) -> None:
        self.mode = mode
        self._block = block
        self._unblock_all = unblock_all
        self._now_ms = now_ms
        self.live_channels: set[int] = set(range(num_channels))
        self.state = AlignmentState.WAITING_FOR_FIRST_BARRIER
        self.pending: CheckpointBarrier | None = None
        self.received: set[int] = set()
        self.latest_handled_id = 0
        """Highest checkpoint id that was triggered or aborted here; older barriers are late."""
        self._started_ms = 0.0
        self.triggered_count = 0
        self.aborted_count = 0

    @property
    def blocked_channels(self) -> frozenset[int]:
        if self.mode is CheckpointingMode.EXACTLY_ONCE:
            return frozenset(self.received)
        return frozenset()

    def on_barrier(self, channel: int, barrier: CheckpointBarrier) -> list[Action]:
        actions: list[Action] = []
        checkpoint_id = barrier.checkpoint_id
        if checkpoint_id <= self.latest_handled_id:
            return actions  # rule 3
        if self.pending is not None and checkpoint_id < self.pending.checkpoint_id:
            return actions  # rule 3: a barrier of a checkpoint the pending one subsumed
        if self.pending is not None and checkpoint_id > self.pending.checkpoint_id:
            actions.append(self._abort(f"subsumed by checkpoint {checkpoint_id}"))  # rule 2
        if self.pending is None:
            self.pending = barrier
            self.received = set()
            self._started_ms = self._now_ms()
            self.state = AlignmentState.COLLECTING_BARRIERS
        self.received.add(channel)
        if self.mode is CheckpointingMode.EXACTLY_ONCE:
            self._block(channel)
        actions.extend(self._maybe_complete())
        return actions

    def on_cancel_marker(self, checkpoint_id: int) -> list[Action]:
        if checkpoint_id <= self.latest_handled_id:
            return []
        if self.pending is not None and self.pending.checkpoint_id > checkpoint_id:
            return []  # an older checkpoint than the one being aligned: already subsumed
        if self.pending is not None and self.pending.checkpoint_id < checkpoint_id:
            aborted = [self._abort(f"subsumed by cancelled checkpoint {checkpoint_id}")]
        else:
            aborted = []
        self.pending = None
        self._reset()
        self.latest_handled_id = checkpoint_id
        self.aborted_count += 1
        return [*aborted, AbortCheckpoint(checkpoint_id, "cancelled upstream")]

    def on_end_of_partition(self, channel: int) -> list[Action]:
        self.live_channels.discard(channel)
        self.received.discard(channel)
        return self._maybe_complete()

    def abort_pending(self, reason: str) -> list[Action]:
        """Give up the alignment in progress (e.g. the coordinator aborted that checkpoint)."""
        if self.pending is None:
            return []
        return [self._abort(reason)]

    def _maybe_complete(self) -> list[Action]:
        pending = self.pending
        if pending is None or not self.live_channels.issubset(self.received):
            return []
        alignment_ms = self._now_ms() - self._started_ms
        self.latest_handled_id = pending.checkpoint_id
        self.pending = None
        self._reset()
        self.triggered_count += 1
        return [TriggerCheckpoint(pending, alignment_ms)]

    def _abort(self, reason: str) -> AbortCheckpoint:
        assert self.pending is not None
        checkpoint_id = self.pending.checkpoint_id
        self.latest_handled_id = max(self.latest_handled_id, checkpoint_id)
        self.pending = None
        self._reset()
        self.aborted_count += 1
        return AbortCheckpoint(checkpoint_id, reason)

    def _reset(self) -> None:
        self.received = set()
        self.state = AlignmentState.WAITING_FOR_FIRST_BARRIER
        self._unblock_all()
