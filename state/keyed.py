"""Keyed state: value, list, map and reducing state scoped to the current key.

The in-memory backend keeps one dict per state, keyed by the user's key. Every key belongs to the
key group ``stable_hash(key) % max_parallelism``; a subtask only ever holds keys of the key groups
it owns, and a restore at any parallelism keeps exactly the entries of its key groups. The key
group is computed when routing and when restoring, never per snapshot.

Threading model: a backend belongs to one operator of one subtask and is only touched by that
subtask's actor, so nothing here locks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from state.keygroups import KeyGroupRange, key_group_for_key
from state.refusal import RestoreRefusedError
from state.serde import (
    SNAPSHOT_SCALAR_TYPES,
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

log = logging.getLogger(__name__)

_UNKNOWN_KIND = "restored"
"""The kind that snapshots before state kinds were recorded gave carried-along state."""


class IncompatibleStateError(RestoreRefusedError):
    """Restored keyed state does not fit the job: a state re-declared with another kind, or keys
    of another type. The message names the operator, the state or key types, and the way out."""


def _key_type_name(key_type: type) -> str:
    """The name of a key type as a snapshot stores it: a subclass by the base type it is encoded
    as (a ``StrEnum`` key comes back from a snapshot as ``str``)."""
    if issubclass(key_type, bytearray | memoryview):
        return "bytes"
    return "None" if key_type is type(None) else encoded_type(key_type).__name__


@dataclass(frozen=True)
class ValueStateDescriptor(Generic[T]):
    name: str
    default: T | None = None
    serializer: StateSerializer | None = None
    kind: str = field(default="value", init=False)


@dataclass(frozen=True)
class ListStateDescriptor(Generic[T]):
    name: str
    serializer: StateSerializer | None = None
    kind: str = field(default="list", init=False)


@dataclass(frozen=True)
class MapStateDescriptor(Generic[K, V]):
    name: str
    serializer: StateSerializer | None = None
    kind: str = field(default="map", init=False)


@dataclass(frozen=True)
class ReducingStateDescriptor(Generic[T]):
    name: str
    reduce_fn: Callable[[T, T], T]
    serializer: StateSerializer | None = None
    kind: str = field(default="reducing", init=False)


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

    def _check_value(self, value: Any) -> None:
        """Refuse now what the next snapshot could not hold, unless a serializer converts it."""
        descriptor = self._descriptor
        if descriptor.serializer is None:
            check_state_value(value, self._backend.owner, descriptor.kind, descriptor.name)


class ValueState(_KeyedState, Generic[T]):
    """One value per key."""

    __slots__ = ()

    def value(self) -> T | None:
        return self._values.get(self._backend.current_key, self._descriptor.default)  # type: ignore[union-attr]

    def update(self, value: T | None) -> None:
        if value is None:
            self._values.pop(self._backend.current_key, None)
        else:
            if type(value) not in _SCALARS:
                self._check_value(value)
            self._values[self._backend.current_key] = value


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


_STATE_CLASSES: dict[str, type[_KeyedState]] = {
    "value": ValueState,
    "list": ListState,
    "map": MapState,
    "reducing": ReducingState,
}


class KeyedStateBackend:
    """All keyed state of one operator in one subtask, in memory.

    The operator sets the current key before calling user code; state objects read and write the
    entry of that key. ``owner`` names the operator (name and uid) and subtask in error messages.
    Restored state that does not fit (another kind, keys of another type) is refused with
    :class:`IncompatibleStateError`, or dropped with a warning if ``allow_non_restored_state``.
    """

    def __init__(
        self,
        owner: str,
        key_groups: KeyGroupRange,
        max_parallelism: int,
        allow_non_restored_state: bool = False,
    ) -> None:
        self.owner = owner
        self.key_groups = key_groups
        self.max_parallelism = max_parallelism
        self.allow_non_restored_state = allow_non_restored_state
        self.current_key: Any = None
        self._states: dict[str, _KeyedState] = {}
        self._restored: dict[str, dict[Any, Any]] = {}
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
        state = _STATE_CLASSES[descriptor.kind](self, descriptor)
        restored = self._restored.pop(descriptor.name, None)
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
            else:
                state._values = {k: serializer.from_data(v) for k, v in restored.items()}
        self._states[descriptor.name] = state
        return state

    def keys(self, state_name: str) -> Iterator[Any]:
        """The keys that have an entry in ``state_name``."""
        state = self._states.get(state_name)
        return iter(list(state._values)) if state is not None else iter(())

    def snapshot(self) -> dict[str, Any]:
        """``{state name: {"kind", "key_types", "keys", "values"}}``: two parallel columns.

        Columns (not one small list per entry) keep encoding fast, and the key group of each entry
        is not stored: snapshots are frequent and restores rare, so a restore recomputes it
        (``stable_hash`` is the same in every process) and keeps the entries of the key groups it
        owns, at any parallelism. ``kind`` and ``key_types`` (sorted type names) let a restore
        refuse state that the job would not find again.
        """
        result: dict[str, Any] = {}
        for name in sorted(set(self._states) | set(self._restored)):
            state = self._states.get(name)
            if state is None:
                # Restored state that this run never declared: carried forward unchanged, so that
                # a later version of the job can still read it.
                values, serializer = self._restored[name], None
                kind = self._restored_kinds.get(name, _UNKNOWN_KIND)
            else:
                values = state._values
                kind = state._descriptor.kind
                serializer = state._descriptor.serializer
            column = list(values.values())
            if serializer is not None:
                column = [serializer.to_data(v) for v in column]
            result[name] = {
                "kind": kind,
                "key_types": sorted({_key_type_name(t) for t in set(map(type, values))}),
                "keys": list(values),
                "values": column,
            }
        return result

    def restore(self, snapshots: list[dict[str, Any]]) -> None:
        """Take the entries of this backend's key groups from every given snapshot."""
        first, last = self.key_groups.start, self.key_groups.end
        maxp = self.max_parallelism
        owned: dict[Any, bool] = {}
        key_types: set[str] = set(self.restored_key_types)
        for snapshot in snapshots:
            for name, entry in snapshot.items():
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
        self._restored.clear()
        self._restored_kinds.clear()
        self.restored_key_types = frozenset()
