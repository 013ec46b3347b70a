"""The typed snapshot of one operator subtask, and one new subtask's share of it on restore.

This module is the one place that knows the layout of an operator's state file: a msgpack map
with up to three entries, each present only when the operator has that part::

    {"keyed": {...}, "operator": {...}, "timers": {...}}

``keyed`` is the :class:`~state.keyed.KeyedStateBackend` snapshot, ``operator`` the
:class:`~state.operator.OperatorStateStore` snapshot and ``timers`` the timer service's; what is
inside each part belongs to its owner. Checkpoints written before this type existed have exactly
this layout, so they restore unchanged. Whether a subtask had finished (FLIP-147) is not part of
the state file: the checkpoint metadata records it (``finished_subtasks``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from state.serde import packb_parts, unpackb

# The order today's operators wrote them in, so the encoded bytes stay the same too.
_PARTS = ("operator", "keyed", "timers")


class SnapshotLayoutError(ValueError):
    """Decoded state-file data does not have the operator snapshot layout; names where."""


@dataclass(frozen=True)
class OperatorSnapshot:
    """What one subtask of one operator writes into a checkpoint; a part is ``None`` when the
    operator has none (an empty part is kept: a sink's empty state still means "restore me")."""

    keyed: dict[str, Any] | None = None
    operator: dict[str, Any] | None = None
    timers: dict[str, Any] | None = None

    def parts(self) -> list[tuple[str, dict[str, Any]]]:
        """(part name, part) for each part present, in the layout's order."""
        present = [(name, getattr(self, name)) for name in _PARTS]
        return [(name, part) for name, part in present if part is not None]

    def to_data(self) -> dict[str, Any]:
        """The msgpack-ready map of the state file (only the parts present)."""
        return dict(self.parts())

    @classmethod
    def from_data(cls, data: Any, where: str = "operator snapshot") -> OperatorSnapshot:
        """Read the map :meth:`to_data` made (or a checkpoint of older code wrote: the same
        layout). Unknown entries are ignored, as they always were; a value that is not a map, or
        a part that is not one, raises :class:`SnapshotLayoutError` naming ``where``."""
        if not isinstance(data, dict):
            msg = f"{where}: expected a map of state parts, got {type(data).__name__}"
            raise SnapshotLayoutError(msg)
        parts: dict[str, dict[str, Any] | None] = {}
        for name in _PARTS:
            part = data.get(name)
            if part is not None and not isinstance(part, dict):
                msg = f"{where}: the {name} part must be a map, got {type(part).__name__}"
                raise SnapshotLayoutError(msg)
            parts[name] = part
        return cls(parts["keyed"], parts["operator"], parts["timers"])

    def encode(self) -> bytes:
        """The bytes of the state file."""
        return packb_parts(self.to_data())

    @classmethod
    def decode(cls, data: bytes, where: str = "operator snapshot") -> OperatorSnapshot:
        """Read the bytes :meth:`encode` wrote."""
        return cls.from_data(unpackb(data), where)


@dataclass(frozen=True)
class RestoredState:
    """One new subtask's share of an operator's checkpointed state.

    ``keyed`` and ``timers`` hold the parts of *every* old subtask (each new subtask keeps the key
    groups it owns); ``operator`` is this subtask's redistributed operator state, ``None`` if it
    gets none.
    """

    keyed: tuple[dict[str, Any], ...] = ()
    timers: tuple[dict[str, Any], ...] = ()
    operator: dict[str, Any] | None = None

    @property
    def is_empty(self) -> bool:
        return not self.keyed and not self.timers and self.operator is None
