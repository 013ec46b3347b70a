"""Keyed state: value, list, map and reducing state scoped to the current key.

The in-memory backend keeps one dict per state, keyed by the user's key. Every key belongs to the
key group ``stable_hash(key) % max_parallelism``; a subtask only ever holds keys of the key groups
it owns, and a restore at any parallelism keeps exactly the entries of its key groups. The key
group is computed when routing and when restoring, never per snapshot.

State with a time to live (a :class:`StateTtlConfig` on its descriptor) keeps a second dict of
last-write (or last-access) timestamps beside the values, in processing time from the backend's
``now_ms``; state without one keeps the single dict, so its hot path is unchanged. Expired entries
are never returned, are removed when accessed, are left out of snapshots, and are removed a few
at a time in the background (:meth:`KeyedStateBackend.cleanup_incrementally`, which keyed
operators call after every buffer), so an idle key's state does not live forever. A cleanup rule
(:meth:`KeyedStateBackend.set_cleanup_rule`) clears a key's whole state when a user predicate
holds, checked the same way.

Threading model: a backend belongs to one operator of one subtask and is only touched by that
subtask's actor, so nothing here locks.
"""

from __future__ import annotations

import enum
import logging
import operator
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from state.durations import duration_ms
from state.keygroups import KeyGroupRange, key_group_for_key
from state.refusal import RestoreRefusedError
from state.serde import (
    PLAIN_TYPES,
    SNAPSHOT_SCALAR_TYPES,
    PlainColumn,
    StateSerializer,
    check_state_value,
    encoded_type,
)

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

_ABSENT: Any = object()
# State writes test the exact type against this first, so scalars cost one set lookup.
_SCALARS = SNAPSHOT_SCALAR_TYPES
# Value state tests against this one instead: the same one lookup for str, int, float, bool,
# bytes and None, and it also learns that its snapshot column is plain (see ValueState._plain).
_PLAIN = PLAIN_TYPES

log = logging.getLogger(__name__)

_UNKNOWN_KIND = "restored"
"""The kind that snapshots before state kinds were recorded gave carried-along state."""


def _same_keys(keys: list[Any], earlier: list[Any]) -> bool:
    """Whether two key columns hold the same key objects in the same order. ``==`` alone is cheap
    (it compares identical objects without reading them) but not enough: keys of two types can be
    equal (``1``, ``1.0``, ``True``), and each state must keep its own."""
    return bool(keys) and keys == earlier and all(map(operator.is_, keys, earlier))


def with_shared_keys(part: dict[str, Any]) -> dict[str, Any]:
    """A keyed snapshot part (:meth:`KeyedStateBackend.snapshot`) with every entry's ``"keys"``:
    an entry that names another's (``"keys_of"``) gets that entry's key column. Snapshots written
    before keys were shared come back unchanged."""
    if not any("keys_of" in entry for entry in part.values()):
        return part
    expanded: dict[str, Any] = {}
    for name, entry in part.items():
        owner = entry.get("keys_of")
        if owner is None:
            expanded[name] = entry
            continue
        owner_entry = part.get(owner)
        if owner_entry is None or "keys" not in owner_entry:
            msg = (
                f"keyed state {name!r} shares the keys of state {owner!r}, which the snapshot "
                "does not hold with keys of its own: the snapshot is damaged"
            )
            raise ValueError(msg)
        expanded[name] = {**entry, "keys": owner_entry["keys"]}
    return expanded


class IncompatibleStateError(RestoreRefusedError):
    """Restored keyed state does not fit the job: a state re-declared with another kind, or keys
    of another type. The message names the operator, the state or key types, and the way out."""


def _key_type_name(key_type: type) -> str:
    """The name of a key type as a snapshot stores it: a subclass by the base type it is encoded
    as (a ``StrEnum`` key comes back from a snapshot as ``str``)."""
    if issubclass(key_type, bytearray | memoryview):
        return "bytes"
    return "None" if key_type is type(None) else encoded_type(key_type).__name__


class TtlUpdateType(enum.StrEnum):
    """When an entry's time to live starts again (Flink's ``StateTtlConfig.UpdateType``)."""

    ON_CREATE_AND_WRITE = "on_create_and_write"
    """Only writes (create, update, add, put) restart it: an entry expires ``ttl`` after its
    last write, however often it is read."""
    ON_READ_AND_WRITE = "on_read_and_write"
    """Reads restart it too: an entry expires ``ttl`` after its last access."""


