"""Operator (non-keyed) state: list state with even-split or union redistribution, broadcast state.

A subtask's operator state is a set of named lists. On restore at another parallelism the lists of
all old subtasks are concatenated and then either split evenly in order (``EVEN_SPLIT``) or given
whole to every new subtask (``UNION``). Broadcast state is one dict that every subtask holds the same
copy of (each subtask writes its own copy into a checkpoint); on restore new subtask *i* gets the
whole copy of old subtask *i* modulo the old subtasks that were still running (Flink's choice: at the
same or a lower parallelism each subtask reads its own copy, the extra ones of a higher parallelism
read the old copies round robin), so every new subtask holds every entry.
"""

from __future__ import annotations

import enum
from typing import Any

from state.refusal import RestoreRefusedError
from state.serde import StateSerializer, check_state_value


class Redistribution(enum.StrEnum):
    EVEN_SPLIT = "even-split"
    UNION = "union"
    BROADCAST = "broadcast"


class OperatorListState:
    """A named list owned by one subtask, redistributed on restore by its mode."""

    def __init__(self, name: str, mode: Redistribution, owner: str = "") -> None:
        self.name = name
        self.mode = mode
        self.owner = owner
        """The operator and subtask, for error messages."""
        self.items: list[Any] = []

    def get(self) -> list[Any]:
        return list(self.items)

    def add(self, item: Any) -> None:
        check_state_value(item, self.owner, "operator list", self.name)
        self.items.append(item)

    def update(self, items: list[Any]) -> None:
        new_items = list(items)
        check_state_value(new_items, self.owner, "operator list", self.name)
        self.items = new_items

    def clear(self) -> None:
        self.items = []


class ReadOnlyStateError(RuntimeError):
    """A write through a read-only view of state (broadcast state outside the broadcast side)."""


class _BroadcastReads:
    """The reads of broadcast state, shared by the state and its read-only view."""

    __slots__ = ()

    def _entries(self) -> dict[Any, Any]:
        raise NotImplementedError

    def get(self, key: Any, default: Any = None) -> Any:
        return self._entries().get(key, default)

    def contains(self, key: Any) -> bool:
        return key in self._entries()

    def __contains__(self, key: object) -> bool:
        return key in self._entries()

    def __len__(self) -> int:
        return len(self._entries())

    def items(self) -> list[tuple[Any, Any]]:
        return list(self._entries().items())

    def keys(self) -> list[Any]:
        return list(self._entries())

    def values(self) -> list[Any]:
        return list(self._entries().values())


class BroadcastState(_BroadcastReads):
    """A dict that every subtask of the operator holds identically.

    ``serializer`` (of the state's descriptor) turns the whole dict into what a snapshot holds
    and back, as for keyed map state; without one every key and value is checked when written."""

    __slots__ = ("entries", "name", "owner", "serializer")

    def __init__(
        self, name: str, owner: str = "", serializer: StateSerializer | None = None
    ) -> None:
        self.name = name
        self.owner = owner
        """The operator and subtask, for error messages."""
        self.serializer = serializer
        self.entries: dict[Any, Any] = {}

    def _entries(self) -> dict[Any, Any]:
        return self.entries

    def put(self, key: Any, value: Any) -> None:
        if self.serializer is None:
            check_state_value(key, self.owner, "broadcast", self.name)
            check_state_value(value, self.owner, "broadcast", self.name)
        self.entries[key] = value

    def put_all(self, entries: dict[Any, Any]) -> None:
        for key, value in dict(entries).items():
            self.put(key, value)

    def remove(self, key: Any) -> None:
        self.entries.pop(key, None)

    def clear(self) -> None:
        self.entries.clear()

    def read_only(self, where: str) -> ReadOnlyBroadcastState:
        """A view that refuses writes, naming ``where`` (the operator and subtask)."""
        return ReadOnlyBroadcastState(self, where)

    def snapshot(self) -> dict[str, Any]:
        entries: Any = dict(self.entries)
        if self.serializer is not None:
            entries = self.serializer.to_data(entries)
        return {"mode": Redistribution.BROADCAST.value, "entries": entries}


class ReadOnlyBroadcastState(_BroadcastReads):
    """A read-only view of a :class:`BroadcastState`: what the non-broadcast side of a broadcast
    process function sees (every subtask must change the state alike, so only the broadcast side
    may). Values are the state's own objects: do not change them in place."""

    __slots__ = ("_state", "_where")

    def __init__(self, state: BroadcastState, where: str) -> None:
        self._state = state
        self._where = where

    def _entries(self) -> dict[Any, Any]:
        return self._state.entries

    @property
    def name(self) -> str:
        return self._state.name

    def _refuse(self, what: str) -> None:
        msg = (
            f"{self._where}: cannot {what} broadcast state {self._state.name!r} outside "
            "process_broadcast_element(): this view of it is read-only; change it there, which "
            "every subtask runs for each broadcast record, so that all subtasks keep the same "
            "state"
        )
        raise ReadOnlyStateError(msg)

    def put(self, key: Any, value: Any) -> None:
        self._refuse("put into")

    def put_all(self, entries: dict[Any, Any]) -> None:
        self._refuse("put into")

    def remove(self, key: Any) -> None:
        self._refuse("remove from")

    def clear(self) -> None:
        self._refuse("clear")


