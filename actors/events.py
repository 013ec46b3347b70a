"""In-band events: they travel through channels in order with the record buffers.

Events need no credit (only buffers consume the receiver's buffer slots) but are never reordered
with the buffers of the same channel: a receiver sees an event exactly between the buffers its
sender put before and after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from state.storage import CheckpointKind

MAX_TIMESTAMP = (1 << 63) - 1
MIN_TIMESTAMP = -(1 << 63)


@dataclass(frozen=True, slots=True)
class Watermark:
    """No record with a timestamp ``<= timestamp`` follows on this channel.

    Watermarks on one channel never decrease; a task forwards the minimum over its live inputs.
    """

    timestamp: int


MAX_WATERMARK = Watermark(MAX_TIMESTAMP)
"""Emitted at the end of input: it fires every pending event-time timer."""


@dataclass(frozen=True, slots=True)
class CheckpointBarrier:
    """Everything before it on a channel belongs to checkpoint ``checkpoint_id``, nothing after.

    Checkpoint ids strictly increase over the life of a job, across restarts.
    """

    checkpoint_id: int
    timestamp_ms: int
    kind: CheckpointKind = CheckpointKind.CHECKPOINT


@dataclass(frozen=True, slots=True)
class CancelCheckpointMarker:
    """Checkpoint ``checkpoint_id`` was aborted: release any channel blocked for its alignment."""

    checkpoint_id: int


@dataclass(frozen=True, slots=True)
class EndOfData:
    """The sender will send no more records (FLIP-147).

    ``drain=True``: input really ended (or stop with ``--drain``): receivers call ``end_input()``
    and ``finish()``. ``drain=False``: stop-with-savepoint without drain: receivers stop processing
    but do not finish, so the job can resume from the savepoint.
    """

    drain: bool


@dataclass(frozen=True, slots=True)
class EndOfPartition:
    """The sender is gone: nothing at all follows on this channel (no barriers either)."""


END_OF_PARTITION = EndOfPartition()


@dataclass(frozen=True, slots=True)
class WatermarkStatus:
    """Whether the sender's watermark holds back its receivers (Flink's ``WatermarkStatus``).

    ``idle=True``: the sender will emit no records for a while (an idle partition, a source
    subtask without splits); a receiver leaves the channel out of its combined watermark until
    ``idle=False`` arrives. Watermarks may still follow while idle: a receiver whose inputs are
    all idle forwards the highest of them.
    """

    idle: bool


WATERMARK_IDLE = WatermarkStatus(idle=True)
WATERMARK_ACTIVE = WatermarkStatus(idle=False)

Event = (
    Watermark
    | WatermarkStatus
    | CheckpointBarrier
    | CancelCheckpointMarker
    | EndOfData
    | EndOfPartition
)