class StateVisibility(enum.StrEnum):
    """Whether an expired entry that is still held may be returned (Flink's ``StateVisibility``)."""

    NEVER_RETURN_EXPIRED = "never_return_expired"
    """An expired entry reads as absent, even if it was not cleaned up yet."""
    RETURN_EXPIRED_IF_NOT_CLEANED_UP = "return_expired_if_not_cleaned_up"
    """The read that finds an expired entry still returns it, and removes it."""


DEFAULT_TTL_CLEANUP_SIZE = 10
"""Entries of a state with TTL checked per processed buffer by the background cleanup."""

DEFAULT_RULE_CLEANUP_SIZE = 10
"""Keys checked against an operator's cleanup rule per processed buffer in the background."""


@dataclass(frozen=True)
class StateTtlConfig:
    """A time to live for the entries of one keyed state (set with ``ttl=`` on its descriptor).

    ``ttl_ms`` is processing time (the job's clock). Each entry has its own timestamp: a value or
    reducing state's value per key, every element of a list state, every entry of a map state.
    Expired entries are never returned (unless ``visibility`` says otherwise), are removed when
    accessed, are left out of checkpoints and savepoints, and ``cleanup_size`` of them per
    processed buffer are checked in the background (0: only on access and in snapshots).
    Timestamps are in the snapshot, so a restore (at any parallelism) keeps each entry's expiry;
    state restored from a snapshot taken without TTL starts its time to live at the restore.
    """

    ttl_ms: int
    update_type: TtlUpdateType = TtlUpdateType.ON_CREATE_AND_WRITE
    visibility: StateVisibility = StateVisibility.NEVER_RETURN_EXPIRED
    cleanup_size: int = DEFAULT_TTL_CLEANUP_SIZE

    def __post_init__(self) -> None:
        if isinstance(self.ttl_ms, bool) or not isinstance(self.ttl_ms, int) or self.ttl_ms <= 0:
            msg = f"state TTL must be a positive number of milliseconds, got {self.ttl_ms!r}"
            raise ValueError(msg)
        if not isinstance(self.cleanup_size, int) or self.cleanup_size < 0:
            msg = f"state TTL cleanup_size must be an int >= 0, got {self.cleanup_size!r}"
            raise ValueError(msg)
        # Plain strings name the members too: update_type="on_read_and_write".
        object.__setattr__(self, "update_type", TtlUpdateType(self.update_type))
        object.__setattr__(self, "visibility", StateVisibility(self.visibility))

    @classmethod
    def of(
        cls,
        ttl: int | str,
        update_type: TtlUpdateType | str = TtlUpdateType.ON_CREATE_AND_WRITE,
        visibility: StateVisibility | str = StateVisibility.NEVER_RETURN_EXPIRED,
        cleanup_size: int = DEFAULT_TTL_CLEANUP_SIZE,
    ) -> StateTtlConfig:
        """A TTL of ``ttl``: milliseconds, or a duration string such as ``"30s"``, ``"1h"``."""
        return cls(
            duration_ms(ttl, "state TTL"),
            TtlUpdateType(update_type),
            StateVisibility(visibility),
            cleanup_size,
        )


@dataclass(frozen=True)
class ValueStateDescriptor(Generic[T]):
    name: str
    default: T | None = None
    serializer: StateSerializer | None = None
    kind: str = field(default="value", init=False)
    ttl: StateTtlConfig | None = None


@dataclass(frozen=True)
class ListStateDescriptor(Generic[T]):
    name: str
    serializer: StateSerializer | None = None
    kind: str = field(default="list", init=False)
    ttl: StateTtlConfig | None = None


@dataclass(frozen=True)
class MapStateDescriptor(Generic[K, V]):
    name: str
    serializer: StateSerializer | None = None
    kind: str = field(default="map", init=False)
    ttl: StateTtlConfig | None = None


@dataclass(frozen=True)
class ReducingStateDescriptor(Generic[T]):
    name: str
    reduce_fn: Callable[[T, T], T]
    serializer: StateSerializer | None = None
    kind: str = field(default="reducing", init=False)
    ttl: StateTtlConfig | None = None


StateDescriptor = (
    ValueStateDescriptor[Any]
    | ListStateDescriptor[Any]
    | MapStateDescriptor[Any, Any]
    | ReducingStateDescriptor[Any]
)


