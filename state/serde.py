"""The snapshot encoding: msgpack, never pickle.

Restoring a checkpoint or savepoint must not be able to run code, so snapshots hold only data that
msgpack encodes natively, plus tuples (as an extension type, so that tuple keys come back as tuples
and keep their key group). A value that msgpack cannot encode needs a :class:`StateSerializer`
declared on its state descriptor; without one the snapshot fails with :class:`StateSerializationError`
naming the state and the type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

_TUPLE_EXT = 1


class StateSerializationError(TypeError):
    """A state value could not be encoded or decoded."""


@dataclass(frozen=True, slots=True)
class StateSerializer:
    """Turns a state value into something msgpack encodes (``to_data``) and back (``from_data``)."""

    to_data: Callable[[Any], Any]
    from_data: Callable[[Any], Any]


def _default(obj: Any) -> Any:
    # strict_types sends subclasses here too: encode them as their base type (a Counter as a
    # dict, a StrEnum as its str); only real tuples keep their tuple-ness.
    if isinstance(obj, tuple):
        return msgpack.ExtType(_TUPLE_EXT, packb(list(obj)))
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, bytes):
        return bytes(obj)
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, list):
        return list(obj)
    msg = f"cannot encode {type(obj).__name__}"
    raise TypeError(msg)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _TUPLE_EXT:
        return tuple(unpackb(data))
    return msgpack.ExtType(code, data)


def packb(obj: Any) -> bytes:
    """Encode ``obj`` (msgpack types plus tuples) to bytes."""
    result: bytes = msgpack.packb(obj, default=_default, strict_types=True, use_bin_type=True)
    return result


def unpackb(data: bytes) -> Any:
    """Decode bytes written by :func:`packb`; tuples come back as tuples, lists as lists."""
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def check_encodable(value: Any, what: str) -> None:
    """Raise :class:`StateSerializationError` naming ``what`` if msgpack cannot encode ``value``."""
    try:
        packb(value)
    except (TypeError, ValueError, OverflowError) as exc:
        msg = (
            f"{what}: {exc}: it cannot be stored in a snapshot; use msgpack-encodable values "
            "(None, bool, int, float, str, bytes, list, tuple, dict) or declare a "
            "StateSerializer on the state descriptor"
        )
        raise StateSerializationError(msg) from exc
