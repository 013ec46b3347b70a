"""The snapshot encoding: msgpack, never pickle.

Restoring a checkpoint or savepoint must not be able to run code, so snapshots hold only data:
what msgpack encodes natively (None, bool, int, float, str, bytes, list, dict), plus these Python
types as msgpack extension types that decode back to the same type and an equal value, also as
dict keys and inside containers: ``tuple``, ``set``, ``frozenset``, ``datetime.datetime`` (naive, or
aware with a ``datetime.timezone`` or a ``zoneinfo.ZoneInfo``, restored by its key),
``datetime.date``, ``datetime.time``, ``datetime.timedelta``, ``decimal.Decimal`` and ``uuid.UUID``.
Subclasses are stored as their base type (a ``Counter`` as a dict, a ``StrEnum`` as its str).

Nothing else is decoded, in particular no class named in a checkpoint is imported: dataclasses and
other objects need converting (``dataclasses.asdict``) or a :class:`StateSerializer` declared on
their state descriptor. State refuses them when they are written (:func:`check_state_value`), so
that the job fails at the ``update()``/``add()`` that stored them, not at its first checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import uuid
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import msgspec

_TUPLE_EXT = 1
_SET_EXT = 2
_FROZENSET_EXT = 3
_DATETIME_EXT = 4
_DATE_EXT = 5
_TIME_EXT = 6
_TIMEDELTA_EXT = 7
_DECIMAL_EXT = 8
_UUID_EXT = 9

SUPPORTED_TYPES = (
    "None, bool, int, float, str, bytes, list, tuple, dict, set, frozenset, datetime, date, time, "
    "timedelta, Decimal, UUID"
)


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
    if isinstance(obj, frozenset):
        return msgpack.ExtType(_FROZENSET_EXT, packb(list(obj)))
    if isinstance(obj, set):
        return msgpack.ExtType(_SET_EXT, packb(list(obj)))
    if isinstance(obj, dt.datetime):
        fields = [obj.year, obj.month, obj.day, obj.hour, obj.minute, obj.second]
        fields += [obj.microsecond, obj.fold, _encode_tzinfo(obj.tzinfo)]
        return msgpack.ExtType(_DATETIME_EXT, packb(fields))
    if isinstance(obj, dt.date):
        return msgpack.ExtType(_DATE_EXT, packb([obj.year, obj.month, obj.day]))
    if isinstance(obj, dt.time):
        fields = [obj.hour, obj.minute, obj.second, obj.microsecond, obj.fold]
        fields.append(_encode_tzinfo(obj.tzinfo))
        return msgpack.ExtType(_TIME_EXT, packb(fields))
    if isinstance(obj, dt.timedelta):
        return msgpack.ExtType(_TIMEDELTA_EXT, packb([obj.days, obj.seconds, obj.microseconds]))
    if isinstance(obj, decimal.Decimal):
        return msgpack.ExtType(_DECIMAL_EXT, str(obj).encode("ascii"))
    if isinstance(obj, uuid.UUID):
        return msgpack.ExtType(_UUID_EXT, obj.bytes)
    raise _UnencodableError(obj)


class _UnencodableError(TypeError):
    """A value of a type snapshots do not hold; ``obj`` is that value (maybe deep inside the
    value being encoded)."""

    def __init__(self, obj: Any, reason: str = "") -> None:
        kind = " (a dataclass)" if dataclasses.is_dataclass(obj) else ""
        self.obj = obj
        self.description = f"{_type_name(obj)}{kind}{reason}"
        super().__init__(f"cannot encode {self.description}")


_ENCODED_BASES: tuple[type, ...] = (
    bool, int, float, str, bytes, tuple, list, dict, frozenset, set,
    dt.datetime, dt.date, dt.time, dt.timedelta, decimal.Decimal, uuid.UUID,
)  # fmt: skip
"""Most specific first (bool before int, datetime before date), in the order of ``_default``."""


def encoded_type(cls: type) -> type:
    """The type a value of ``cls`` comes back as from a snapshot: ``cls`` itself, or for a
    subclass the supported base it is encoded as (a ``StrEnum`` member comes back a ``str``)."""
    for base in _ENCODED_BASES:
        if issubclass(cls, base):
            return base
    return cls


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _encode_tzinfo(tz: dt.tzinfo | None) -> Any:
    if tz is None:
        return None
    if type(tz) is dt.timezone:
        offset, *name = tz.__getinitargs__()  # type: ignore[attr-defined]
        return ["fixed", offset.days, offset.seconds, offset.microseconds, *name]
    if type(tz) is zoneinfo.ZoneInfo and tz.key is not None:
        return ["zone", tz.key]
    reason = f" (the time zone {tz!r}): use datetime.timezone or zoneinfo.ZoneInfo(key)"
    raise _UnencodableError(tz, reason)


def _decode_tzinfo(data: Any) -> dt.tzinfo | None:
    if data is None:
        return None
    if data[0] == "fixed":
        offset = dt.timedelta(days=data[1], seconds=data[2], microseconds=data[3])
        return dt.timezone(offset, *data[4:])
    if data[0] == "zone":
        return zoneinfo.ZoneInfo(data[1])
    msg = f"unknown time zone encoding {data[0]!r}"
    raise ValueError(msg)


def _ext_hook(code: int, data: memoryview) -> Any:
    if code == _TUPLE_EXT:
        return tuple(unpackb(data))
    if code == _SET_EXT:
        return set(unpackb(data))
    if code == _FROZENSET_EXT:
        return frozenset(unpackb(data))
    if code == _DATETIME_EXT:
        year, month, day, hour, minute, second, micros, fold, tz = unpackb(data)
        tzinfo = _decode_tzinfo(tz)
        return dt.datetime(year, month, day, hour, minute, second, micros, tzinfo, fold=fold)
    if code == _DATE_EXT:
        return dt.date(*unpackb(data))
    if code == _TIME_EXT:
        hour, minute, second, micros, fold, tz = unpackb(data)
        return dt.time(hour, minute, second, micros, _decode_tzinfo(tz), fold=fold)
    if code == _TIMEDELTA_EXT:
        days, seconds, microseconds = unpackb(data)
        return dt.timedelta(days=days, seconds=seconds, microseconds=microseconds)
    if code == _DECIMAL_EXT:
        return decimal.Decimal(str(data, "ascii"))
    if code == _UUID_EXT:
        return uuid.UUID(bytes=bytes(data))
    return msgpack.ExtType(code, bytes(data))


def packb(obj: Any) -> bytes:
    """Encode ``obj`` (msgpack types plus the extension types in the module docstring) to bytes."""
    result: bytes = msgpack.packb(obj, default=_default, strict_types=True, use_bin_type=True)
    return result


PLAIN_TYPES: frozenset[type] = frozenset({str, int, float, bool, bytes, type(None)})
"""Exact types that msgspec's encoder writes to the same bytes as :func:`packb`. (It writes
tuples, sets, datetimes, dates, times, timedeltas, Decimals and UUIDs its own way, not as this
module's extension types, so those go through msgpack.)"""


