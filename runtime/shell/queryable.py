"""Queryable state: one key's keyed state as of a completed checkpoint, never the live state.

``GET /state/{uid}?key=K`` on the control endpoint reads the running job's latest completed
checkpoint (the one a failover would restore); ``python -m runtime state PATH --uid U --key K``
reads a checkpoint directory's latest valid checkpoint, or the checkpoint or savepoint folder
given, offline. Both answer the same JSON::

    {"uid": "word-counts", "operator": "count", "key": "be", "key_type": "str",
     "key_group": 17, "subtask": 1,
     "checkpoint": {"id": 3, "kind": "checkpoint", "timestamp_ms": ..., "path": ... | null},
     "state": {"reduce": {"kind": "value", "value": ["be", 2]}}}

The key arrives as text (a query parameter, a command-line argument) and is read as each key
type the operator's keyed state records, in this order: ``str`` (the text itself), then the text
as JSON (``42`` an int, ``4.5`` a float, ``true``, ``null``, ``["a", 1]`` a tuple key), then
``UUID``, ``Decimal``, ``datetime``/``date``/``time`` (ISO 8601) and ``bytes`` (the text in
UTF-8). The first reading that is a key of the state wins; the answer's ``key_type`` says which.

Values are the checkpointed ones as JSON: tuples and sets as arrays, date/time values in ISO 8601,
``Decimal`` and ``UUID`` as strings, ``bytes`` as text (UTF-8, else hex), map state as an object
(keys that are not strings JSON-encoded). A window operator's per-window state comes as a list of
``{"window": [start, end], "value": ...}``. State declared with a serializer shows what its
serializer stored.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import decimal
import json
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from runtime.api.window_operator import WINDOW_MAP
from state.keyed import with_shared_keys
from state.keygroups import (
    UnhashableKeyError,
    key_group_for_key,
    stable_hash,
    subtask_for_key_group,
)
from state.serde import encoded_type
from state.snapshot import OperatorSnapshot, SnapshotLayoutError
from state.storage import (
    METADATA,
    CompletedCheckpoint,
    InvalidCheckpointError,
    OperatorCheckpoint,
    find_latest_valid,
    find_newest_snapshot,
    list_checkpoint_folders,
    load_checkpoint,
)

WINDOW_STATE_NAMES = ("window-contents", "session-windows")
"""The window operator's own map states of a key: ``{window: value}``."""
WINDOW_STATE_PREFIXES = ("window/", "trigger/")
"""Per-window state of window functions and triggers, under these name prefixes."""


