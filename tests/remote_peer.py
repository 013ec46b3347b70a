"""A second process for the tests of ``actors.remote``: one end of one remote channel, on uvloop.

    python tests/remote_peer.py send    --peer-port P [--buffers N] [--sender-queue Q]
    python tests/remote_peer.py receive --peer-port P [--exclusive E] [--floating F]

Both start a ``DataPlane`` on 127.0.0.1 and print ``{"port": ...}`` as the first line of stdout;
the channel's other end is the test process's plane at ``127.0.0.1:P`` (channel id
:data:`CHANNEL`). ``send`` adds ``Buffer([i])`` for i in range(N) and then ``EndOfPartition`` to a
``ResultSubpartition`` bound to the test process (between the last buffer and the end, the
watermark events :data:`LAST_EVENTS`), printing one JSON line of its statistics after
every buffer added and one (``"blocked": true``) before every add that must wait for room; then
``{"done": true, ...}``. ``receive`` opens an input channel from the test process and never takes
anything from it. Both run until stdin is closed (the test's way of ending them), then close the
plane and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.events import END_OF_PARTITION, WATERMARK_ACTIVE, WATERMARK_IDLE, Watermark
from actors.mailbox import Wakeup
from actors.network import Buffer, InputGate, ResultSubpartition
from actors.remote import ChannelId, DataPlane, OutgoingChannel

CHANNEL = ChannelId(attempt=3, edge=1, sender=0, receiver=0)
SENDER_NAME = "sender (1/1)"
RECEIVER_NAME = "receiver (1/1)"
LAST_EVENTS = (Watermark(1_700_000_000_000), WATERMARK_IDLE, WATERMARK_ACTIVE)


def report(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def sender_statistics(
    sub: ResultSubpartition, out: OutgoingChannel, plane: DataPlane
) -> dict[str, Any]:
    stats = sub.statistics()
    connections = plane.statistics().connections
    return {
        "sent": stats.buffers_sent,
        "queued": stats.queued_buffers,
        "credit": stats.credit,
        "credit_received": out.credit_received,
        "waits": stats.backpressure_waits,
        "peak_write_buffer_bytes": max((c.peak_write_buffer_bytes for c in connections), default=0),
    }


async def send(plane: DataPlane, peer_port: int, buffers: int, sender_queue: int) -> None:
    sub = ResultSubpartition(SENDER_NAME, max_queued_buffers=sender_queue)
    out = plane.outgoing(CHANNEL, "127.0.0.1", peer_port, sub, RECEIVER_NAME)
    for i in range(buffers):
        if not sub.has_room():
            report(produced=i, blocked=True, **sender_statistics(sub, out, plane))
        await sub.add_buffer(Buffer([i]))
        report(produced=i + 1, blocked=False, **sender_statistics(sub, out, plane))
    for event in LAST_EVENTS:
        sub.add_event(event)
    sub.add_event(END_OF_PARTITION)
    report(produced=buffers, done=True, blocked=False, **sender_statistics(sub, out, plane))


def receive(plane: DataPlane, peer_port: int, exclusive: int, floating: int) -> None:
    gate = InputGate(RECEIVER_NAME, Wakeup(), floating_buffers=floating)
    plane.incoming(CHANNEL, "127.0.0.1", peer_port, gate, exclusive, description=SENDER_NAME)
    gate.open()


async def main(args: argparse.Namespace) -> None:
    plane = DataPlane()
    await plane.start()
    report(port=plane.port)
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.buffer.read)
    work = None
    if args.role == "send":
        work = asyncio.create_task(send(plane, args.peer_port, args.buffers, args.sender_queue))
    else:
        receive(plane, args.peer_port, args.exclusive, args.floating)
    await stdin_closed
    if work is not None and not work.done():
        work.cancel()
    await plane.close()
    if work is not None and not work.cancelled():
        work.result()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["send", "receive"])
    parser.add_argument("--peer-port", type=int, required=True)
    parser.add_argument("--buffers", type=int, default=100)
    parser.add_argument("--sender-queue", type=int, default=2)
    parser.add_argument("--exclusive", type=int, default=2)
    parser.add_argument("--floating", type=int, default=2)
    uvloop.run(main(parser.parse_args()))
