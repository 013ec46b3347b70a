"""Checkpoint storage in a directory, written with aiofiles.

Layout of one checkpoint (or savepoint) folder::

    chk-17/                      (savepoints: savepoint-17-<time>/ under the user's directory)
        word-counts-0.state      msgpack of one operator subtask's snapshot
        word-counts-1.state
        _metadata                JSON (orjson): id, kind, time, operators, files with size + sha256

Rules:

1. State files first, then ``_metadata`` last and atomically (temp file, fsync, rename, fsync of
   the folder): a folder without ``_metadata`` is not a checkpoint.
2. A checkpoint is valid only if its metadata parses and every file it names exists with the
   recorded size and checksum.
3. All paths in the metadata are relative to the folder, so a savepoint folder can be moved and
   still restored.
4. Retention deletes subsumed checkpoints (``chk-*`` folders only); savepoints are never deleted.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import orjson

from state.serde import packb, unpackb

log = logging.getLogger(__name__)

METADATA = "_metadata"
FORMAT_VERSION = 1
_CHECKPOINT_DIR = re.compile(r"^chk-(\d+)$")


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


def read_metadata(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / METADATA
    if not path.exists():
        msg = f"{folder}: no {METADATA} file (not a completed checkpoint or savepoint)"
        raise InvalidCheckpointError(msg)
    try:
        metadata: dict[str, Any] = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        msg = f"{path}: damaged metadata ({exc})"
        raise InvalidCheckpointError(msg) from exc
    if metadata.get("format") != FORMAT_VERSION:
        msg = f"{path}: unknown checkpoint format {metadata.get('format')!r}"
        raise InvalidCheckpointError(msg)
    return metadata


def load_checkpoint(folder: str | os.PathLike[str]) -> CompletedCheckpoint:
    """Read and verify a checkpoint or savepoint folder (rule 2)."""
    base = Path(folder)
    metadata = read_metadata(base)
    operators: dict[str, OperatorCheckpoint] = {}
    for uid, meta in metadata["operators"].items():
        states = SnapshotMap()
        for subtask, info in meta["subtasks"].items():
            path = base / info["file"]
            if not path.exists():
                msg = f"{base}: state file {info['file']} of operator {uid!r} is missing"
                raise InvalidCheckpointError(msg)
            data = path.read_bytes()
            if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                msg = (
                    f"{base}: state file {info['file']} of operator {uid!r} is damaged "
                    f"({len(data)} bytes, expected {info['size']}, or a checksum mismatch)"
                )
                raise InvalidCheckpointError(msg)
            states.set_encoded(int(subtask), data)
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


def load_latest_valid(directory: str | os.PathLike[str]) -> CompletedCheckpoint | None:
    """The newest valid checkpoint under ``directory``; damaged newer ones are skipped (logged)."""
    for folder in list_checkpoint_folders(directory):
        if not (folder / METADATA).exists():
            log.warning("skipping %s: it has no %s (incomplete checkpoint)", folder, METADATA)
            continue
        try:
            return load_checkpoint(folder)
        except InvalidCheckpointError as exc:
            log.warning("skipping damaged checkpoint: %s; falling back to an earlier one", exc)
    return None


def completed_checkpoint_ids_after(
    directory: str | os.PathLike[str], checkpoint_id: int | None
) -> list[int]:
    """Ids of ``chk-*`` folders with a ``_metadata`` file (they completed, whether they are still
    valid or damaged now) above ``checkpoint_id`` (all of them for None), oldest first.

    A completed checkpoint may have committed side effects (files, Kafka transactions); a restore
    from an older one replays what they committed.
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