class _KeyedState:
    __slots__ = ("_backend", "_descriptor", "_values")

    def __init__(self, backend: KeyedStateBackend, descriptor: StateDescriptor) -> None:
        self._backend = backend
        self._descriptor = descriptor
        self._values: dict[Any, Any] = {}

    def clear(self) -> None:
        """Remove the current key's entry."""
        self._values.pop(self._backend.current_key, None)

    def _peek(self, key: Any) -> Any:
        """``key``'s entry (a copy of a list or dict) or ``_ABSENT``, without touching its TTL."""
        entry = self._values.get(key, _ABSENT)
        return entry.copy() if isinstance(entry, list | dict) else entry

    def _forget(self, key: Any) -> None:
        """Remove ``key``'s entry whatever the current key is."""
        self._values.pop(key, None)

    def _check_value(self, value: Any) -> None:
        """Refuse now what the next snapshot could not hold, unless a serializer converts it."""
        descriptor = self._descriptor
        if descriptor.serializer is None:
            check_state_value(value, self._backend.owner, descriptor.kind, descriptor.name)


class ValueState(_KeyedState, Generic[T]):
    """One value per key."""

    __slots__ = ("_default", "_plain")

    def __init__(self, backend: KeyedStateBackend, descriptor: StateDescriptor) -> None:
        super().__init__(backend, descriptor)
        # Kept here, not read through the (frozen) descriptor: value() is the hottest state call.
        self._default: T | None = descriptor.default  # type: ignore[union-attr]
        # True while every value written was of PLAIN_TYPES: the snapshot's value column is then
        # a PlainColumn, which encodes faster. Once False, it stays False. Only this class keeps
        # it: the TTL subclass writes through its own update().
        self._plain = True

    def value(self) -> T | None:
        return self._values.get(self._backend.current_key, self._default)

    def update(self, value: T | None) -> None:
        if value is None:
            self._values.pop(self._backend.current_key, None)
        else:
            if type(value) not in _PLAIN:
                self._not_plain(value)
            self._values[self._backend.current_key] = value

    def _not_plain(self, value: Any) -> None:
        self._plain = False
        if type(value) not in _SCALARS:
            self._check_value(value)


class ListState(_KeyedState, Generic[T]):
    """A list of values per key."""

    __slots__ = ()

    def get(self) -> list[T]:
        return list(self._values.get(self._backend.current_key, ()))

    def add(self, value: T) -> None:
        if type(value) not in _SCALARS:
            self._check_value(value)
        self._values.setdefault(self._backend.current_key, []).append(value)

    def add_all(self, values: list[T]) -> None:
        items = list(values)
        self._check_value(items)
        self._values.setdefault(self._backend.current_key, []).extend(items)

    def update(self, values: list[T]) -> None:
        if values:
            items = list(values)
            self._check_value(items)
            self._values[self._backend.current_key] = items
        else:
            self._values.pop(self._backend.current_key, None)


class MapState(_KeyedState, Generic[K, V]):
    """A dict per key."""

    __slots__ = ()

    def _map(self) -> dict[K, V]:
        return self._values.get(self._backend.current_key) or {}

    def get(self, user_key: K, default: V | None = None) -> V | None:
        return self._map().get(user_key, default)

    def put(self, user_key: K, value: V) -> None:
        if type(user_key) not in _SCALARS:
            self._check_value(user_key)
        if type(value) not in _SCALARS:
            self._check_value(value)
        self._values.setdefault(self._backend.current_key, {})[user_key] = value

    def put_all(self, entries: dict[K, V]) -> None:
        """``put`` every entry of ``entries``."""
        items = dict(entries)
        self._check_value(items)
        self._values.setdefault(self._backend.current_key, {}).update(items)

    def remove(self, user_key: K) -> None:
        current = self._values.get(self._backend.current_key)
        if current is not None:
            current.pop(user_key, None)
            if not current:
                del self._values[self._backend.current_key]

    def contains(self, user_key: K) -> bool:
        return user_key in self._map()

    def items(self) -> list[tuple[K, V]]:
        return list(self._map().items())

    def keys(self) -> list[K]:
        return list(self._map().keys())

    def values(self) -> list[V]:
        return list(self._map().values())

    def is_empty(self) -> bool:
        return not self._map()


class ReducingState(_KeyedState, Generic[T]):
    """One value per key, combined with each added value by the descriptor's reduce function."""

    __slots__ = ("_reduce",)

    def __init__(self, backend: KeyedStateBackend, descriptor: StateDescriptor) -> None:
        super().__init__(backend, descriptor)
        self._reduce = descriptor.reduce_fn  # type: ignore[union-attr]

    def get(self) -> T | None:
        return self._values.get(self._backend.current_key)

    def add(self, value: T) -> None:
        key = self._backend.current_key
        current = self._values.get(key, _ABSENT)
        result = value if current is _ABSENT else self._reduce(current, value)
        if type(result) not in _SCALARS:
            self._check_value(result)
        self._values[key] = result


