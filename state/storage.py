"""Checkpoint storage in a directory, written with aiofiles.

Layout of one checkpoint (or savepoint) folder::

    chk-17/                      (savepoints: savepoint-17-<time>/ under the user's directory)
        word-counts-0.state      msgpack of one operator subtask's snapshot
        word-counts-1.state
        _metadata                JSON (orjson): id, kind, time, operators, files with size + sha256

Rules:

1. State files first, then ``_metadata`` last and atomically (temp file, fsync, rename, fsync of
   the folder): a folder without ``_metadata`` is not a checkpoint.
2. A checkpoint is valid only if its metadata parses, has the schema's shape
   (:func:`validate_metadata`), and every file it names exists with the recorded size (checked
   before reading) and checksum. Anything else is damaged, with the reason.
3. Every file in the metadata is a plain name inside the folder (no absolute path, no ``..``, no
   separator), so a savepoint folder can be moved and still restored, and a crafted one cannot
   make a restore read files elsewhere.
4. Retention deletes subsumed checkpoints (``chk-*`` folders only); savepoints are never deleted.
5. ``chk-*`` folders that never got their ``_metadata`` are deleted at the next completed
   checkpoint and at a restore (:func:`remove_incomplete_checkpoints`); a folder with
   ``_metadata`` is never deleted as garbage, even when damaged or abandoned.
6. A restore from checkpoint or savepoint *r* abandons the newer completed ``chk-*`` checkpoints
   of the directory: they belong to the timeline the user left. Once every task of the restored
   attempt is running, each gets an ``_abandoned`` marker (:func:`mark_abandoned`, JSON naming
   *r* and the time). ``--restore latest`` and searches for the newest snapshot skip abandoned
   folders with the reason; they still count as completed for
   :func:`completed_checkpoint_ids_after`, since their side effects were committed.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import orjson

from state.serde import packb, unpackb
from state.snapshot import OperatorSnapshot

log = logging.getLogger(__name__)

METADATA = "_metadata"
ABANDONED = "_abandoned"
FORMAT_VERSION = 2
"""The format this code writes. 2: a keyed state may name another state's key column instead of
holding its own (``KeyedStateBackend.snapshot``); code that only knows 1 must not read it."""
READABLE_FORMAT_VERSIONS = (1, 2)
"""Formats a restore reads: 1's keyed states all hold their own keys."""
_CHECKPOINT_DIR = re.compile(r"^chk-(\d+)$")
_SNAPSHOT_DIR = re.compile(r"^(savepoint-\d+-.+|chk-\d+)$")


class CheckpointKind(enum.StrEnum):
    CHECKPOINT = "checkpoint"
    SAVEPOINT = "savepoint"


class InvalidCheckpointError(RuntimeError):
    """A checkpoint folder is missing its metadata or a state file is damaged; names which."""


class SnapshotMap(dict[int, Any]):
    """Subtask index → snapshot, stored encoded (msgpack bytes) and decoded on first access.

    Tasks encode their snapshots as soon as they take them, so that later in-place changes of
    state objects cannot leak into a checkpoint; storage writes the bytes as they are.
    """

    def __init__(self, encoded: dict[int, bytes] | None = None) -> None:
        super().__init__()
        self._encoded: dict[int, bytes] = dict(encoded or {})
        for key in self._encoded:
            super().__setitem__(key, None)

    def set_encoded(self, subtask: int, data: bytes) -> None:
        self._encoded[subtask] = data
        super().__setitem__(subtask, None)

    def encoded(self, subtask: int) -> bytes:
        if subtask not in self._encoded:
            self._encoded[subtask] = packb(super().__getitem__(subtask))
        return self._encoded[subtask]

    def __setitem__(self, subtask: int, snapshot: Any) -> None:
        self._encoded.pop(subtask, None)
        super().__setitem__(subtask, snapshot)

    def __getitem__(self, subtask: int) -> Any:
        value = super().__getitem__(subtask)
        if value is None and subtask in self._encoded:
            value = unpackb(self._encoded[subtask])
            super().__setitem__(subtask, value)
        return value

    def get(self, subtask: int, default: Any = None) -> Any:
        return self[subtask] if subtask in self else default

    def values(self) -> list[Any]:  # type: ignore[override]
        return [self[k] for k in self]

    def items(self) -> list[tuple[int, Any]]:  # type: ignore[override]
        return [(k, self[k]) for k in self]

    def snapshot(self, subtask: int) -> OperatorSnapshot:
        """Subtask ``subtask``'s state as an :class:`OperatorSnapshot` (the layout is read there)."""
        return OperatorSnapshot.from_data(self[subtask], f"state of subtask {subtask}")

    def snapshots(self) -> list[tuple[int, OperatorSnapshot]]:
        """(subtask, snapshot) for every subtask with state, in subtask order."""
        return [(k, self.snapshot(k)) for k in sorted(self)]