class OperatorStateStore:
    """The operator state of one operator in one subtask."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._lists: dict[str, OperatorListState] = {}
        self._broadcast: dict[str, BroadcastState] = {}
        self._restored: dict[str, Any] = {}

    def get_list_state(
        self, name: str, mode: Redistribution = Redistribution.EVEN_SPLIT
    ) -> OperatorListState:
        state = self._lists.get(name)
        if state is None:
            state = OperatorListState(name, mode, f"operator {self.owner}")
            restored = self._restored.pop(name, None)
            if restored is not None:
                if restored["mode"] != mode.value:
                    msg = (
                        f"{self.owner}: operator state {name!r} was written with "
                        f"{restored['mode']} redistribution, now asked for as {mode.value}"
                    )
                    raise ValueError(msg)
                state.items = list(restored["items"])
            self._lists[name] = state
        return state

    def get_union_list_state(self, name: str) -> OperatorListState:
        return self.get_list_state(name, Redistribution.UNION)

    def get_broadcast_state(
        self, name: str, serializer: StateSerializer | None = None
    ) -> BroadcastState:
        """The broadcast state ``name``, with its restored entries the first time. Restored state
        of that name that is not broadcast state (list state) is refused with a
        :class:`~state.refusal.RestoreRefusedError`."""
        state = self._broadcast.get(name)
        if state is None:
            state = BroadcastState(name, f"operator {self.owner}", serializer)
            restored = self._restored.get(name)
            if restored is not None:
                if restored["mode"] != Redistribution.BROADCAST.value:
                    msg = (
                        f"{self.owner}: operator state {name!r} was restored as "
                        f"{restored['mode']} list state but is now asked for as broadcast state; "
                        "give the broadcast state another name, or declare it as list state again"
                    )
                    raise RestoreRefusedError(msg)
                entries = restored["entries"]
                state.entries = dict(serializer.from_data(entries) if serializer else entries)
                del self._restored[name]
            self._broadcast[name] = state
        return state

    @property
    def uses_union_state(self) -> bool:
        declared = any(s.mode is Redistribution.UNION for s in self._lists.values())
        return declared or has_union_state(self._restored)

    def snapshot(self) -> dict[str, Any]:
        result: dict[str, Any] = dict(self._restored)
        for name, lst in self._lists.items():
            result[name] = {"mode": lst.mode.value, "items": list(lst.items)}
        for name, bcast in self._broadcast.items():
            result[name] = bcast.snapshot()
        return result

    def restore(self, snapshot: dict[str, Any]) -> None:
        self._restored = dict(snapshot)


def has_union_state(snapshot: dict[str, Any]) -> bool:
    """Whether an :meth:`OperatorStateStore.snapshot` holds union list state."""
    return any(entry.get("mode") == Redistribution.UNION.value for entry in snapshot.values())


def list_state_items(snapshot: dict[str, Any], name: str) -> list[Any]:
    """The items of list state ``name`` in an :meth:`OperatorStateStore.snapshot` (none if absent)."""
    return list(snapshot.get(name, {}).get("items", []))


def redistribute_operator_state(
    old: list[dict[str, Any]], new_parallelism: int
) -> list[dict[str, Any]]:
    """Split the operator state of the old subtasks over ``new_parallelism`` new subtasks.

    ``old`` holds one snapshot per old subtask that was still running (finished subtasks are left
    out by the caller, see FLIP-147). Even-split lists are concatenated in subtask order and cut into
    contiguous, near-equal parts; union lists are concatenated and given whole to everyone;
    broadcast state: new subtask *i* takes the whole copy of given subtask *i* modulo their
    number (see the module docstring).
    """
    result: list[dict[str, Any]] = [{} for _ in range(new_parallelism)]
    names: list[str] = []
    for snapshot in old:
        for name in snapshot:
            if name not in names:
                names.append(name)
    for name in names:
        entries = [s[name] for s in old if name in s]
        mode = entries[0]["mode"]
        if mode == Redistribution.BROADCAST.value:
            for index, target in enumerate(result):
                copy = entries[index % len(entries)]["entries"]
                target[name] = {
                    "mode": mode,
                    "entries": dict(copy) if isinstance(copy, dict) else copy,
                }
            continue
        items = [item for e in entries for item in e["items"]]
        if mode == Redistribution.UNION.value:
            for target in result:
                target[name] = {"mode": mode, "items": list(items)}
            continue
        base, extra = divmod(len(items), new_parallelism)
        start = 0
        for index, target in enumerate(result):
            size = base + (1 if index < extra else 0)
            target[name] = {"mode": mode, "items": items[start : start + size]}
            start += size
    return result