class PlainColumn(list[Any]):
    """A list whose items are all of :data:`PLAIN_TYPES`: a key or value column of a snapshot that
    :func:`packb_parts` may hand to msgspec's encoder. ``packb`` encodes it as the list it is."""

    __slots__ = ()


_ENCODER = msgspec.msgpack.Encoder()


def packb_parts(data: dict[str, Any]) -> bytes:
    """``packb(data)``, byte for byte, in less time when ``data`` holds :class:`PlainColumn` lists
    (in maps with str keys, at any depth): msgspec's encoder writes those, and msgpack's the
    rest. For a snapshot's large key and value columns that takes about 0.6 of the time, most of
    which goes to reading the entries' objects from memory."""
    return _ENCODER.encode(_plain_or_raw(data))


def _plain_or_raw(value: Any) -> Any:
    cls = type(value)
    if cls is PlainColumn or cls in PLAIN_TYPES:
        return value
    if cls is dict and all(type(key) is str for key in value):
        return {key: _plain_or_raw(item) for key, item in value.items()}
    return msgspec.Raw(packb(value))


# msgspec's decoder reads msgpack's bytes to the same values, in about 0.57 of the time msgpack's
# takes for a buffer of small dicts (what a keyed shuffle between TaskManagers decodes). Its encoder
# only writes PlainColumns and maps (packb_parts): it writes tuples, sets and datetimes its own
# way, not as these extension types. Its errors are ValueErrors (msgspec.DecodeError), as
# msgpack's are.
_DECODER = msgspec.msgpack.Decoder(ext_hook=_ext_hook)