@dataclass
class OperatorCheckpoint:
    """The state of one operator in a completed checkpoint (FLIP-147's extended format)."""

    uid: str
    name: str
    parallelism: int
    max_parallelism: int
    subtask_states: SnapshotMap
    """Subtask index → that subtask's snapshot (only subtasks that had state)."""
    finished_subtasks: set[int] = field(default_factory=set)

    @property
    def fully_finished(self) -> bool:
        return len(self.finished_subtasks) == self.parallelism


@dataclass
class CompletedCheckpoint:
    checkpoint_id: int
    kind: CheckpointKind
    timestamp_ms: int
    operators: dict[str, OperatorCheckpoint]
    path: str | None = None
    state_size: int = 0
    job_name: str = ""


def _state_file_name(uid: str, subtask: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", uid)
    return f"{safe}-{subtask}.state"


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_folder(folder: Path, files: dict[str, bytes], metadata: bytes) -> None:
    """Rule 1, in one go on a worker thread: state files, then the metadata atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        _write_durably(folder / name, data)
    temp = folder / f".{METADATA}.tmp"
    _write_durably(temp, metadata)
    os.replace(temp, folder / METADATA)
    _fsync_dir(folder)


@dataclass(frozen=True)
class AbandonedMarker:
    """What an ``_abandoned`` marker records: the restore that left this checkpoint behind."""

    restored_kind: str
    restored_checkpoint: int | None
    """None when the marker cannot be read (``problem`` says why)."""
    restored_path: str
    time_ms: int | None
    problem: str = ""

    @property
    def description(self) -> str:
        """``a later run restored savepoint 6 on <local time> (<path>)``, for one line."""
        if self.restored_checkpoint is None:
            return f"a later run restored an older checkpoint ({self.problem})"
        what = f"{self.restored_kind} {self.restored_checkpoint}"
        when = "" if self.time_ms is None else f" on {format_local_time(self.time_ms)}"
        where = f" ({self.restored_path})" if self.restored_path else ""
        return f"a later run restored {what}{when}{where}"


def format_local_time(timestamp_ms: int) -> str:
    """A wall-clock time in milliseconds as local ``YYYY-MM-DD HH:MM:SS``, for messages."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp_ms / 1000))


def read_abandoned_marker(folder: str | os.PathLike[str]) -> AbandonedMarker | None:
    """The ``_abandoned`` marker of a checkpoint folder (rule 6), None if it has none. A marker
    that cannot be read still marks the folder abandoned (it was written atomically, so only a
    hand edit damages it); the description says so."""
    path = Path(folder) / ABANDONED
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return AbandonedMarker("", None, "", None, f"its {ABANDONED} is unreadable: {exc}")
    try:
        parsed = orjson.loads(data)
        return AbandonedMarker(
            str(parsed["restored_kind"]),
            _as_int(parsed["restored_checkpoint"], "restored_checkpoint"),
            str(parsed.get("restored_path", "")),
            _as_int(parsed["time_ms"], "time_ms", maximum=_MAX_TIMESTAMP_MS),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        return AbandonedMarker("", None, "", None, f"its {ABANDONED} is damaged: {exc}")


def mark_abandoned(
    directory: str | os.PathLike[str],
    checkpoint_ids: Collection[int],
    restored: CompletedCheckpoint,
) -> list[int]:
    """Rule 6: write an ``_abandoned`` marker (atomically) into each completed ``chk-<id>`` folder
    of ``directory`` with an id in ``checkpoint_ids``, naming ``restored``, the checkpoint or
    savepoint restored instead. A folder already marked keeps its marker (the restore that first
    left it); a folder without readable ``_metadata`` is not marked (every search skips it as
    damaged anyway, and it stays as it is, the evidence of what happened). Returns the ids marked
    now."""
    marker = orjson.dumps(
        {
            "restored_kind": restored.kind.value,
            "restored_checkpoint": restored.checkpoint_id,
            "restored_path": restored.path or "",
            "time_ms": int(time.time() * 1000),
        },
        option=orjson.OPT_INDENT_2,
    )
    marked = []
    for checkpoint_id in sorted(checkpoint_ids):
        folder = Path(directory) / f"chk-{checkpoint_id}"
        if (folder / ABANDONED).exists():
            continue
        try:
            read_metadata(folder)
        except InvalidCheckpointError:
            continue
        temp = folder / f".{ABANDONED}.tmp"
        _write_durably(temp, marker)
        os.replace(temp, folder / ABANDONED)
        _fsync_dir(folder)
        marked.append(checkpoint_id)
    return marked


class CheckpointDirectoryError(RuntimeError):
    """The checkpoint directory cannot hold checkpoints; the message is one line naming the
    directory, the problem and what to do."""


def check_checkpoint_directory(directory: str | os.PathLike[str]) -> None:
    """Prove that this process can list ``directory`` and write into it (a probe file is created
    and removed), or, when it does not exist yet, create it (its nearest existing ancestor is a
    writable directory), so that a job fails at its start rather than at its first checkpoint,
    minutes later. Creates nothing. Raises :class:`CheckpointDirectoryError`."""
    path = Path(directory)
    remedy = "fix its permissions or give another directory"
    if not path.exists():
        ancestor = next(parent for parent in path.absolute().parents if parent.exists())
        if not ancestor.is_dir():
            msg = f"cannot create {path}: {ancestor} is not a directory"
            raise CheckpointDirectoryError(msg)
        if not os.access(ancestor, os.W_OK | os.X_OK):
            msg = f"cannot create {path}: {ancestor} is not writable; {remedy}"
            raise CheckpointDirectoryError(msg)
        return
    if not path.is_dir():
        msg = f"{path} is not a directory: give a directory (it is created when missing)"
        raise CheckpointDirectoryError(msg)
    try:
        os.listdir(path)
    except OSError as exc:
        msg = f"cannot read {path} ({exc.strerror or exc}): {remedy}"
        raise CheckpointDirectoryError(msg) from None
    probe = path / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "xb"):
            pass
        probe.unlink()
    except OSError as exc:
        msg = f"cannot write into {path} ({exc.strerror or exc}): {remedy}"
        raise CheckpointDirectoryError(msg) from None


class CheckpointStorage:
    """Checkpoints under ``directory/chk-<id>``; savepoints under a directory named per request."""

    def __init__(self, directory: str | os.PathLike[str] | None, job_name: str = "") -> None:
        self.directory = Path(directory) if directory is not None else None
        self.job_name = job_name

    async def write(self, checkpoint: CompletedCheckpoint, target_dir: str | None = None) -> None:
        """Persist ``checkpoint`` (rule 1); sets ``checkpoint.path`` and ``state_size``.

        Without a directory, checkpoints stay in memory (they still serve failover and the final
        commit); savepoints always need a target directory.
        """
        if checkpoint.kind is CheckpointKind.SAVEPOINT:
            base = Path(target_dir) if target_dir else None
            if base is None and self.directory is not None:
                base = self.directory / "savepoints"
            if base is None:
                msg = "a savepoint needs a target directory (--dir) or a --checkpoint-dir"
                raise InvalidCheckpointError(msg)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            folder = base / f"savepoint-{checkpoint.checkpoint_id}-{stamp}"
        elif self.directory is None:
            return
        else:
            folder = self.directory / f"chk-{checkpoint.checkpoint_id}"
        operators_meta: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        total = 0
        for uid, entry in checkpoint.operators.items():
            subtasks: dict[str, Any] = {}
            for subtask in sorted(entry.subtask_states):
                data = entry.subtask_states.encoded(subtask)
                name = _state_file_name(uid, subtask)
                files[name] = data
                subtasks[str(subtask)] = {
                    "file": name,
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                total += len(data)
            operators_meta[uid] = {
                "name": entry.name,
                "parallelism": entry.parallelism,
                "max_parallelism": entry.max_parallelism,
                "finished_subtasks": sorted(entry.finished_subtasks),
                "fully_finished": entry.fully_finished,
                "subtasks": subtasks,
            }
        metadata = {
            "format": FORMAT_VERSION,
            "checkpoint_id": checkpoint.checkpoint_id,
            "kind": checkpoint.kind.value,
            "timestamp_ms": checkpoint.timestamp_ms,
            "job": self.job_name,
            "state_size": total,
            "operators": operators_meta,
        }
        # One hop to aiofiles' worker thread for the whole folder: the event loop stays free and
        # the write does not wait for a loop turn per file operation.
        await aiofiles.os.wrap(_write_folder)(
            folder, files, orjson.dumps(metadata, option=orjson.OPT_INDENT_2)
        )
        checkpoint.path = str(folder)
        checkpoint.state_size = total
        checkpoint.job_name = self.job_name

    async def discard(self, checkpoint: CompletedCheckpoint) -> None:
        """Delete a subsumed checkpoint folder (never a savepoint)."""
        if checkpoint.kind is CheckpointKind.SAVEPOINT or not checkpoint.path:
            return
        path = Path(checkpoint.path)
        if _CHECKPOINT_DIR.match(path.name):
            await aiofiles.os.wrap(shutil.rmtree)(path, ignore_errors=True)

    async def mark_abandoned(
        self, checkpoint_ids: Collection[int], restored: CompletedCheckpoint
    ) -> list[int]:
        """:func:`mark_abandoned` in this storage's directory, off the loop."""
        if self.directory is None or not checkpoint_ids:
            return []
        marked: list[int] = await aiofiles.os.wrap(mark_abandoned)(
            self.directory, checkpoint_ids, restored
        )
        return marked

    async def remove_incomplete(self, below_id: int, keep: Collection[int]) -> list[Path]:
        """:func:`remove_incomplete_checkpoints` in this storage's directory, off the loop."""
        if self.directory is None:
            return []
        removed: list[Path] = await aiofiles.os.wrap(remove_incomplete_checkpoints)(
            self.directory, below_id, keep
        )
        return removed


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SUBTASK_KEY = re.compile(r"^(0|[1-9][0-9]*)$")
# 9999-12-31: later timestamps cannot be shown as local times.
_MAX_TIMESTAMP_MS = 253_402_300_799_999


class _MetadataSchemaError(ValueError):
    """One field of the metadata does not have its documented shape."""

    def __init__(self, where: str, expected: str, got: Any) -> None:
        if got is _ABSENT:
            super().__init__(f"{where}: expected {expected}, but the field is missing")
            return
        shown = repr(got)
        if len(shown) > 300:  # a whole object is not worth printing; a long file name is
            shown = shown[:297] + "..."
        super().__init__(f"{where}: expected {expected}, got {shown}")


_ABSENT: Any = object()
"""What a missing metadata field 'holds' (no value of the file could be mistaken for it)."""


def _field(record: dict[str, Any], key: str, where: str) -> Any:
    if key not in record:
        raise _MetadataSchemaError(f"{where}.{key}" if where else key, "a value", _ABSENT)
    return record[key]


def _as_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _MetadataSchemaError(where, "an object", value)
    return value


def _as_int(value: Any, where: str, minimum: int = 0, maximum: int | None = None) -> int:
    # bool is an int subclass in Python, never a valid count or id here
    valid = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if not valid or (maximum is not None and value > maximum):
        bounds = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        raise _MetadataSchemaError(where, bounds, value)
    return int(value)


def _as_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _MetadataSchemaError(where, "a string", value)
    return value


def _as_plain_file_name(value: Any, where: str) -> str:
    """Rule 3: a state file is named by a plain name inside its folder, never by a path."""
    name = _as_str(value, where)
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if (
        name in ("", ".", "..", METADATA)
        or "\0" in name
        or any(sep in name for sep in separators)
        or os.path.isabs(name)
    ):
        raise _MetadataSchemaError(
            where, "a plain file name inside the checkpoint folder (no path)", value
        )
    return name


def validate_metadata(metadata: Any) -> dict[str, Any]:
    """Check ``metadata`` (parsed ``_metadata`` JSON) against the schema :meth:`CheckpointStorage.
    write` produces; return it unchanged if it conforms.

    Every field the restore reads is checked for presence, type and range, so that code after
    this check can index it freely. Fields the schema does not name are ignored (a newer writer
    may add some). Raises :class:`ValueError` naming the first field that does not conform and
    what was expected.
    """
    top = _as_object(metadata, "the metadata")
    version = _field(top, "format", "")
    if version not in READABLE_FORMAT_VERSIONS or isinstance(version, bool):
        readable = " or ".join(map(str, READABLE_FORMAT_VERSIONS))
        raise _MetadataSchemaError("format", f"format version {readable}", version)
    _as_int(_field(top, "checkpoint_id", ""), "checkpoint_id")
    kind = _field(top, "kind", "")
    if kind not in {k.value for k in CheckpointKind}:
        raise _MetadataSchemaError("kind", "'checkpoint' or 'savepoint'", kind)
    _as_int(_field(top, "timestamp_ms", ""), "timestamp_ms", maximum=_MAX_TIMESTAMP_MS)
    if "job" in top:
        _as_str(top["job"], "job")
    if "state_size" in top:
        _as_int(top["state_size"], "state_size")
    operators = _as_object(_field(top, "operators", ""), "operators")
    for uid, op_value in operators.items():
        where = f"operators[{uid!r}]"
        op = _as_object(op_value, where)
        _as_str(_field(op, "name", where), f"{where}.name")
        parallelism = _as_int(_field(op, "parallelism", where), f"{where}.parallelism", 1)
        _as_int(_field(op, "max_parallelism", where), f"{where}.max_parallelism", 1)
        finished = _field(op, "finished_subtasks", where)
        if not isinstance(finished, list):
            raise _MetadataSchemaError(
                f"{where}.finished_subtasks", "a list of subtask indexes", finished
            )
        for index, subtask in enumerate(finished):
            _as_int(subtask, f"{where}.finished_subtasks[{index}]", maximum=parallelism - 1)
        if "fully_finished" in op and not isinstance(op["fully_finished"], bool):
            raise _MetadataSchemaError(
                f"{where}.fully_finished", "true or false", op["fully_finished"]
            )
        subtasks = _as_object(_field(op, "subtasks", where), f"{where}.subtasks")
        for key, info_value in subtasks.items():
            at = f"{where}.subtasks[{key!r}]"
            if not _SUBTASK_KEY.match(key) or int(key) >= parallelism:
                raise _MetadataSchemaError(
                    f"{where}.subtasks", f"subtask indexes 0..{parallelism - 1} as keys", key
                )
            info = _as_object(info_value, at)
            _as_plain_file_name(_field(info, "file", at), f"{at}.file")
            _as_int(_field(info, "size", at), f"{at}.size")
            digest = _field(info, "sha256", at)
            if not isinstance(digest, str) or not _SHA256.match(digest):
                raise _MetadataSchemaError(f"{at}.sha256", "64 lowercase hex digits", digest)
    return top


def read_metadata(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed and validated ``_metadata`` of ``folder``; :class:`InvalidCheckpointError` if it
    is missing, does not parse, or does not have the schema's shape (the reason names the field).
    """
    path = Path(folder) / METADATA
    if not path.exists():
        msg = f"{folder}: no {METADATA} file (not a completed checkpoint or savepoint)"
        raise InvalidCheckpointError(msg)
    try:
        parsed = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        msg = f"{path}: damaged metadata ({exc})"
        raise InvalidCheckpointError(msg) from exc
    except OSError as exc:
        msg = f"{path}: cannot read the metadata ({exc.strerror or exc})"
        raise InvalidCheckpointError(msg) from exc
    try:
        return validate_metadata(parsed)
    except ValueError as exc:
        msg = f"{path}: damaged metadata ({exc})"
        raise InvalidCheckpointError(msg) from None


def _read_state_file(base: Path, uid: str, info: dict[str, Any]) -> bytes:
    """The bytes of one state file, verified against its recorded size and checksum; the size is
    checked before reading, so a file grown huge is never loaded into memory."""
    name = info["file"]
    path = base / name
    if path.resolve().parent != base.resolve():
        # a symlink (or a renamed folder) that leads out of the checkpoint folder
        msg = f"{base}: state file {name} of operator {uid!r} resolves outside the folder"
        raise InvalidCheckpointError(msg)
    if not path.is_file():
        msg = f"{base}: state file {name} of operator {uid!r} is missing"
        raise InvalidCheckpointError(msg)
    try:
        size = path.stat().st_size
        if size != info["size"]:
            msg = (
                f"{base}: state file {name} of operator {uid!r} is damaged "
                f"({size} bytes, expected {info['size']})"
            )
            raise InvalidCheckpointError(msg)
        with open(path, "rb") as f:
            data = f.read(info["size"] + 1)
    except OSError as exc:
        msg = f"{base}: cannot read state file {name} of operator {uid!r} ({exc.strerror or exc})"
        raise InvalidCheckpointError(msg) from exc
    if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
        msg = (
            f"{base}: state file {name} of operator {uid!r} is damaged "
            f"({len(data)} bytes, expected {info['size']}, or a checksum mismatch)"
        )
        raise InvalidCheckpointError(msg)
    return data


def load_checkpoint(folder: str | os.PathLike[str]) -> CompletedCheckpoint:
    """Read and verify a checkpoint or savepoint folder (rules 2 and 3);
    :class:`InvalidCheckpointError` names what is missing or damaged."""
    base = Path(folder)
    metadata = read_metadata(base)
    operators: dict[str, OperatorCheckpoint] = {}
    for uid, meta in metadata["operators"].items():
        states = SnapshotMap()
        for subtask, info in meta["subtasks"].items():
            states.set_encoded(int(subtask), _read_state_file(base, uid, info))
        operators[uid] = OperatorCheckpoint(
            uid,
            meta["name"],
            meta["parallelism"],
            meta["max_parallelism"],
            states,
            set(meta["finished_subtasks"]),
        )
    return CompletedCheckpoint(
        metadata["checkpoint_id"],
        CheckpointKind(metadata["kind"]),
        metadata["timestamp_ms"],
        operators,
        str(base),
        metadata.get("state_size", 0),
        metadata.get("job", ""),
    )


def list_checkpoint_folders(directory: str | os.PathLike[str]) -> list[Path]:
    """``chk-<id>`` folders under ``directory``, newest (highest id) first."""
    base = Path(directory)
    if not base.is_dir():
        return []
    found = []
    for child in base.iterdir():
        match = _CHECKPOINT_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found, reverse=True)]


def find_snapshot_folders(directory: str | os.PathLike[str]) -> list[Path]:
    """Every folder with a ``_metadata`` file under ``directory`` (checkpoints and savepoints)."""
    base = Path(directory)
    if (base / METADATA).exists():
        return [base]
    return sorted({p.parent for p in base.rglob(METADATA)})


@dataclass
class SkippedSnapshot:
    """A checkpoint or savepoint folder a search passed over, and why."""

    folder: Path
    reason: str
    completed: bool
    """It has its ``_metadata`` (completed, damaged or abandoned since); else it never completed."""
    abandoned: AbandonedMarker | None = None
    """Set when it was skipped for its ``_abandoned`` marker (rule 6), not for damage."""


@dataclass
class SnapshotSearch:
    """The outcome of looking for the newest valid checkpoint or savepoint in a directory."""

    checkpoint: CompletedCheckpoint | None
    """The newest valid one; None if there is none."""
    skipped: list[SkippedSnapshot] = field(default_factory=list)
    """Folders passed over on the way (newest first), each with the reason it is not valid."""


def _skipped(folder: Path, exc: InvalidCheckpointError) -> SkippedSnapshot:
    return SkippedSnapshot(folder, str(exc), (folder / METADATA).exists())


def _first_valid(folders: list[Path], search: SnapshotSearch) -> SnapshotSearch:
    """Load ``folders`` in order until one is valid and not abandoned; the ones before it go to
    ``skipped``."""
    for folder in folders:
        marker = read_abandoned_marker(folder)
        if marker is not None:
            match = _CHECKPOINT_DIR.match(folder.name)
            what = f"checkpoint {match.group(1)}" if match else folder.name
            reason = f"{what} abandoned: {marker.description}"
            search.skipped.append(SkippedSnapshot(folder, reason, True, marker))
            continue
        try:
            search.checkpoint = load_checkpoint(folder)
        except InvalidCheckpointError as exc:
            search.skipped.append(_skipped(folder, exc))
            continue
        break
    return search


def find_latest_valid(directory: str | os.PathLike[str]) -> SnapshotSearch:
    """The newest valid ``chk-*`` checkpoint under ``directory`` (by id) that is not abandoned, and
    the newer folders that were skipped because they never completed, are damaged, or were
    abandoned (rule 6)."""
    return _first_valid(list_checkpoint_folders(directory), SnapshotSearch(None))


def load_latest_valid(directory: str | os.PathLike[str]) -> CompletedCheckpoint | None:
    """The newest valid checkpoint under ``directory``; damaged and abandoned newer ones are
    skipped (logged)."""
    search = find_latest_valid(directory)
    for skipped in search.skipped:
        log.warning(
            "skipping checkpoint %s, falling back to an earlier one: %s",
            skipped.folder,
            skipped.reason,
        )
    return search.checkpoint


def find_newest_snapshot(directory: str | os.PathLike[str]) -> SnapshotSearch:
    """The newest valid snapshot among the folders directly under ``directory`` (savepoints as
    ``stop --dir`` writes them, or ``chk-*`` checkpoints), by checkpoint id, then time.

    A folder counts as a candidate if it holds a ``_metadata`` file or is named like a savepoint
    or checkpoint folder. ``skipped`` lists the candidates with unreadable metadata and the ones
    newer than the found one that failed verification or are abandoned (rule 6); with none
    valid, every candidate.
    """
    search = SnapshotSearch(None)
    readable: list[tuple[int, int, Path]] = []
    for folder in sorted(Path(directory).iterdir()):
        if not folder.is_dir():
            continue
        if not ((folder / METADATA).exists() or _SNAPSHOT_DIR.match(folder.name)):
            continue
        try:
            metadata = read_metadata(folder)
        except InvalidCheckpointError as exc:
            search.skipped.append(_skipped(folder, exc))
            continue
        readable.append((metadata["checkpoint_id"], metadata["timestamp_ms"], folder))
    return _first_valid([folder for _, _, folder in sorted(readable, reverse=True)], search)


def remove_incomplete_checkpoints(
    directory: str | os.PathLike[str], below_id: int, keep: Collection[int] = ()
) -> list[Path]:
    """Delete the ``chk-<k>`` folders under ``directory`` with ``k < below_id`` that have no
    ``_metadata`` (checkpoints that never completed: killed mid-write, a full disk), except the
    ids in ``keep`` (checkpoints still being taken). Returns the deleted folders, oldest first.

    A folder with ``_metadata`` is never touched, valid or damaged: retention handles the valid
    ones and a damaged completed one is evidence that output was committed beyond older
    checkpoints (see :func:`completed_checkpoint_ids_after`). Savepoints and anything else not
    named ``chk-<int>`` are never touched either.
    """
    removed: list[Path] = []
    try:
        folders = list_checkpoint_folders(directory)
    except OSError as exc:
        # Garbage stays for the next attempt; whatever triggered the cleanup has succeeded.
        log.warning("could not look for incomplete checkpoints in %s: %s", directory, exc)
        return removed
    for folder in reversed(folders):
        match = _CHECKPOINT_DIR.match(folder.name)
        assert match is not None
        checkpoint_id = int(match.group(1))
        if checkpoint_id >= below_id or checkpoint_id in keep or (folder / METADATA).exists():
            continue
        try:
            shutil.rmtree(folder)
        except OSError as exc:
            log.warning("could not delete incomplete checkpoint %s: %s", folder, exc)
            continue
        log.info(
            "deleted %s: checkpoint %d never completed (no %s)", folder, checkpoint_id, METADATA
        )
        removed.append(folder)
    return removed


def completed_checkpoint_ids_after(
    directory: str | os.PathLike[str], checkpoint_id: int | None
) -> list[int]:
    """Ids of ``chk-*`` folders with a ``_metadata`` file (they completed, whether they are still
    valid or damaged now) above ``checkpoint_id`` (all of them for None), oldest first.

    A completed checkpoint may have committed side effects (files, Kafka transactions); a restore
    from an older one replays what they committed. Abandoned checkpoints (rule 6) are counted
    too: their side effects were committed all the same, and a restore from an older checkpoint
    than them still replays those records.
    """
    ids = []
    for folder in list_checkpoint_folders(directory):
        match = _CHECKPOINT_DIR.match(folder.name)
        if match and (folder / METADATA).exists():
            ids.append(int(match.group(1)))
    return sorted(i for i in ids if checkpoint_id is None or i > checkpoint_id)


def highest_checkpoint_id(directory: str | os.PathLike[str]) -> int:
    """The highest id of any ``chk-*`` folder, valid or not, so new ids never collide."""
    highest = 0
    for folder in list_checkpoint_folders(directory):
        match = _CHECKPOINT_DIR.match(folder.name)
        if match:
            highest = max(highest, int(match.group(1)))
    return highest
