"""Partitioners: which channel of an edge each record goes to.

A partitioner works on a whole list of records and returns, per target channel, the records (and
timestamps) for it, so that routing costs one tight loop per buffer and no per-record ``await``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from state.keygroups import stable_hash

Routed = list[tuple[int, list[Any], list[int] | None]]
RoutedWithKeys = list[tuple[int, list[Any], list[int] | None, list[Any] | None]]
"""Per target channel: records, timestamps and (for a key partitioner) the records' keys."""

_PLAIN_KEY_TYPES = frozenset({str, int, bytes})


class Partitioner:
    """Base class. ``name`` appears in plans and error messages."""

    name = "partitioner"
    pointwise = False
    """True if subtask *i* only ever sends to subtask *i* (one channel per sender)."""
    broadcast = False
    """True if every record goes to every channel (the writer then hands one buffer to all)."""

    def route(self, values: list[Any], timestamps: list[int] | None, channels: int) -> Routed:
        raise NotImplementedError

    def route_with_keys(
        self, values: list[Any], timestamps: list[int] | None, channels: int
    ) -> RoutedWithKeys:
        """:meth:`route`, with the keys of the records where the partitioner computes them."""
        return [(c, vs, ts, None) for c, vs, ts in self.route(values, timestamps, channels)]

    def __repr__(self) -> str:
        return self.name.upper()


class ForwardPartitioner(Partitioner):
    """Subtask *i* to subtask *i*; requires equal parallelism on both sides."""

    name = "forward"
    pointwise = True

    def route(self, values: list[Any], timestamps: list[int] | None, channels: int) -> Routed:
        return [(0, values, timestamps)]


class RebalancePartitioner(Partitioner):
    """Round robin over all channels, a buffer-sized slice at a time."""

    name = "rebalance"

    def __init__(self, slice_size: int = 256) -> None:
        self._next = 0
        self._slice = slice_size

    def route(self, values: list[Any], timestamps: list[int] | None, channels: int) -> Routed:
        routed: Routed = []
        size = self._slice
        for start in range(0, len(values), size):
            target = self._next
            self._next = (target + 1) % channels
            end = start + size
            routed.append(
                (target, values[start:end], None if timestamps is None else timestamps[start:end])
            )
        return routed


class BroadcastPartitioner(Partitioner):
    """Every record to every channel."""

    name = "broadcast"
    broadcast = True

    def route(self, values: list[Any], timestamps: list[int] | None, channels: int) -> Routed:
        return [(target, values, timestamps) for target in range(channels)]


class KeyGroupPartitioner(Partitioner):
    """By key: ``key group = stable_hash(key) % max_parallelism``, then the key group's owner."""

    name = "hash"

    def __init__(self, key_selector: Callable[[Any], Any], max_parallelism: int) -> None:
        self.key_selector = key_selector
        self.max_parallelism = max_parallelism

    def route(self, values: list[Any], timestamps: list[int] | None, channels: int) -> Routed:
        return [(c, vs, ts) for c, vs, ts, _ in self.route_with_keys(values, timestamps, channels)]

    def route_with_keys(
        self, values: list[Any], timestamps: list[int] | None, channels: int
    ) -> RoutedWithKeys:
        selector = self.key_selector
        if channels == 1:
            # One channel needs no routing, but a key without a stable hash must fail here as it
            # would at any other parallelism, not later in a snapshot. Common key types skip the
            # hash; anything else is hashed once to validate it.
            keys = [selector(value) for value in values]
            if not _PLAIN_KEY_TYPES.issuperset(map(type, keys)):
                _check_stable_hashes(keys)
            return [(0, values, timestamps, keys)]
        maxp = self.max_parallelism
        per_channel: list[list[Any]] = [[] for _ in range(channels)]
        per_channel_keys: list[list[Any]] = [[] for _ in range(channels)]
        if timestamps is None:
            for value in values:
                key = selector(value)
                target = (stable_hash(key) % maxp) * channels // maxp
                per_channel[target].append(value)
                per_channel_keys[target].append(key)
            return [(i, vs, None, per_channel_keys[i]) for i, vs in enumerate(per_channel) if vs]
        per_channel_ts: list[list[int]] = [[] for _ in range(channels)]
        for value, ts in zip(values, timestamps, strict=True):
            key = selector(value)
            target = (stable_hash(key) % maxp) * channels // maxp
            per_channel[target].append(value)
            per_channel_ts[target].append(ts)
            per_channel_keys[target].append(key)
        return [
            (i, vs, per_channel_ts[i], per_channel_keys[i])
            for i, vs in enumerate(per_channel)
            if vs
        ]


def _check_stable_hashes(keys: list[Any]) -> None:
    """Raise ``UnhashableKeyError`` for the first key without a stable hash, closing every
    coroutine among ``keys`` (an async key selector's: unawaited, each would warn)."""
    try:
        for key in keys:
            if type(key) not in _PLAIN_KEY_TYPES:
                stable_hash(key)
    except Exception:
        for key in keys:
            if inspect.iscoroutine(key):
                key.close()
        raise