class _TtlState(_KeyedState):
    """What every state with a time to live adds: ``_stamps``, a dict beside ``_values`` with the
    same keys holding each entry's timestamp (an int per key for value and reducing state, a list
    parallel to the values for list state, a dict per user key for map state), and a background
    cleanup that walks the keys ``cleanup_size`` at a time."""

    # No __slots__ here: with them, the reducing state (which has its own) could not be a base.

    def __init__(self, backend: KeyedStateBackend, descriptor: StateDescriptor) -> None:
        super().__init__(backend, descriptor)
        ttl = descriptor.ttl
        assert ttl is not None
        self._ttl_ms = ttl.ttl_ms
        self._refresh_on_read = ttl.update_type is TtlUpdateType.ON_READ_AND_WRITE
        self._return_expired = ttl.visibility is StateVisibility.RETURN_EXPIRED_IF_NOT_CLEANED_UP
        self._step = ttl.cleanup_size
        self._now = backend.now_ms
        self._stamps: dict[Any, Any] = {}
        self._round: list[Any] = []
        self._round_at = 0

    def clear(self) -> None:
        self._forget(self._backend.current_key)

    def _forget(self, key: Any) -> None:
        self._values.pop(key, None)
        self._stamps.pop(key, None)

    def _stamp_restored(self, stamps: dict[Any, Any], now: int) -> None:
        """Take the restored timestamps; entries restored without one (from a snapshot taken
        before this state had a TTL) start their time to live now."""
        self._stamps = {key: stamps.get(key, _ABSENT) for key in self._values}
        for key, stamp in self._stamps.items():
            if stamp is _ABSENT:
                self._stamps[key] = self._fresh_stamp(self._values[key], now)

    def _fresh_stamp(self, entry: Any, now: int) -> Any:
        return now

    def _purge(self, key: Any, now: int) -> None:
        """Remove the expired parts of ``key``'s entry (all of it if nothing is left)."""
        if now - self._stamps[key] >= self._ttl_ms:
            self._forget(key)

    def _cleanup_step(self, now: int) -> None:
        """Check the next ``cleanup_size`` keys of the current round over all keys."""
        if not self._step:
            return
        keys, at = self._round, self._round_at
        if at >= len(keys):
            keys = self._round = list(self._stamps)
            at = 0
        end = at + self._step
        stamps = self._stamps
        for key in keys[at:end]:
            if key in stamps:
                self._purge(key, now)
        self._round_at = end

    def _purge_all(self, now: int) -> None:
        for key in list(self._stamps):
            self._purge(key, now)

    def _read_single(self, key: Any) -> Any:
        """The value of a value or reducing state for ``key``, or ``_ABSENT``; expires and
        refreshes it as configured."""
        stamp = self._stamps.get(key)
        if stamp is None:
            return _ABSENT
        now = self._now()
        if now - stamp >= self._ttl_ms:
            value = self._values.pop(key)
            del self._stamps[key]
            return value if self._return_expired else _ABSENT
        if self._refresh_on_read:
            self._stamps[key] = now
        return self._values[key]

    def _peek(self, key: Any) -> Any:
        stamp = self._stamps.get(key)
        if stamp is None or self._now() - stamp >= self._ttl_ms:
            return _ABSENT
        return self._values[key]


class _TtlValueState(_TtlState, ValueState[T]):
    # Inlined rather than built on _read_single and ValueState.update: the most used state.
    def value(self) -> T | None:
        key = self._backend.current_key
        stamp = self._stamps.get(key)
        if stamp is not None:
            now = self._now()
            if now - stamp < self._ttl_ms:
                if self._refresh_on_read:
                    self._stamps[key] = now
                live: T = self._values[key]
                return live
            expired: T = self._values.pop(key)
            del self._stamps[key]
            if self._return_expired:
                return expired
        return self._default

    def update(self, value: T | None) -> None:
        key = self._backend.current_key
        if value is None:
            self._values.pop(key, None)
            self._stamps.pop(key, None)
            return
        if type(value) not in _SCALARS:
            self._check_value(value)
        self._values[key] = value
        self._stamps[key] = self._now()


class _TtlReducingState(_TtlState, ReducingState[T]):
    def get(self) -> T | None:
        value = self._read_single(self._backend.current_key)
        return None if value is _ABSENT else value

    def add(self, value: T) -> None:
        key = self._backend.current_key
        # An expired accumulator is not reduced with (unless expired values may be returned).
        if self._read_single(key) is _ABSENT:
            self._values.pop(key, None)
        super().add(value)
        self._stamps[key] = self._now()


