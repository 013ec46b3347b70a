"""Partitioners: which channel of an edge each record goes to.

A partitioner works on a whole list of records and returns, per target channel, the records (and
timestamps) for it, so that routing costs one tight loop per buffer and no per-record ``await``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from state.keygroups import stable_hash

Routed = list[tuple[int, list[Any], list[int] | None]]

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
        if channels == 1:
            # One channel needs no routing, but a key without a stable hash must fail here as it
            # would at any other parallelism, not later in a snapshot. Common key types skip the
            # hash; anything else is hashed once to validate it.
            selector = self.key_selector
            for value in values:
                key = selector(value)
                if type(key) not in _PLAIN_KEY_TYPES:
                    stable_hash(key)
            return [(0, values, timestamps)]
        selector = self.key_selector
        maxp = self.max_parallelism
        per_channel: list[list[Any]] = [[] for _ in range(channels)]
        if timestamps is None:
            for value in values:
                per_channel[(stable_hash(selector(value)) % maxp) * channels // maxp].append(value)
            return [(i, vs, None) for i, vs in enumerate(per_channel) if vs]
        per_channel_ts: list[list[int]] = [[] for _ in range(channels)]
        for value, ts in zip(values, timestamps, strict=True):
            target = (stable_hash(selector(value)) % maxp) * channels // maxp
            per_channel[target].append(value)
            per_channel_ts[target].append(ts)
        return [(i, vs, per_channel_ts[i]) for i, vs in enumerate(per_channel) if vs]
