"""Key groups: the unit by which keyed state is partitioned, routed and rescaled.

``key_group = stable_hash(key) % max_parallelism``. A subtask owns a contiguous range of key groups,
computed exactly as Flink's ``KeyGroupRangeAssignment`` does, so that keyed state written at one
parallelism can be redistributed to another by moving whole key groups.

``stable_hash`` must give the same number in every process and every run. Python's ``hash()`` of
``str``/``bytes`` is salted per process (``PYTHONHASHSEED``), so it cannot be used for routing.
"""

from __future__ import annotations

import datetime as dt
import decimal
import inspect
import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_PARALLELISM = 128
UPPER_BOUND_MAX_PARALLELISM = 1 << 15

_MASK64 = (1 << 64) - 1


class UnhashableKeyError(TypeError):
    """A key of a type that has no stable, process-independent hash."""


def _mix64(value: int) -> int:
    # SplitMix64 finaliser: spreads consecutive integers over all key groups.
    value &= _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def stable_hash(key: Any) -> int:
    """A non-negative hash of ``key`` that is identical in every process and every run.

    Supported keys: ``str``, ``bytes``, ``int`` (and ``bool``), ``float``, ``None``,
    ``datetime.datetime``/``date``/``time``/``timedelta``, ``decimal.Decimal``, ``uuid.UUID``, and
    tuples and frozensets of these: the types a snapshot restores as themselves, so a key keeps its
    key group across a restore. Keys that compare equal hash equally (``1``, ``1.0``, ``True`` and
    ``Decimal(1)``; aware datetimes of the same instant in different zones), as in a dict. Anything
    else raises :class:`UnhashableKeyError` naming the type, because a key whose routing changed
    between runs would silently split its state.
    """
    if type(key) is str:
        return zlib.crc32(key.encode("utf-8", "surrogatepass"))
    if type(key) is int or type(key) is bool:
        return _mix64(int(key)) & 0x7FFFFFFF
    if isinstance(key, bytes | bytearray | memoryview):
        return zlib.crc32(key) ^ 0x5BD1E995
    if isinstance(key, str):  # str subclasses (e.g. enum.StrEnum) hash as their text
        return zlib.crc32(str.__str__(key).encode("utf-8", "surrogatepass"))
    if isinstance(key, int):
        return _mix64(int(key)) & 0x7FFFFFFF
    if isinstance(key, float):
        if key.is_integer():
            return _mix64(int(key)) & 0x7FFFFFFF
        return zlib.crc32(struct.pack("<d", key))
    if key is None:
        return 0
    if isinstance(key, tuple):
        acc = 0x345678
        for item in key:
            acc = _mix64(acc * 1000003 ^ stable_hash(item))
        return acc & 0x7FFFFFFF
    special = _stable_hash_of_value_type(key)
    if special is not None:
        return special
    if inspect.iscoroutine(key):
        key.close()  # dropped unawaited, it would warn "never awaited" on top of this error
        msg = (
            f"the key selector returned a coroutine ({key.__qualname__}), not a key: key_by() "
            "needs a synchronous function; await a service in map_async() instead (async I/O) "
            "and key by what it returns"
        )
        raise UnhashableKeyError(msg)
    msg = (
        f"key {key!r} of type {type(key).__name__} has no stable hash; key_by() must return "
        "str, bytes, int, float, None, datetime, date, time, timedelta, Decimal, UUID, or a "
        "tuple or frozenset of these"
    )
    raise UnhashableKeyError(msg)


_EPOCH = dt.datetime(1970, 1, 1)
_US_PER_DAY = 86_400_000_000
# Distinct seeds per kind of value, so that e.g. a date and a timedelta of the same number of days
# do not always share a key group.
_DATETIME_SEED, _NAIVE_SEED, _DATE_SEED, _TIME_SEED, _TIMEDELTA_SEED, _SET_SEED = range(1, 7)