def unpackb(data: bytes | memoryview) -> Any:
    """Decode bytes written by :func:`packb`: every value comes back as the type it was written as
    (tuples as tuples, lists as lists, sets as sets, ...)."""
    return _DECODER.decode(data)


def check_encodable(value: Any, what: str) -> None:
    """Raise :class:`StateSerializationError` naming ``what`` if msgpack cannot encode ``value``."""
    try:
        packb(value)
    except (TypeError, ValueError, OverflowError) as exc:
        msg = (
            f"{what}: {exc}: it cannot be stored in a snapshot; use the supported types "
            f"({SUPPORTED_TYPES}) or declare a StateSerializer on the state descriptor"
        )
        raise StateSerializationError(msg) from exc


def describe_unencodable(value: Any, exc: BaseException) -> str:
    """What about ``value`` made :func:`packb` raise ``exc``, for an error message: its type
    (marked when it is a dataclass), or its type and the encoder's complaint about what is inside."""
    if isinstance(exc, _UnencodableError) and exc.obj is value:
        return exc.description
    return f"{_type_name(value)} ({exc})"


SNAPSHOT_SCALAR_TYPES: frozenset[type] = frozenset(
    {str, int, float, bool, bytes, type(None), dt.date, dt.timedelta, decimal.Decimal, uuid.UUID}
)
"""Exact types that are always encodable: state writes of these skip every further check.
(``datetime`` and ``time`` are not among them: their time zone may not be encodable.)"""

_FLAT_CONTAINER_TYPES: frozenset[type] = frozenset({tuple, set, frozenset})

_NATIVE_PACKER = msgpack.Packer(strict_types=True, use_bin_type=True)
"""Encodes exactly msgpack's own types (lists and dicts of them at any depth), all in C, with no
Python callback; anything else raises. Only the state-write check uses it: one pack call holds the
GIL throughout, so sharing it is safe."""


def check_state_value(value: Any, owner: str, kind: str, name: str) -> None:
    """Refuse, when it is written, a state value that a snapshot could not hold.

    The one check behind every state write (keyed value, list, map and reducing state, operator
    list and broadcast state). Cheap on the hot path: scalars of the exact types in
    :data:`SNAPSHOT_SCALAR_TYPES` and flat tuples and sets of them pass after a type test, lists
    and dicts of msgpack's own types after one encoding in C; anything else is encoded in full
    to find out. Raises :class:`StateSerializationError`
    naming ``owner`` (the operator and subtask), the ``kind`` and ``name`` of the state and the
    value's type, and saying what to do.
    """
    cls = type(value)
    scalars = SNAPSHOT_SCALAR_TYPES
    if cls in scalars:
        return
    if cls is dict or cls is list:
        try:
            _NATIVE_PACKER.pack(value)
        except (TypeError, ValueError, OverflowError):
            pass  # holds other types (a tuple, a date, ...): the full check below decides
        else:
            return
    elif cls in _FLAT_CONTAINER_TYPES:
        for item in value:
            if type(item) not in scalars:
                break
        else:
            return
    try:
        packb(value)
    except (TypeError, ValueError, OverflowError) as exc:
        where = f"{owner}: " if owner else ""
        problem = describe_unencodable(value, exc)
        msg = (
            f"{where}{kind} state {name!r} cannot store a {problem}: snapshots hold only "
            f"{SUPPORTED_TYPES}; convert the value (for a dataclass: dataclasses.asdict(value)) "
            "or declare a StateSerializer on the state's descriptor"
        )
        raise StateSerializationError(msg) from exc
