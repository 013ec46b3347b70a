"""The wire format: typed messages round-trip through msgpack (no pickle), frames over a socket."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
from dataclasses import dataclass

import msgpack
import pytest

from actors.wire import (
    WireFormatError,
    decode_message,
    encode_message,
    frame,
    read_frame,
    read_frame_blocking,
    wire_message,
)
from state.serde import packb


@wire_message("test.point")
@dataclass(frozen=True)
class Point:
    name: str
    at: dt.datetime


@wire_message("test.batch")
@dataclass(frozen=True)
class Batch:
    points: tuple[Point, ...]
    by_name: dict[str, Point]
    payload: bytes
    note: str | None = None


def test_nested_messages_round_trip_with_their_types() -> None:
    p1 = Point("a", dt.datetime(2026, 12, 2, 3, 4, 5))
    p2 = Point("b", dt.datetime(2026, 1, 1))
    batch = Batch((p1, p2), {"b": p2}, b"\x00\x01", None)
    back = decode_message(encode_message(batch))
    assert back == batch
    assert type(back.points) is tuple
    assert type(back.points[0]) is Point


def test_an_unregistered_object_is_refused() -> None:
    @dataclass(frozen=True)
    class Unregistered:
        x: int

    with pytest.raises(TypeError, match="not a registered wire message"):
        encode_message(Unregistered(1))
    with pytest.raises(TypeError):
        encode_message(Batch((), {}, b"", note=object()))  # type: ignore[arg-type]


def test_a_mutable_dataclass_cannot_be_registered() -> None:
    @dataclass
    class Mutable:
        x: int

    with pytest.raises(TypeError, match="frozen"):
        wire_message("test.mutable")(Mutable)


def test_foreign_bytes_are_a_wire_format_error() -> None:
    unknown = packb(msgpack.ExtType(64, packb(["no.such.tag", 1])))
    with pytest.raises(WireFormatError, match=r"no\.such\.tag"):
        decode_message(unknown)
    with pytest.raises(WireFormatError, match="expected a wire message"):
        decode_message(packb([1, 2]))
    with pytest.raises(WireFormatError):
        decode_message(b"\xc1")


@pytest.mark.asyncio
async def test_frames_cross_a_real_socket_in_order() -> None:
    received: list[bytes | None] = []
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            payload = await read_frame(reader)
            received.append(payload)
            if payload is None:
                break
        writer.close()
        done.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    messages = [encode_message(Point(str(i), dt.datetime(2026, 1, 1))) for i in range(50)]
    big = b"x" * 300_000
    for payload in [*messages, big]:
        writer.write(frame(payload))
    await writer.drain()
    writer.close()
    await done.wait()
    server.close()
    assert received[:-2] == messages
    assert received[-2] == big
    assert received[-1] is None
    assert [decode_message(m).name for m in messages] == [str(i) for i in range(50)]


@pytest.mark.asyncio
async def test_a_stream_cut_inside_a_frame_is_an_incomplete_read() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(frame(b"abcdef")[:5])
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await read_frame(reader)


def test_a_blocking_stream_reads_the_same_frames() -> None:
    payloads = [b"", b"abc", b"x" * 100_000]
    stream = io.BytesIO(b"".join(frame(p) for p in payloads))
    assert [read_frame_blocking(stream) for _ in payloads] == payloads
    assert read_frame_blocking(stream) is None
    with pytest.raises(WireFormatError, match="inside a frame"):
        read_frame_blocking(io.BytesIO(frame(b"abcdef")[:5]))
    with pytest.raises(WireFormatError, match="exceeds the limit"):
        read_frame_blocking(io.BytesIO(b"\xff\xff\xff\xff"))