def _micros(delta: dt.timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _stable_hash_of_value_type(key: Any) -> int | None:
    """``stable_hash`` of the date/time, Decimal, UUID and frozenset keys; None for other types."""
    if isinstance(key, dt.datetime):
        offset = key.utcoffset()
        if offset is None:  # naive: fold does not take part in equality
            return _mix64(_NAIVE_SEED << 60 ^ _micros(key.replace(fold=0) - _EPOCH)) & 0x7FFFFFFF
        instant = _micros(key.replace(tzinfo=None) - _EPOCH) - _micros(offset)
        return _mix64(_DATETIME_SEED << 60 ^ instant) & 0x7FFFFFFF
    if isinstance(key, dt.date):
        return _mix64(_DATE_SEED << 60 ^ key.toordinal()) & 0x7FFFFFFF
    if isinstance(key, dt.time):
        micros = ((key.hour * 60 + key.minute) * 60 + key.second) * 1_000_000 + key.microsecond
        offset = key.utcoffset()
        if offset is not None:  # aware times compare by their UTC time
            micros -= _micros(offset)
        return _mix64(_TIME_SEED << 60 ^ micros) & 0x7FFFFFFF
    if isinstance(key, dt.timedelta):
        return _mix64(_TIMEDELTA_SEED << 60 ^ _micros(key)) & 0x7FFFFFFF
    if isinstance(key, decimal.Decimal):
        if key.is_finite() and key == key.to_integral_value():
            return _mix64(int(key)) & 0x7FFFFFFF  # equal to the int, so hashed like it
        if not key.is_nan() and float(key) == key:
            return stable_hash(float(key))  # exactly a float (or infinite): hashed like it
        sign, digits, exponent = key.as_tuple()
        text = "".join(map(str, digits)).rstrip("0")
        exponent_of_last = int(exponent) + len(digits) - len(text) if text else 0
        return zlib.crc32(f"{sign}:{text}e{exponent_of_last}".encode()) ^ 0x2545F491
    if isinstance(key, uuid.UUID):
        return zlib.crc32(key.bytes) ^ 0x6A09E667
    if isinstance(key, frozenset):
        acc = 0
        for item in key:  # order-independent: sets have no stable iteration order
            acc = (acc + _mix64(stable_hash(item))) & _MASK64
        return _mix64(_SET_SEED << 60 ^ acc ^ len(key)) & 0x7FFFFFFF
    return None


def key_group_for_key(key: Any, max_parallelism: int) -> int:
    """The key group that owns ``key``."""
    return stable_hash(key) % max_parallelism


@dataclass(frozen=True, slots=True)
class KeyGroupRange:
    """An inclusive range ``[start, end]`` of key groups; empty when ``end < start``."""

    start: int
    end: int

    def __contains__(self, key_group: object) -> bool:
        return isinstance(key_group, int) and self.start <= key_group <= self.end

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(range(self.start, self.end + 1))

    def __len__(self) -> int:
        return max(0, self.end - self.start + 1)


def key_group_range_for_subtask(
    max_parallelism: int, parallelism: int, subtask_index: int
) -> KeyGroupRange:
    """The contiguous key groups owned by ``subtask_index`` of ``parallelism`` subtasks."""
    check_parallelism(max_parallelism, parallelism)
    start = (subtask_index * max_parallelism + parallelism - 1) // parallelism
    end = ((subtask_index + 1) * max_parallelism + parallelism - 1) // parallelism - 1
    return KeyGroupRange(start, end)


def subtask_for_key_group(max_parallelism: int, parallelism: int, key_group: int) -> int:
    """The subtask index that owns ``key_group``; inverse of :func:`key_group_range_for_subtask`."""
    return key_group * parallelism // max_parallelism


def check_parallelism(max_parallelism: int, parallelism: int) -> None:
    if not 1 <= max_parallelism <= UPPER_BOUND_MAX_PARALLELISM:
        msg = f"max parallelism must be in 1..{UPPER_BOUND_MAX_PARALLELISM}, got {max_parallelism}"
        raise ValueError(msg)
    if not 1 <= parallelism <= max_parallelism:
        msg = (
            f"parallelism {parallelism} must be between 1 and the max parallelism "
            f"{max_parallelism} (keyed state is split into that many key groups)"
        )
        raise ValueError(msg)