class _TtlListState(_TtlState, ListState[T]):
    def _fresh_stamp(self, entry: Any, now: int) -> Any:
        return [now] * len(entry)

    def _purge(self, key: Any, now: int) -> None:
        stamps = self._stamps[key]
        ttl = self._ttl_ms
        if all(now - stamp < ttl for stamp in stamps):
            return
        values = self._values[key]
        kept = [i for i, stamp in enumerate(stamps) if now - stamp < ttl]
        if kept:
            self._values[key] = [values[i] for i in kept]
            self._stamps[key] = [stamps[i] for i in kept]
        else:
            self._forget(key)

    def get(self) -> list[T]:
        key = self._backend.current_key
        values = self._values.get(key)
        if values is None:
            return []
        now = self._now()
        everything = list(values)
        self._purge(key, now)
        if self._refresh_on_read and key in self._stamps:
            self._stamps[key] = [now] * len(self._stamps[key])
        return everything if self._return_expired else list(self._values.get(key, ()))

    def _peek(self, key: Any) -> Any:
        values = self._values.get(key)
        if values is None:
            return _ABSENT
        now, ttl = self._now(), self._ttl_ms
        fresh = [v for v, s in zip(values, self._stamps[key], strict=True) if now - s < ttl]
        return fresh or _ABSENT

    def add(self, value: T) -> None:
        super().add(value)
        self._stamps.setdefault(self._backend.current_key, []).append(self._now())

    def add_all(self, values: list[T]) -> None:
        items = list(values)
        if not items:
            return  # no empty entry, which would never expire
        super().add_all(items)
        self._stamps.setdefault(self._backend.current_key, []).extend([self._now()] * len(items))

    def update(self, values: list[T]) -> None:
        items = list(values)
        super().update(items)
        key = self._backend.current_key
        if items:
            self._stamps[key] = [self._now()] * len(items)
        else:
            self._stamps.pop(key, None)


class _TtlMapState(_TtlState, MapState[K, V]):
    def _fresh_stamp(self, entry: Any, now: int) -> Any:
        return dict.fromkeys(entry, now)

    def _purge(self, key: Any, now: int) -> None:
        stamps = self._stamps[key]
        ttl = self._ttl_ms
        expired = [user_key for user_key, stamp in stamps.items() if now - stamp >= ttl]
        if not expired:
            return
        if len(expired) == len(stamps):
            self._forget(key)
            return
        entries = self._values[key]
        for user_key in expired:
            del entries[user_key]
            del stamps[user_key]

    def _map(self) -> dict[K, V]:
        """The current key's live entries (expired ones removed), refreshed if reads count."""
        key = self._backend.current_key
        entries = self._values.get(key)
        if entries is None:
            return {}
        now = self._now()
        everything = dict(entries)
        self._purge(key, now)
        live: dict[K, V] = self._values.get(key) or {}
        if self._refresh_on_read and live:
            self._stamps[key] = dict.fromkeys(live, now)
        return everything if self._return_expired else live

    def get(self, user_key: K, default: V | None = None) -> V | None:
        key = self._backend.current_key
        entries = self._values.get(key)
        if entries is None or user_key not in entries:
            return default
        stamps = self._stamps[key]
        now = self._now()
        if now - stamps[user_key] >= self._ttl_ms:
            value = entries.pop(user_key)
            del stamps[user_key]
            if not entries:
                self._forget(key)
            return value if self._return_expired else default
        if self._refresh_on_read:
            stamps[user_key] = now
        live: V = entries[user_key]
        return live

    def contains(self, user_key: K) -> bool:
        return self.get(user_key, _ABSENT) is not _ABSENT

    def _peek(self, key: Any) -> Any:
        entries = self._values.get(key)
        if entries is None:
            return _ABSENT
        now, ttl = self._now(), self._ttl_ms
        stamps = self._stamps[key]
        fresh = {k: v for k, v in entries.items() if now - stamps[k] < ttl}
        return fresh or _ABSENT

    def put(self, user_key: K, value: V) -> None:
        super().put(user_key, value)
        self._stamps.setdefault(self._backend.current_key, {})[user_key] = self._now()

    def put_all(self, entries: dict[K, V]) -> None:
        items = dict(entries)
        if not items:
            return  # no empty entry, which would never expire
        super().put_all(items)
        self._stamps.setdefault(self._backend.current_key, {}).update(
            dict.fromkeys(items, self._now())
        )

    def remove(self, user_key: K) -> None:
        super().remove(user_key)
        key = self._backend.current_key
        stamps = self._stamps.get(key)
        if stamps is not None:
            stamps.pop(user_key, None)
            if not stamps:
                del self._stamps[key]


