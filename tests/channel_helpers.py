"""Helpers for channel tests (``actors.network``, ``actors.remote``): the credit invariants of an
input gate, and a consumer that waits for input the way a task does (on the gate's wake-up)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from actors.network import Buffer, InputChannel, InputGate

WAIT_S = 30.0


def gate_credit_invariants(gate: InputGate) -> Callable[[], None]:
    """A check of the credit invariants of every channel of ``gate`` (see ``actors.network``),
    with each channel's sender as the receiver sees it (for a remote channel: the credit mirror)."""

    def check() -> None:
        for channel in gate.channels:
            # buffers queued at the receiver + credit held by the sender == exclusive + borrowed
            assert channel.queued_buffers + channel.sender.credit == channel.credits, (
                channel.description,
                channel.statistics(),
                channel.sender.credit,
            )
            assert channel.queued_buffers <= channel.credits
            assert channel.peak_queued_buffers <= channel.exclusive_credits + gate.floating_total
        lent = sum(c.floating_held for c in gate.channels)
        assert lent + gate.floating_available == gate.floating_total

    return check


def check_at_every_buffer(channel: InputChannel, check: Callable[[], None]) -> None:
    """Run ``check`` right after each buffer ``channel`` receives (however many arrive in one
    step of the loop, as when a connection's reader delivers several frames at once)."""
    deliver = channel.on_buffer

    def deliver_and_check(buffer: Buffer, backlog: int) -> None:
        deliver(buffer, backlog)
        check()

    channel.on_buffer = deliver_and_check  # type: ignore[method-assign]


async def take(gate: InputGate, timeout: float = WAIT_S) -> tuple[InputChannel, Any]:
    """The gate's next item, sleeping on the gate's wake-up between polls as a task does; raises
    what the gate failed with, or ``AssertionError`` if nothing arrived within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        gate.wakeup.clear()
        polled = gate.poll_next()
        if polled is not None:
            return polled
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not await gate.wakeup.wait(remaining):
            msg = f"{gate.owner}: nothing arrived within {timeout:g} s"
            raise AssertionError(msg)


async def take_and_recycle(gate: InputGate, timeout: float = WAIT_S) -> tuple[InputChannel, Any]:
    """:func:`take`, recycling a buffer at once (the task finished with it)."""
    channel, item = await take(gate, timeout)
    if type(item) is Buffer:
        channel.recycle()
    return channel, item
