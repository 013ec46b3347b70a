"""Keyed state: value, list, map and reducing state scoped to the current key.

The in-memory backend keeps one dict per state, keyed by the user's key. Every key belongs to the
key group ``stable_hash(key) % max_parallelism``; a subtask only ever holds keys of the key groups
it owns, and a restore at any parallelism keeps exactly the entries of its key groups. The key
group is computed when routing and when restoring, never per snapshot.

Threading model: a backend belongs to one operator of one subtask and is only touched by that
subtask's actor, so nothing here locks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from state.keygroups import KeyGroupRange, key_group_for_key
from state.serde import StateSerializer

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

_ABSENT: Any = object()


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


class ValueState(_KeyedState, Generic[T]):
    """One value per key."""

    __slots__ = ()

    def value(self) -> T | None:
        return self._values.get(self._backend.current_key, self._descriptor.default)  # type: ignore[union-attr]

    def update(self, value: T | None) -> None:
        if value is None:
            self._values.pop(self._backend.current_key, None)
        else:
            self._values[self._backend.current_key] = value


class ListState(_KeyedState, Generic[T]):
    """A list of values per key."""

    __slots__ = ()

    def get(self) -> list[T]:
        return list(self._values.get(self._backend.current_key, ()))

    def add(self, value: T) -> None:
        self._values.setdefault(self._backend.current_key, []).append(value)

    def add_all(self, values: list[T]) -> None:
        self._values.setdefault(self._backend.current_key, []).extend(values)

    def update(self, values: list[T]) -> None:
        if values:
            self._values[self._backend.current_key] = list(values)
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
        self._values.setdefault(self._backend.current_key, {})[user_key] = value

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
        self._values[key] = value if current is _ABSENT else self._reduce(current, value)


_STATE_CLASSES: dict[str, type[_KeyedState]] = {
    "value": ValueState,
    "list": ListState,
    "map": MapState,
    "reducing": ReducingState,
}


class KeyedStateBackend:
    """All keyed state of one operator in one subtask, in memory.

    The operator sets the current key before calling user code; state objects read and write the
    entry of that key. ``owner`` names the operator and subtask in error messages.
    """

    def __init__(self, owner: str, key_groups: KeyGroupRange, max_parallelism: int) -> None:
        self.owner = owner
        self.key_groups = key_groups
        self.max_parallelism = max_parallelism
        self.current_key: Any = None
        self._states: dict[str, _KeyedState] = {}
        self._restored: dict[str, dict[Any, Any]] = {}

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
        """``{state name: {"kind", "keys", "values"}}``: two parallel columns.

        Columns (not one small list per entry) keep encoding fast, and the key group of each entry
        is not stored: snapshots are frequent and restores rare, so a restore recomputes it
        (``stable_hash`` is the same in every process) and keeps the entries of the key groups it
        owns, at any parallelism.
        """
        result: dict[str, Any] = {}
        for name in sorted(set(self._states) | set(self._restored)):
            state = self._states.get(name)
            if state is None:
                # Restored state that this run has not asked for yet: carry it forward unchanged.
                values, kind, serializer = self._restored[name], "restored", None
            else:
                values = state._values
                kind = state._descriptor.kind
                serializer = state._descriptor.serializer
            column = list(values.values())
            if serializer is not None:
                column = [serializer.to_data(v) for v in column]
            result[name] = {"kind": kind, "keys": list(values), "values": column}
        return result

    def restore(self, snapshots: list[dict[str, Any]]) -> None:
        """Take the entries of this backend's key groups from every given snapshot."""
        first, last = self.key_groups.start, self.key_groups.end
        maxp = self.max_parallelism
        owned: dict[Any, bool] = {}
        for snapshot in snapshots:
            for name, entry in snapshot.items():
                target = self._restored.setdefault(name, {})
                for key, value in zip(entry["keys"], entry["values"], strict=True):
                    mine = owned.get(key)
                    if mine is None:
                        mine = owned[key] = first <= key_group_for_key(key, maxp) <= last
                    if mine:
                        target[key] = value