_STATE_CLASSES: dict[str, type[_KeyedState]] = {
    "value": ValueState,
    "list": ListState,
    "map": MapState,
    "reducing": ReducingState,
}

_TTL_STATE_CLASSES: dict[str, type[_TtlState]] = {
    "value": _TtlValueState,
    "list": _TtlListState,
    "map": _TtlMapState,
    "reducing": _TtlReducingState,
}


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class KeyedStateView:
    """One key's state, read-only, as a cleanup rule sees it: ``view[name]`` is the value of a
    value or reducing state, a list state's list, a map state's dict (copies), by state name.
    Reading never refreshes a TTL, and expired entries are absent."""

    __slots__ = ("_backend", "key")

    def __init__(self, backend: KeyedStateBackend, key: Any) -> None:
        self._backend = backend
        self.key = key

    def get(self, name: str, default: Any = None) -> Any:
        state = self._backend._states.get(name)
        if state is None:
            return default
        entry = state._peek(self.key)
        return default if entry is _ABSENT else entry

    def __getitem__(self, name: str) -> Any:
        entry = self.get(name, _ABSENT)
        if entry is _ABSENT:
            raise KeyError(name)
        return entry

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name, _ABSENT) is not _ABSENT

    def __repr__(self) -> str:
        names = [name for name in sorted(self._backend._states) if name in self]
        return f"KeyedStateView(key={self.key!r}, {{{', '.join(f'{n!r}: {self[n]!r}' for n in names)}}})"


CleanupRule = Callable[[Any, KeyedStateView], bool]
"""``rule(key, state) -> bool``: True clears all of ``key``'s state in the operator."""


