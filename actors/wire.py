"""The wire format between processes: typed messages in length-prefixed frames, msgpack only.

Everything that crosses a process boundary (control messages between TaskManagers and the job
master, record buffers and events between subtasks) is encoded with :func:`state.serde.packb`, so
that no pickle is involved and decoding can never run code: a message names its class by a short
tag registered here, never by an importable path.

- :func:`wire_message` registers a frozen dataclass under a tag; :func:`encode_message` and
  :func:`decode_message` turn one into bytes and back, nested messages (also inside tuples, lists
  and dict values) included. Fields hold data only: what :mod:`state.serde` encodes, or other
  registered messages.
- :func:`frame` prefixes a payload with its length; :func:`read_frame` reads one frame back from an
  ``asyncio.StreamReader`` (``None`` at a clean end of stream), :func:`read_frame_blocking` from a
  blocking binary stream (for a thread that must read while its event loop is busy).
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

import msgpack

from state.serde import packb, unpackb

MESSAGE_EXT = 64
"""The msgpack extension code of a nested message (state.serde uses codes below 16)."""

MAX_FRAME_BYTES = 1 << 30
"""A length prefix above this is a corrupt or foreign stream, not a message."""

_HEADER = struct.Struct(">I")

_CLASSES: dict[str, type] = {}
_TAGS: dict[type, str] = {}
_FIELDS: dict[type, tuple[str, ...]] = {}

T = TypeVar("T")


class WireFormatError(ValueError):
    """Bytes that are not a valid frame or message (a bug or a foreign peer, never user data)."""


def wire_message(tag: str) -> Callable[[type[T]], type[T]]:
    """Register a frozen dataclass as a message that may cross a process boundary as ``tag``."""

    def register(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            msg = f"wire message {cls.__name__} must be a dataclass"
            raise TypeError(msg)
        params = getattr(cls, "__dataclass_params__", None)
        if params is None or not params.frozen:
            msg = f"wire message {cls.__name__} must be frozen"
            raise TypeError(msg)
        if tag in _CLASSES and _CLASSES[tag] is not cls:
            msg = f"wire tag {tag!r} is taken by {_CLASSES[tag].__name__}"
            raise ValueError(msg)
        _CLASSES[tag] = cls
        _TAGS[cls] = tag
        _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
        return cls

    return register


def is_wire_message(obj: Any) -> bool:
    return type(obj) in _TAGS


def encode_message(message: Any) -> bytes:
    """Bytes of a registered message (raises ``TypeError`` for a field msgpack cannot hold)."""
    if type(message) not in _TAGS:
        msg = f"{type(message).__name__} is not a registered wire message"
        raise TypeError(msg)
    return packb(_to_wire(message))


def decode_message(data: bytes) -> Any:
    """The message :func:`encode_message` wrote; raises :class:`WireFormatError` otherwise."""
    try:
        decoded = unpackb(data)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        msg = f"undecodable message ({len(data)} bytes): {exc}"
        raise WireFormatError(msg) from exc
    result = _from_wire(decoded)
    if type(result) not in _TAGS:
        msg = f"expected a wire message, got {type(result).__name__}"
        raise WireFormatError(msg)
    return result


def _to_wire(value: Any) -> Any:
    cls = type(value)
    tag = _TAGS.get(cls)
    if tag is not None:
        fields = [_to_wire(getattr(value, name)) for name in _FIELDS[cls]]
        return msgpack.ExtType(MESSAGE_EXT, packb([tag, *fields]))
    if cls is tuple:
        return tuple(_to_wire(v) for v in value)
    if cls is list:
        return [_to_wire(v) for v in value]
    if cls is dict:
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def _from_wire(value: Any) -> Any:
    cls = type(value)
    if cls is msgpack.ExtType:
        if value.code != MESSAGE_EXT:
            msg = f"unknown msgpack extension code {value.code}"
            raise WireFormatError(msg)
        tag, *fields = unpackb(value.data)
        message_cls = _CLASSES.get(tag)
        if message_cls is None:
            msg = f"unknown wire message tag {tag!r}"
            raise WireFormatError(msg)
        expected = _FIELDS[message_cls]
        if len(fields) != len(expected):
            msg = f"wire message {tag!r} has {len(fields)} fields, expected {len(expected)}"
            raise WireFormatError(msg)
        return message_cls(*(_from_wire(f) for f in fields))
    if cls is tuple:
        return tuple(_from_wire(v) for v in value)
    if cls is list:
        return [_from_wire(v) for v in value]
    if cls is dict:
        return {k: _from_wire(v) for k, v in value.items()}
    return value


def frame(payload: bytes) -> bytes:
    """``payload`` with its 4-byte big-endian length in front."""
    return _HEADER.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's payload, or ``None`` when the stream ended cleanly between frames.

    Raises ``asyncio.IncompleteReadError`` when it ends inside a frame, and
    :class:`WireFormatError` for a length no frame can have.
    """
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        msg = f"frame of {length} bytes exceeds the limit of {MAX_FRAME_BYTES}"
        raise WireFormatError(msg)
    return await reader.readexactly(length)


def read_frame_blocking(stream: BinaryIO) -> bytes | None:
    """:func:`read_frame` for a blocking binary stream, such as a socket's ``makefile("rb")``.

    Returns ``None`` when the stream ended cleanly between frames; raises
    :class:`WireFormatError` when it ends inside a frame or the length is one no frame can have.
    """
    header = stream.read(_HEADER.size)
    if not header:
        return None
    (length,) = _HEADER.unpack(_read_rest(stream, header, _HEADER.size))
    if length > MAX_FRAME_BYTES:
        msg = f"frame of {length} bytes exceeds the limit of {MAX_FRAME_BYTES}"
        raise WireFormatError(msg)
    return _read_rest(stream, b"", length)


def _read_rest(stream: BinaryIO, data: bytes, size: int) -> bytes:
    """``data`` completed to ``size`` bytes from ``stream``."""
    while len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            msg = f"the stream ended inside a frame ({len(data)} of {size} bytes)"
            raise WireFormatError(msg)
        data += more
    return data