class StateQueryError(Exception):
    """A query that cannot be answered: ``status`` is the HTTP status (400: the request is
    wrong, 404: what it names does not exist), the message says what exists instead."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Reading:
    key: Any
    type_name: str


def key_type_name(key: Any) -> str:
    """A key's type as keyed snapshots record it (``key_types``): a subclass by the base type it
    is stored as."""
    if key is None:
        return "None"
    if isinstance(key, bytearray | memoryview):
        return "bytes"
    return encoded_type(type(key)).__name__


def _as_key(value: Any) -> Any:
    """A JSON value as a key: arrays are tuple keys (lists are no keys)."""
    if isinstance(value, list):
        return tuple(_as_key(item) for item in value)
    return value


_TEXT_READINGS: tuple[Callable[[str], Any], ...] = (
    uuid.UUID,
    decimal.Decimal,
    dt.datetime.fromisoformat,
    dt.date.fromisoformat,
    dt.time.fromisoformat,
    str.encode,
)


def key_readings(text: str) -> list[_Reading]:
    """Every way ``text`` can be read as a key, in the order the module docstring gives (only
    readings that are keys: with a stable hash)."""
    keys: list[Any] = [text]
    try:
        parsed = _as_key(json.loads(text))
    except ValueError:
        pass
    else:
        if not isinstance(parsed, str):
            keys.append(parsed)
    for read in _TEXT_READINGS:
        try:
            keys.append(read(text))
        except (ValueError, ArithmeticError):
            continue
    readings = []
    for key in keys:
        try:
            stable_hash(key)
        except UnhashableKeyError:
            continue  # e.g. a JSON object: no key_by() returns one
        readings.append(_Reading(key, key_type_name(key)))
    return readings


def query_state(checkpoint: CompletedCheckpoint, uid: str, key_text: str) -> dict[str, Any]:
    """The keyed state of ``key_text`` in operator ``uid`` of ``checkpoint`` as JSON (see the
    module docstring); raises :class:`StateQueryError` naming what exists instead."""
    where = f"{checkpoint.kind.value} {checkpoint.checkpoint_id}"
    operator = checkpoint.operators.get(uid)
    if operator is None:
        known = ", ".join(sorted(checkpoint.operators)) or "none"
        msg = f"no operator with uid {uid!r} in {where}; the operators it holds: {known}"
        raise StateQueryError(404, msg)
    snapshots = _OperatorSnapshots(operator, where)
    for reading in key_readings(key_text):
        key_group = key_group_for_key(reading.key, operator.max_parallelism)
        subtask = subtask_for_key_group(operator.max_parallelism, operator.parallelism, key_group)
        keyed = snapshots.keyed(subtask)
        states = {
            name: _state_json(name, entry, reading)
            for name, entry in keyed.items()
            if _records_key_type(entry, reading.type_name)
        }
        found = {name: value for name, value in states.items() if value is not None}
        if found:
            return {
                "uid": uid,
                "operator": operator.name,
                "key": _json_value(reading.key),
                "key_type": reading.type_name,
                "key_group": key_group,
                "subtask": subtask,
                "checkpoint": {
                    "id": checkpoint.checkpoint_id,
                    "kind": checkpoint.kind.value,
                    "timestamp_ms": checkpoint.timestamp_ms,
                    "path": checkpoint.path,
                },
                "state": found,
            }
    raise _not_found(operator, snapshots, key_text, where)


def _not_found(
    operator: OperatorCheckpoint, snapshots: _OperatorSnapshots, key_text: str, where: str
) -> StateQueryError:
    """Why no reading of ``key_text`` found state: no keyed state at all, keys of another type,
    or no state for this key."""
    label = f"operator {operator.name!r} (uid {operator.uid!r})"
    keyed = [
        entry for subtask in snapshots.subtasks() for entry in snapshots.keyed(subtask).values()
    ]
    if not keyed:
        msg = f"{label} has no keyed state in {where}: only keyed operators hold state per key"
        return StateQueryError(404, msg)
    recorded = sorted({name for entry in keyed for name in entry.get("key_types", ())})
    readable = {reading.type_name for reading in key_readings(key_text)}
    if recorded and not readable & set(recorded):
        msg = (
            f"key {key_text!r} cannot be read as a key of {label}, whose keys are "
            f"{', '.join(recorded)}: give a key of that type (tuple keys as a JSON array)"
        )
        return StateQueryError(400, msg)
    types = f" ({', '.join(recorded)} keys)" if recorded else ""
    msg = f"key {key_text!r} has no state in {label}{types} at {where}"
    return StateQueryError(404, msg)


class _OperatorSnapshots:
    """The keyed parts of an operator's subtask snapshots, decoded once each when first asked
    for (straight from the stored bytes: the checkpoint itself keeps no decoded copy)."""

    def __init__(self, operator: OperatorCheckpoint, where: str) -> None:
        self._operator = operator
        self._where = where
        self._keyed: dict[int, dict[str, Any]] = {}

    def subtasks(self) -> Iterator[int]:
        return iter(sorted(self._operator.subtask_states))

    def keyed(self, subtask: int) -> dict[str, Any]:
        if subtask not in self._keyed:
            states = self._operator.subtask_states
            keyed: dict[str, Any] = {}
            if subtask in states:
                label = f"{self._where}, operator {self._operator.uid!r}, subtask {subtask}"
                try:
                    snapshot = OperatorSnapshot.decode(states.encoded(subtask), label)
                    keyed = with_shared_keys(snapshot.keyed or {})
                except SnapshotLayoutError as exc:
                    raise StateQueryError(500, str(exc)) from None
                except ValueError as exc:
                    raise StateQueryError(500, f"{label}: {exc}") from None
            self._keyed[subtask] = keyed
        return self._keyed[subtask]


def _records_key_type(entry: dict[str, Any], type_name: str) -> bool:
    """Whether a state's snapshot may hold keys of ``type_name`` (snapshots that predate key
    types record none: any may)."""
    recorded = entry.get("key_types")
    return not recorded or type_name in recorded


def _state_json(name: str, entry: dict[str, Any], reading: _Reading) -> dict[str, Any] | None:
    """``{"kind", "value"}`` of the key's entry in one state's snapshot; None without one."""
    for key, value in zip(entry["keys"], entry["values"], strict=True):
        if key == reading.key and key_type_name(key) == reading.type_name:
            kind = entry.get("kind", "restored")
            if _is_window_state(name, value):
                windows = WINDOW_MAP.from_data(value)
                shown = [{"window": list(w), "value": _json_value(v)} for w, v in windows.items()]
                return {"kind": kind, "value": shown}
            return {"kind": kind, "value": _json_value(value)}
    return None


def _is_window_state(name: str, value: Any) -> bool:
    named = name in WINDOW_STATE_NAMES or name.startswith(WINDOW_STATE_PREFIXES)
    return named and isinstance(value, list) and all(isinstance(i, list) for i in value)


def _json_value(value: Any) -> Any:
    """``value`` as JSON can hold it (see the module docstring)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    if isinstance(value, set | frozenset):
        items = [_json_value(item) for item in value]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=json.dumps)
    if isinstance(value, dict):
        return {_json_key(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.hex()
    return repr(value)


def _json_key(key: Any) -> str:
    shown = _json_value(key)
    return shown if isinstance(shown, str) else json.dumps(shown)


# ---------------------------------------------------------------- the control endpoint


def add_state_routes(app: web.Application, master: Any) -> None:
    """``GET /state/{uid}?key=K`` of the job run by ``master``, from its latest completed
    checkpoint."""

    async def serve_state(request: web.Request) -> web.Response:
        uid = request.match_info["uid"]
        key = request.query.get("key")
        if key is None:
            msg = f"give the key to look up: /state/{uid}?key=KEY"
            return web.json_response({"error": msg}, status=400)
        checkpoint = master.coordinator.latest_completed
        if checkpoint is None:
            msg = (
                "no completed checkpoint yet: state is queryable from the first completed "
                "checkpoint on (run with --checkpoint-interval)"
            )
            return web.json_response({"error": msg}, status=404)
        try:
            # Decoding a snapshot may take a while: off the loop the tasks run on.
            answer = await asyncio.to_thread(query_state, checkpoint, uid, key)
        except StateQueryError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        return web.json_response(answer)

    app.router.add_get("/state/{uid}", serve_state)


# ---------------------------------------------------------------- the CLI


def add_state_command(sub: Any) -> None:
    """The ``state`` command's parser."""
    state = sub.add_parser(
        "state",
        help="print one key's state from a checkpoint or savepoint, as JSON",
        description="Print the keyed state of one key of one operator, as JSON, from the latest "
        "valid checkpoint of a checkpoint directory or from the checkpoint or savepoint folder "
        "given. The key is read as each key type the state records: the text itself, JSON "
        "(42, 4.5, true, null, a JSON array for a tuple key), a UUID, a Decimal, an ISO date "
        "or time. Exit status: 0 found, 1 not found (uid or key), 2 bad usage or no valid "
        "checkpoint.",
    )
    state.add_argument(
        "path",
        metavar="PATH",
        help="a checkpoint directory, or a checkpoint "
        "or savepoint folder (a folder of savepoints: its newest valid one)",
    )
    state.add_argument(
        "--uid", required=True, help="the operator's uid (see the checkpoints command)"
    )
    state.add_argument("--key", required=True, help="the key to look up")


def state_command(args: argparse.Namespace) -> int:
    """``python -m runtime state PATH --uid U --key K``: the answer on stdout; an ``error:``
    line on stderr and exit 1 (not found) or 2 (bad usage, no valid checkpoint) otherwise."""
    try:
        checkpoint = load_queried_checkpoint(Path(args.path))
        answer = query_state(checkpoint, args.uid, args.key)
    except StateQueryError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1 if exc.status == 404 else 2
    except InvalidCheckpointError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"error: cannot read the checkpoint at {args.path}: {exc}\n")
        return 2
    sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    return 0


def load_queried_checkpoint(path: Path) -> CompletedCheckpoint:
    """The checkpoint ``state`` reads at ``path``: a checkpoint or savepoint folder (or its
    ``_metadata`` file) itself, else the latest valid ``chk-*`` checkpoint under it, else the
    newest valid snapshot folder in it (a folder of savepoints)."""
    if not path.exists():
        msg = f"{path} does not exist: give a checkpoint directory or a checkpoint or savepoint folder"
        raise StateQueryError(400, msg)
    if path.name == METADATA and path.is_file():
        path = path.parent
    if (path / METADATA).exists():
        return load_checkpoint(path)
    if not path.is_dir():
        msg = f"{path} is not a folder: give a checkpoint directory or a checkpoint or savepoint folder"
        raise StateQueryError(400, msg)
    search = (
        find_latest_valid(path) if list_checkpoint_folders(path) else find_newest_snapshot(path)
    )
    if search.checkpoint is None:
        reasons = "".join(f"; {entry.folder.name}: {entry.reason}" for entry in search.skipped)
        msg = f"no valid checkpoint or savepoint in {path}{reasons or ' (it holds none)'}"
        raise StateQueryError(400, msg)
    return search.checkpoint