class KeyedStateBackend:
    """All keyed state of one operator in one subtask, in memory.

    The operator sets the current key before calling user code; state objects read and write the
    entry of that key. ``owner`` names the operator (name and uid) and subtask in error messages.
    Restored state that does not fit (another kind, keys of another type) is refused with
    :class:`IncompatibleStateError`, or dropped with a warning if ``allow_non_restored_state``.
    ``now_ms`` is the processing time that state TTLs expire by (the job's clock; the wall
    clock if not given).
    """

    def __init__(
        self,
        owner: str,
        key_groups: KeyGroupRange,
        max_parallelism: int,
        allow_non_restored_state: bool = False,
        now_ms: Callable[[], int] | None = None,
    ) -> None:
        self.owner = owner
        self.key_groups = key_groups
        self.max_parallelism = max_parallelism
        self.allow_non_restored_state = allow_non_restored_state
        self.now_ms: Callable[[], int] = now_ms or _wall_clock_ms
        self.current_key: Any = None
        self._states: dict[str, _KeyedState] = {}
        self._ttl_states: list[_TtlState] = []
        self._cleanup_rule: CleanupRule | None = None
        self._rule_round: list[Any] = []
        self._rule_round_at = 0
        self._restored: dict[str, dict[Any, Any]] = {}
        self._restored_stamps: dict[str, dict[Any, Any]] = {}
        self._restored_kinds: dict[str, str] = {}
        self.restored_key_types: frozenset[str] = frozenset()
        """Key types of the restored state, over every old subtask; empty if there was none or
        the snapshot predates key types (then keys are not checked)."""

    def set_current_key(self, key: Any) -> None:
        self.current_key = key

    def get_state(self, descriptor: StateDescriptor) -> Any:
        """The state object for ``descriptor``; the same object on every call with the same name."""
        existing = self._states.get(descriptor.name)
        if existing is not None:
            if existing._descriptor.kind != descriptor.kind:
                msg = (
                    f"{self.owner}: state {descriptor.name!r} is already registered as "
                    f"{existing._descriptor.kind} state, not {descriptor.kind} state"
                )
                raise ValueError(msg)
            return existing
        if descriptor.ttl is not None:
            state: _KeyedState = _TTL_STATE_CLASSES[descriptor.kind](self, descriptor)
        else:
            state = _STATE_CLASSES[descriptor.kind](self, descriptor)
        restored = self._restored.pop(descriptor.name, None)
        restored_stamps = self._restored_stamps.pop(descriptor.name, {})
        restored_kind = self._restored_kinds.pop(descriptor.name, _UNKNOWN_KIND)
        if restored is not None and restored_kind not in (_UNKNOWN_KIND, descriptor.kind):
            problem = (
                f"{self.owner}: state {descriptor.name!r} was restored as {restored_kind} state "
                f"but is now declared as {descriptor.kind} state"
            )
            if not self.allow_non_restored_state:
                msg = (
                    f"{problem}; declare it as {restored_kind} state again (or under a new "
                    "name), or pass --allow-non-restored-state to drop the restored state and "
                    "start it empty"
                )
                raise IncompatibleStateError(msg)
            log.warning("%s; --allow-non-restored-state: it starts empty", problem)
            restored = None
        if restored is not None:
            serializer = descriptor.serializer
            if serializer is None:
                state._values = restored
                if type(state) is ValueState:
                    state._plain = set(map(type, restored.values())) <= PLAIN_TYPES
            else:
                state._values = {k: serializer.from_data(v) for k, v in restored.items()}
        if isinstance(state, _TtlState):
            state._stamp_restored(restored_stamps, self.now_ms())
            self._ttl_states.append(state)
        self._states[descriptor.name] = state
        return state

    def set_cleanup_rule(self, rule: CleanupRule | None) -> None:
        """Clear all of a key's state when ``rule(key, view)`` holds. Operators check it after
        each record of the key (:meth:`check_cleanup_rule`), and the background cleanup checks
        idle keys a few at a time. ``None`` removes the rule."""
        self._cleanup_rule = rule

    @property
    def has_cleanup_rule(self) -> bool:
        return self._cleanup_rule is not None

    def check_cleanup_rule(self, key: Any) -> bool:
        """Apply the cleanup rule to ``key``; True if it held and the key's state was cleared.
        Exceptions from the rule propagate (the operator names itself and the record)."""
        rule = self._cleanup_rule
        if rule is None or not rule(key, KeyedStateView(self, key)):
            return False
        self.clear_key(key)
        return True

    def clear_key(self, key: Any) -> None:
        """Remove ``key``'s entries from every state of this backend, restored ones included."""
        for state in self._states.values():
            state._forget(key)
        for entries in self._restored.values():
            entries.pop(key, None)
        for stamps in self._restored_stamps.values():
            stamps.pop(key, None)

    def cleanup_incrementally(self) -> None:
        """One bounded step of background cleanup (keyed operators call it after each buffer):
        the next ``cleanup_size`` entries of each state with a TTL lose what expired, and the
        next keys are checked against the cleanup rule. Costs nothing without either."""
        if self._ttl_states:
            now = self.now_ms()
            for state in self._ttl_states:
                state._cleanup_step(now)
        if self._cleanup_rule is not None:
            self._rule_step()

    def _rule_step(self) -> None:
        keys, at = self._rule_round, self._rule_round_at
        if at >= len(keys):
            seen: dict[Any, None] = {}
            for state in self._states.values():
                seen.update(dict.fromkeys(state._values))
            keys = self._rule_round = list(seen)
            at = 0
        end = at + DEFAULT_RULE_CLEANUP_SIZE
        self._rule_round_at = end
        for key in keys[at:end]:
            self.check_cleanup_rule(key)

    def keys(self, state_name: str) -> Iterator[Any]:
        """The keys that have an entry in ``state_name`` (a live one, for state with a TTL)."""
        state = self._states.get(state_name)
        if state is None:
            return iter(())
        if isinstance(state, _TtlState):
            return iter([key for key in state._values if state._peek(key) is not _ABSENT])
        return iter(list(state._values))

    def snapshot(self) -> dict[str, Any]:
        """``{state name: {"kind", "key_types", "keys", "values"}}``: two parallel columns.

        Columns (not one small list per entry) keep encoding fast, and the key group of each entry
        is not stored: snapshots are frequent and restores rare, so a restore recomputes it
        (``stable_hash`` is the same in every process) and keeps the entries of the key groups it
        owns, at any parallelism. ``kind`` and ``key_types`` (sorted type names) let a restore
        refuse state that the job would not find again.

        A state whose keys are those of a state before it (the same key objects in the same
        order: the states of an operator are usually written together) has ``"keys_of": that
        state's name`` instead of its own ``"keys"``, so that every key is scanned and encoded
        once instead of once per state. :func:`with_shared_keys` gives each entry its ``"keys"``
        back.
        """
        result: dict[str, Any] = {}
        # (state name, keys) of the entries written with keys of their own.
        key_columns: list[tuple[str, list[Any]]] = []
        now = self.now_ms() if self._ttl_states else 0
        for name in sorted(set(self._states) | set(self._restored)):
            state = self._states.get(name)
            stamps: dict[Any, Any] | None
            if state is None:
                # Restored state that this run never declared: carried forward unchanged, so that
                # a later version of the job can still read it.
                values, serializer = self._restored[name], None
                kind = self._restored_kinds.get(name, _UNKNOWN_KIND)
                stamps = self._restored_stamps.get(name)
            else:
                values = state._values
                kind = state._descriptor.kind
                serializer = state._descriptor.serializer
                stamps = None
                if isinstance(state, _TtlState):
                    # Expired entries stay out of the checkpoint (and out of memory).
                    state._purge_all(now)
                    stamps = state._stamps
            column: list[Any]
            if serializer is not None:
                column = [serializer.to_data(v) for v in values.values()]
            elif type(state) is ValueState and state._plain:
                column = PlainColumn(values.values())
            else:
                column = list(values.values())
            keys = list(values)
            owner = next((n for n, earlier in key_columns if _same_keys(keys, earlier)), None)
            if owner is None:
                key_columns.append((name, keys))
                types = set(map(type, keys))
                key_types = sorted({_key_type_name(t) for t in types})
                result[name] = {
                    "kind": kind,
                    "key_types": key_types,
                    "keys": PlainColumn(keys) if types <= PLAIN_TYPES else keys,
                }
            else:
                key_types = result[owner]["key_types"]
                result[name] = {"kind": kind, "key_types": key_types, "keys_of": owner}
            result[name]["values"] = column
            if stamps is not None:
                # Each entry's TTL timestamps, parallel to "values", so expiry survives restores.
                result[name]["ttl_stamps"] = [stamps[key] for key in values]
        return result

    def restore(self, snapshots: list[dict[str, Any]]) -> None:
        """Take the entries of this backend's key groups from every given snapshot."""
        first, last = self.key_groups.start, self.key_groups.end
        maxp = self.max_parallelism
        owned: dict[Any, bool] = {}
        key_types: set[str] = set(self.restored_key_types)
        for snapshot in snapshots:
            for name, entry in with_shared_keys(snapshot).items():
                target = self._restored.setdefault(name, {})
                kind = entry.get("kind", _UNKNOWN_KIND)
                if kind != _UNKNOWN_KIND:
                    self._restored_kinds[name] = kind
                key_types.update(entry.get("key_types", ()))
                for key, value in zip(entry["keys"], entry["values"], strict=True):
                    mine = owned.get(key)
                    if mine is None:
                        mine = owned[key] = first <= key_group_for_key(key, maxp) <= last
                    if mine:
                        target[key] = value
                stamps = entry.get("ttl_stamps")
                if stamps is not None:
                    restored_stamps = self._restored_stamps.setdefault(name, {})
                    for key, stamp in zip(entry["keys"], stamps, strict=True):
                        if owned[key]:
                            restored_stamps[key] = stamp
        self.restored_key_types = frozenset(key_types)

    def check_first_key(self, key: Any) -> bool:
        """Check the first key of this run against the restored key types (call it once).

        A key of a type the restored state never had means the key selector changed: the
        restored entries would never be found again. Refused with :class:`IncompatibleStateError`;
        with ``allow_non_restored_state`` all keyed state is dropped (with a warning) and True is
        returned, so that the operator drops its timers too.
        """
        restored = self.restored_key_types
        new_type = _key_type_name(type(key))
        if not restored or new_type in restored:
            return False
        old_types = ", ".join(sorted(restored))
        problem = (
            f"{self.owner}: the restored keyed state has keys of key type {old_types}, but the "
            f"first key of this run, {key!r}, has the new key type {new_type}: the key selector "
            "changed, so the restored state would never be found"
        )
        if not self.allow_non_restored_state:
            msg = (
                f"{problem}; restore with the old key_by(), or pass --allow-non-restored-state "
                "to drop this operator's keyed state and timers and start them empty"
            )
            raise IncompatibleStateError(msg)
        log.warning(
            "%s; --allow-non-restored-state: this operator drops the restored keyed state and "
            "timers and starts them empty",
            problem,
        )
        self.drop_all()
        return True

    def drop_all(self) -> None:
        """Forget every entry of every state, restored or written, and the restored key types."""
        for state in self._states.values():
            state._values.clear()
            if isinstance(state, _TtlState):
                state._stamps.clear()
        self._restored.clear()
        self._restored_stamps.clear()
        self._restored_kinds.clear()
        self.restored_key_types = frozenset()
