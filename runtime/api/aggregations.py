"""The rolling aggregations of a keyed stream by field: ``sum``, ``min``, ``max``, ``min_by`` and
``max_by`` (Flink's ``KeyedStream`` aggregations), as reduce functions that the keyed reduce
operator runs, so they emit after every record and keep their running value in keyed state.

A field is a dict key, a tuple (or list) index, or an attribute name (named tuples; objects of
other classes only with a state serializer, since the running value is keyed state, which holds
msgpack-encodable values). ``sum``, ``min`` and ``max`` keep the other fields of the key's first record and
update only the field; ``min_by`` and ``max_by`` keep the whole record holding the extreme (the
first one on ties). Records are never modified in place: an updated record is a copy.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

Field = int | str
"""A dict key or attribute name (str), or a tuple or list index (int)."""

_KINDS = ("sum", "min", "max", "min_by", "max_by")


def check_field(method: str, field: Any) -> None:
    """Refuse, when the job is built, a field that cannot name one: ``TypeError`` naming
    ``method``."""
    if isinstance(field, bool) or not isinstance(field, int | str) or field == "":
        msg = (
            f"{method}: the field must be a dict key or attribute name (str) or a tuple index "
            f"(int), got {field!r}"
        )
        raise TypeError(msg)


def _describe(record: Any) -> str:
    text = repr(record)
    return text if len(text) <= 120 else text[:117] + "..."


def read_field(record: Any, field: Field) -> Any:
    """``record``'s ``field``; ``LookupError`` naming the field and the record if it has none."""
    try:
        if isinstance(field, int) or isinstance(record, Mapping):
            return record[field]
        return getattr(record, field)
    except (LookupError, AttributeError, TypeError):
        kind = "index" if isinstance(field, int) else "field"
        msg = f"record {_describe(record)} has no {kind} {field!r}"
        raise LookupError(msg) from None


def with_field(record: Any, field: Field, value: Any) -> Any:
    """A copy of ``record`` whose ``field`` is ``value`` (of the same type: a named tuple stays
    one, a dataclass is replaced, other objects are shallow-copied)."""
    if isinstance(record, dict):
        updated = copy.copy(record)
        updated[field] = value
        return updated
    if isinstance(field, int) and isinstance(record, tuple | list):
        items = list(record)
        items[field] = value
        if isinstance(record, list):
            return items
        make = getattr(type(record), "_make", None)
        return make(items) if make is not None else tuple(items)
    assert isinstance(field, str)
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return dataclasses.replace(record, **{field: value})
    replace = getattr(record, "_replace", None)
    if replace is not None:
        return replace(**{field: value})
    updated = copy.copy(record)
    setattr(updated, field, value)
    return updated


class FieldAggregation:
    """The reduce function of one field aggregation: ``(running, record) -> running``."""

    def __init__(self, kind: str, field: Field) -> None:
        assert kind in _KINDS, kind
        self.kind = kind
        self.field = field

    def __call__(self, running: Any, record: Any) -> Any:
        field = self.field
        make = getattr(record, "_make", None) if type(running) is tuple else None
        if make is not None and isinstance(record, tuple):
            # Restored from a snapshot, which keeps a named tuple as a plain tuple.
            running = make(running)
        current = read_field(running, field)
        new = read_field(record, field)
        kind = self.kind
        if kind == "sum":
            return with_field(running, field, current + new)
        if kind == "min":
            return with_field(running, field, new) if new < current else running
        if kind == "max":
            return with_field(running, field, new) if new > current else running
        if kind == "min_by":
            return record if new < current else running
        return record if new > current else running

    def __repr__(self) -> str:
        return f"FieldAggregation({self.kind}, {self.field!r})"


def operator_label(kind: str, field: Field) -> str:
    """``Sum(amount)``, ``MinBy(0)``: the default name of the operator."""
    return f"{''.join(part.title() for part in kind.split('_'))}({field})"
