"""Bounded file source (text or JSON lines) and a simple JSON-lines file sink.

The file source reads whole files as splits: one split per file (a directory gives one per file,
sorted by name), assigned evenly over the source's subtasks. A split carries the byte offset and
line number of the next unread line, kept in operator state, so a restore resumes exactly there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import orjson

from actors.infrastructure import InfrastructureError
from actors.operator import NewerOutputPolicy
from runtime.api.functions import RuntimeContext
from runtime.api.sinks import Sink, SinkWriter
from runtime.api.sources import END_OF_INPUT, EndOfInput, Source, SourceReader, SourceReaderContext
from state.refusal import RestoreRefusedError
from state.storage import format_local_time

_CHUNK = 1 << 18

log = logging.getLogger(__name__)


class RecordFormatError(InfrastructureError, ValueError):
    """A line could not be parsed (invalid JSON, or text that is not UTF-8); names the file and
    line. Bad input is the user's to fix outside the job's code: the CLI prints it as one line."""


class FileSource(Source[Any]):
    """Reads lines from a file or from every file of a directory.

    ``format``: ``"text"`` gives each line as ``str`` without its line ending; ``"json"`` parses
    each non-blank line with orjson. A line that is not valid JSON fails the job with an error naming
    the file and the line number. ``rate`` throttles each subtask to that many records per second.
    """

    def __init__(
        self, path: str | os.PathLike[str], format: str = "text", rate: float = 0.0
    ) -> None:
        if format not in ("text", "json"):
            msg = f"FileSource format must be 'text' or 'json', got {format!r}"
            raise ValueError(msg)
        self.path = Path(path)
        self.format = format
        self.rate = rate

    def name(self) -> str:
        return f"File({self.path.name})"

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            return sorted(
                p for p in self.path.iterdir() if p.is_file() and not p.name.startswith(".")
            )
        if not self.path.exists():
            where = "" if self.path.is_absolute() else f" (relative to {os.getcwd()})"
            msg = (
                f"FileSource: input {str(self.path)!r} does not exist{where}: check the path "
                "the job reads"
            )
            raise InfrastructureError(msg)
        return [self.path]

    def create_splits(self, parallelism: int) -> list[Any]:
        return [{"path": str(p), "offset": 0, "line": 0} for p in self._files()]

    def create_reader(self, context: SourceReaderContext) -> SourceReader[Any]:
        return _FileReader(self, context)

    def may_read(self, path: str) -> bool:
        """Whether a split may read ``path``: the configured file, or a file (not a dot-file) of
        the configured directory. Splits restored from a checkpoint are held to this, so a crafted
        checkpoint cannot make the job read any other file."""
        if not path or "\0" in path or ".." in Path(path).parts:
            return False
        configured = os.path.normpath(os.path.abspath(self.path))
        candidate = os.path.normpath(os.path.abspath(path))
        if candidate == configured:
            return True
        name = os.path.basename(candidate)
        return os.path.dirname(candidate) == configured and not name.startswith(".")


class _FileReader(SourceReader[Any]):
    def __init__(self, source: FileSource, context: SourceReaderContext) -> None:
        self.source = source
        self.context = context
        self.json = source.format == "json"
        self.splits: deque[dict[str, Any]] = deque()
        self.done: list[dict[str, Any]] = []
        self._file: Any = None
        self._lines: deque[bytes] = deque()
        self._tail = b""
        self._eof = False
        self._position = ""

    def add_splits(self, splits: list[Any]) -> None:
        for split in splits:
            self.splits.append(self._checked_split(split))

    def _checked_split(self, split: Any) -> dict[str, Any]:
        """``split`` if it reads an allowed file from a valid position; splits come from the
        restored checkpoint on a restore, so anything else refuses the restore."""
        path = split.get("path") if isinstance(split, dict) else None
        positions = [split.get(k) for k in ("offset", "line")] if isinstance(split, dict) else []
        if (
            isinstance(path, str)
            and self.source.may_read(path)
            and all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in positions)
            and positions
        ):
            return dict(split)
        msg = (
            f"file source {self.context.source_name!r} "
            f"(subtask {self.context.subtask_index + 1}/{self.context.parallelism}): checkpoint "
            f"{self.context.restore.checkpoint_id} has a split for {path!r} at {positions!r} "
            f"(offset, line), which is not the configured input {str(self.source.path)!r} or a "
            "file in it, or not a valid position; "
            "refusing to read files the job was not configured for. Restore a checkpoint or "
            "savepoint of this job, with the input it was taken with."
        )
        raise RestoreRefusedError(msg)

    def _open_current(self) -> bool:
        while self.splits:
            split = self.splits[0]
            if self._file is None:
                self._file = self._open(split["path"])
                self._file.seek(split["offset"])
                self._lines.clear()
                self._tail = b""
                self._eof = False
            if self._lines or self._fill():
                return True
            self._file.close()
            self._file = None
            self.done.append(self.splits.popleft())
        return False

    def _open(self, path: str) -> Any:
        try:
            return open(path, "rb")
        except OSError as exc:
            msg = (
                f"file source {self.context.source_name!r} "
                f"(subtask {self.context.subtask_index + 1}/{self.context.parallelism}): cannot "
                f"read {path!r}: {exc.strerror or exc}"
            )
            raise InfrastructureError(msg) from None

    def _fill(self) -> bool:
        while not self._lines and not self._eof:
            chunk = self._file.read(_CHUNK)
            if not chunk:
                self._eof = True
                if self._tail:
                    self._lines.append(self._tail)
                    self._tail = b""
                break
            parts = (self._tail + chunk).split(b"\n")
            self._tail = parts.pop()
            self._lines.extend(parts)
        return bool(self._lines)

    def poll(self, max_records: int) -> list[Any] | EndOfInput | None:
        if not self._open_current():
            return END_OF_INPUT
        split = self.splits[0]
        lines = self._lines
        take = min(max_records, len(lines))
        raw = [lines.popleft() for _ in range(take)]
        first_line = split["line"] + 1
        split["offset"] += sum(len(line) + 1 for line in raw)
        if not lines and self._eof and self._tail == b"":
            # The last line may lack a newline; never step past the end of the file.
            split["offset"] = min(split["offset"], os.fstat(self._file.fileno()).st_size)
        split["line"] += take
        self._position = f"{split['path']}:{first_line}-{split['line']}"
        if self.json:
            values = []
            for number, line in enumerate(raw, first_line):
                if not line.strip():
                    continue
                try:
                    values.append(orjson.loads(line))
                except orjson.JSONDecodeError as exc:
                    msg = f"{split['path']} line {number}: invalid JSON ({exc}): {line[:200]!r}"
                    raise RecordFormatError(msg) from None
            return values
        try:
            return [line.decode("utf-8").rstrip("\r") for line in raw]
        except UnicodeDecodeError:
            # Rare: find the line to name, decoding them one by one.
            for number, line in enumerate(raw, first_line):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _not_utf8(split["path"], number, exc) from None
            raise

    def snapshot_splits(self) -> list[Any]:
        return [dict(s) for s in self.done] + [dict(s) for s in self.splits]

    def describe_position(self) -> str | None:
        return self._position or None

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _not_utf8(path: str, line_number: int, error: UnicodeDecodeError) -> RecordFormatError:
    msg = (
        f"{path} line {line_number}: not valid UTF-8 (byte {error.start + 1} of the line: "
        f"{error.reason}); the file source reads text as UTF-8: convert the file, e.g. with "
        "iconv -f latin1 -t utf-8"
    )
    return RecordFormatError(msg)


@contextlib.contextmanager
def _output_errors(what: str) -> Iterator[None]:
    """An output path the sink cannot create or write (a file in the way, no permission) as the
    one line that names it."""
    try:
        yield
    except OSError as exc:
        # mkdir under a file says "File exists" or "Not a directory".
        in_the_way = isinstance(exc, FileExistsError | NotADirectoryError)
        reason = "a file is in the way" if in_the_way else exc.strerror or str(exc)
        msg = f"{what} ({reason}): give another output path or fix its permissions"
        raise InfrastructureError(msg) from None


class JsonLinesFileSink(Sink):
    """Writes each record as one JSON line (orjson). Not transactional: for exactly-once output
    use the two-phase-commit file sink.

    At parallelism 1 it writes ``path``; at higher parallelism subtask *i* writes ``path.i``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def name(self) -> str:
        return f"JsonLines({self.path.name})"

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        path = self.path
        if context.parallelism > 1:
            path = path.with_name(f"{path.name}.{context.subtask_index}")
        return _JsonLinesWriter(path)


class _JsonLinesWriter(SinkWriter):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None
        self._in_flight: asyncio.Future[Any] | None = None

    async def open(self) -> None:
        with _output_errors(f"JSON-lines file sink: cannot write {str(self.path)!r}"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = await aiofiles.open(self.path, "wb")

    async def write(self, values: list[Any]) -> None:
        dumps = orjson.dumps
        # The write runs in aiofiles' thread: a cancel of the task (SIGTERM, failover) must not
        # abandon it half way, so it is shielded and close() waits for it. Every record this
        # writer was given is then on disk.
        self._in_flight = asyncio.ensure_future(
            self._file.write(b"".join([dumps(v) + b"\n" for v in values]))
        )
        await asyncio.shield(self._in_flight)

    async def finish(self) -> None:
        await self._file.flush()

    async def close(self) -> None:
        if self._file is None:
            return
        in_flight, self._in_flight = self._in_flight, None
        try:
            if in_flight is not None and not in_flight.done():
                await in_flight
        finally:
            await self._file.close()
            self._file = None


class TwoPhaseCommitFileSink(Sink):
    """Exactly-once JSON-lines output into a directory: only committed files are visible.

    Per subtask, records go to an in-progress part file ``.part-<subtask>-<token>-<n>.inprogress``.

    1. Snapshot (pre-commit) for checkpoint *c*: the in-progress file is flushed, fsynced and
       renamed to ``.part-<subtask>-<token>-<n>-chk<c>.pending``; the pending file and its final
       name go into operator state.
    2. ``notify_checkpoint_complete(m)``: every pending file of checkpoints ``<= m`` is renamed to
       its final name ``part-<subtask>-<token>-<n>-chk<c>.jsonl``. The final name keeps the
       checkpoint *c* whose snapshot sealed it: the file holds records that came after the source
       positions of every checkpoint older than *c*.
    3. Restore from checkpoint (or savepoint) *r*, before any record is replayed:

       - Every name in the restored state must be a plain ``.part-….pending`` name inside the
         directory, with the matching ``part-….jsonl`` final name; anything else (an absolute path,
         ``../``) refuses the restore (``RestoreRefusedError``), so a crafted checkpoint cannot
         rename files elsewhere.
       - Committed files of checkpoints newer than *r* (after a fallback past a damaged checkpoint,
         or a restore from an old savepoint) hold records that the restore replays. By default
         (``--on-newer-committed-output move``) they are moved to the dot-folder
         ``.rolled-back-after-chk-<r>/`` and a warning lists them, so the visible output is again
         exactly once. The trade-off: a consumer that already read a moved file has seen those
         records, and sees them again when they are committed anew. ``fail`` refuses the restore
         instead, naming the directory, the checkpoints and the files; ``keep`` leaves them and
         warns that duplicates follow.
       - Moving files aside abandons the checkpoints newer than *r*: they belong to the run the
         user left. The rolled-back folder gets a manifest, ``_manifest.json`` (*r*, the abandoned
         checkpoint ids: the newer completed ones of the checkpoint directory and those of the
         moved files, and the time). A later restore of a checkpoint that a manifest lists as
         abandoned (and that was taken before that restore) is refused, naming the folder and the
         ways out: its run's output is incomplete in the directory. The checkpoint storage marks
         those checkpoints abandoned too, but only once the restore succeeded; the manifest
         covers a crash before that, and checkpoint folders copied elsewhere.
       - Pending files named in the restored state are committed (idempotently: a file already
         renamed is left alone). A named file that is neither pending nor committed in the
         directory refuses the restore, before anything is moved: the checkpoint wrote to another
         directory, its output was deleted, or it was moved aside by the restore of an older
         checkpoint (then the restored checkpoint belongs to the run that restore abandoned).
       - Pending files of checkpoints newer than *r* that never completed (no ``chk-<id>`` with
         ``_metadata`` in the checkpoint directory) are deleted; pending files of completed
         checkpoints are never touched, nor are older pending files that another subtask's share of
         the restored state may name.
       - At ``open``, this subtask's orphaned in-progress files are deleted.

       Each subtask handles the files of its own index; subtask 0 also those of indexes at or above
       the new parallelism, so no two subtasks touch the same file.
    4. Start without restored state for this sink: the sink counts as restored when the restored
       checkpoint contains its operator, whatever it holds (its list state is always recorded, also
       empty, so every subtask of a restored sink, at any parallelism, gets ``restore``). Otherwise,
       if the directory already holds committed files, the start is refused: writing everything
       again would duplicate them. ``--allow-existing-output`` writes next to them knowingly.

    Names that start with a dot are never output: readers should ignore them (most tools do).
    Committed files written before file names carried their checkpoint (``part-…-<n>.jsonl``) are
    still listed by :func:`committed_files` but never moved.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def name(self) -> str:
        return f"TwoPhaseCommitFiles({self.directory.name})"

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        return _TwoPhaseCommitWriter(self.directory, context)


def committed_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The committed (visible) part files of a two-phase-commit file sink, sorted by name."""
    return sorted(p for p in Path(directory).glob("part-*.jsonl"))


_ROLLED_BACK_PREFIX = ".rolled-back-after-chk-"


def rolled_back_folder(directory: str | os.PathLike[str], checkpoint_id: int) -> Path:
    """Where a restore from ``checkpoint_id`` moves the files that newer checkpoints committed."""
    return Path(directory) / f"{_ROLLED_BACK_PREFIX}{checkpoint_id}"


ROLLBACK_MANIFEST = "_manifest.json"
_manifest_lock = threading.Lock()
"""Subtasks of one sink merge into the same manifest from aiofiles' worker threads."""


def _record_rollback(folder: Path, restored_id: int, abandoned: set[int]) -> None:
    """Merge ``abandoned`` into the manifest of the rolled-back ``folder`` (atomically)."""
    path = folder / ROLLBACK_MANIFEST
    with _manifest_lock:
        manifest = _read_manifest(path) or {}
        known = {c for c in manifest.get("abandoned", []) if isinstance(c, int)}
        manifest = {
            "restored": restored_id,
            "abandoned": sorted(known | abandoned),
            "time_ms": int(time.time() * 1000),
        }
        temp = folder / f".{ROLLBACK_MANIFEST}.tmp"
        with open(temp, "wb") as f:
            f.write(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """A rollback manifest if it exists and has the shape ``_record_rollback`` writes."""
    try:
        manifest = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    valid = (
        isinstance(manifest, dict)
        and isinstance(manifest.get("restored"), int)
        and isinstance(manifest.get("time_ms"), int)
        and isinstance(manifest.get("abandoned"), list)
    )
    return manifest if valid else None


_COMMITTED = re.compile(r"part-(?P<subtask>\d+)-[0-9a-f]+-\d+-chk(?P<checkpoint>\d+)\.jsonl")
_PENDING = re.compile(r"\.part-(?P<subtask>\d+)-[0-9a-f]+-\d+-chk(?P<checkpoint>\d+)\.pending")
_PENDING_SUFFIX = ".pending"
_LISTED_FILES = 5


class _TwoPhaseCommitWriter(SinkWriter):
    def __init__(self, directory: Path, context: RuntimeContext) -> None:
        self.directory = directory
        self.subtask = context.subtask_index
        self.parallelism = context.parallelism
        self.label = (
            f"two-phase file sink {context.operator_name!r} "
            f"(subtask {self.subtask + 1}/{self.parallelism})"
        )
        self.restore_context = context.restore
        self.token = os.urandom(4).hex()
        self.counter = 0
        self.restored = False
        """Set by ``restore``: the restored checkpoint contains this sink."""
        self._file: Any = None
        self._current: Path | None = None
        self.pending: list[dict[str, Any]] = []
        """``{"checkpoint": id, "pending": name, "final": name}`` for files not yet committed."""

    # ---------------------------------------------------------------- restore and start

    async def restore(self, state: list[Any]) -> None:
        from actors.faults import crash_point

        crash_point("during-restore", f"two-phase file sink subtask {self.subtask}")
        self.restored = True
        restored_id = self.restore_context.checkpoint_id
        entries = [self._checked_entry(entry, restored_id) for entry in state]
        self._create_directory()
        self._refuse_missing_files(entries, restored_id)
        self._refuse_abandoned(restored_id)
        if restored_id is not None:
            await self._handle_newer_committed_output(restored_id)
        for entry in entries:
            await self._commit(entry)
        self._delete_stale_pending(restored_id, {entry["pending"] for entry in entries})

    def _checked_entry(self, entry: Any, restored_id: int | None) -> dict[str, Any]:
        """``entry`` if it names a pending file inside the directory and its final name there."""
        pending = entry.get("pending") if isinstance(entry, dict) else None
        final = entry.get("final") if isinstance(entry, dict) else None
        checkpoint = entry.get("checkpoint") if isinstance(entry, dict) else None
        if (
            isinstance(pending, str)
            and _is_plain_name(pending, self.directory)
            and pending.startswith(".part-")
            and pending.endswith(_PENDING_SUFFIX)
            and final == pending[1 : -len(_PENDING_SUFFIX)] + ".jsonl"
            and isinstance(checkpoint, int)
            and not isinstance(checkpoint, bool)
        ):
            return entry  # type: ignore[no-any-return]
        msg = (
            f"{self.label}: checkpoint {restored_id} names the pending file {pending!r} "
            f"(final name {final!r}, checkpoint {checkpoint!r}), which is not a plain "
            f"'.part-….pending' name inside the output directory {self.directory}; refusing to "
            "rename files from a checkpoint that was not written by this sink. Restore a "
            "checkpoint or savepoint written by this job."
        )
        raise RestoreRefusedError(msg)

    def _refuse_missing_files(self, entries: list[dict[str, Any]], restored_id: int | None) -> None:
        """Each restored file must be in the directory, pending or committed; otherwise the
        checkpoint wrote elsewhere, or its output was moved or deleted, and no retry helps."""
        missing = [
            entry["final"]
            for entry in entries
            if not (self.directory / entry["pending"]).exists()
            and not (self.directory / entry["final"]).exists()
        ]
        if not missing:
            return
        moved = sorted(
            folder.name
            for folder in self.directory.glob(f"{_ROLLED_BACK_PREFIX}*")
            if any((folder / name).exists() for name in missing)
        )
        why = (
            f"they were moved to {', '.join(moved)} by a restore of an older checkpoint, so "
            f"checkpoint {restored_id} belongs to the run that restore abandoned: restore the "
            "newest checkpoint of the resumed run, or the older checkpoint again"
            if moved
            else "the checkpoint wrote to another output directory, or its output was moved or "
            "deleted: restore it with the output directory it wrote to, or restore a checkpoint "
            "written into this one"
        )
        msg = (
            f"{self.label}: checkpoint {restored_id} names {len(missing)} file(s) that are "
            f"neither pending nor committed in the output directory {self.directory} "
            f"({_listing(missing)}); {why}."
        )
        raise RestoreRefusedError(msg)

    def _refuse_abandoned(self, restored_id: int | None) -> None:
        """Refuse to restore a checkpoint that a rollback manifest lists as abandoned: the files
        its run committed after the restored checkpoint of that rollback are moved aside, so the
        visible output would silently lack their records."""
        if restored_id is None:
            return
        taken_ms = self.restore_context.checkpoint_timestamp_ms
        listing = []
        for path in self.directory.glob(f"{_ROLLED_BACK_PREFIX}*/{ROLLBACK_MANIFEST}"):
            manifest = _read_manifest(path)
            # A checkpoint taken after the rollback is of a later run (ids of another checkpoint
            # directory may repeat the abandoned ones).
            if (
                manifest is not None
                and restored_id in manifest["abandoned"]
                and (taken_ms is None or taken_ms <= manifest["time_ms"])
            ):
                listing.append((manifest["time_ms"], manifest["restored"], path))
        if not listing:
            return
        time_ms, rolled_back_to, path = max(listing)
        msg = (
            f"{self.label}: checkpoint {restored_id} was abandoned: a restore of checkpoint "
            f"{rolled_back_to} on {format_local_time(time_ms)} moved the output committed after it to {path.parent}, "
            f"so restoring checkpoint {restored_id} would silently lack those records. Restore "
            f"checkpoint {rolled_back_to} again or a checkpoint of the run that resumed from it; "
            f"or, to return to checkpoint {restored_id}'s run, move the files of {path.parent} "
            f"back into {self.directory} and delete {path}."
        )
        raise RestoreRefusedError(msg)

    def _is_mine(self, subtask_index: int) -> bool:
        """Whether this subtask handles leftovers of ``subtask_index`` (each file has one owner)."""
        if subtask_index == self.subtask:
            return True
        return self.subtask == 0 and subtask_index >= self.parallelism

    def _my_files(self, pattern: re.Pattern[str]) -> list[tuple[Path, int]]:
        """This subtask's files whose names match ``pattern``, with their checkpoint ids."""
        found = []
        for path in sorted(self.directory.iterdir()):
            match = pattern.fullmatch(path.name)
            if match and self._is_mine(int(match["subtask"])):
                found.append((path, int(match["checkpoint"])))
        return found

    async def _handle_newer_committed_output(self, restored_id: int) -> None:
        newer = [(p, c) for p, c in self._my_files(_COMMITTED) if c > restored_id]
        if not newer:
            return
        checkpoints = ", ".join(str(c) for c in sorted({c for _, c in newer}))
        names = _listing([p.name for p, _ in newer])
        policy = self.restore_context.on_newer_committed_output
        if policy is NewerOutputPolicy.FAIL:
            msg = (
                f"{self.label}: restoring checkpoint {restored_id}, but {self.directory} holds "
                f"{len(newer)} file(s) committed by newer checkpoint(s) {checkpoints} ({names}); "
                "replaying from the older checkpoint would commit their records again. Restore "
                "the newest checkpoint, or pass --on-newer-committed-output move (move them "
                "aside) or keep (accept the duplicates)."
            )
            raise RestoreRefusedError(msg)
        if policy is NewerOutputPolicy.KEEP:
            log.warning(
                "%s: restoring checkpoint %d, keeping %d file(s) in %s committed by newer "
                "checkpoint(s) %s (%s) as --on-newer-committed-output keep asks: their records "
                "are committed again, the output holds duplicates",
                self.label,
                restored_id,
                len(newer),
                self.directory,
                checkpoints,
                names,
            )
            return
        folder = rolled_back_folder(self.directory, restored_id)
        await aiofiles.os.makedirs(folder, exist_ok=True)
        abandoned = {c for _, c in newer} | set(self.restore_context.newer_completed_checkpoints)
        # The manifest first: a crash halfway through the moves still leaves the record.
        await aiofiles.os.wrap(_record_rollback)(folder, restored_id, abandoned)
        for path, _ in newer:
            await aiofiles.os.replace(path, folder / path.name)
        log.warning(
            "%s: restoring checkpoint %d, moved %d file(s) committed by newer checkpoint(s) %s "
            "from %s to %s, since their records are replayed (%s); a consumer that already read "
            "them sees those records again",
            self.label,
            restored_id,
            len(newer),
            checkpoints,
            self.directory,
            folder,
            names,
        )

    def _delete_stale_pending(self, restored_id: int | None, referenced: set[str]) -> None:
        """Delete this subtask's pending files of checkpoints after ``restored_id`` that never
        completed: nothing can commit them, and their records are replayed."""
        completed = set(self.restore_context.newer_completed_checkpoints)
        stale = [
            path
            for path, checkpoint in self._my_files(_PENDING)
            if path.name not in referenced
            and (restored_id is None or checkpoint > restored_id)
            and checkpoint not in completed
        ]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            log.info(
                "%s: deleted %d pending file(s) of checkpoints that never completed (%s)",
                self.label,
                len(stale),
                _listing([p.name for p in stale]),
            )

    def _refuse_existing_output(self) -> None:
        existing = committed_files(self.directory)
        if not existing:
            return
        if self.restore_context.allow_existing_output:
            log.warning(
                "%s: starting without restored state into %s, which already holds %d committed "
                "file(s) (--allow-existing-output): the new output is added to them",
                self.label,
                self.directory,
                len(existing),
            )
            return
        context = self.restore_context
        if context.checkpoint_id is not None:
            start = f"checkpoint {context.checkpoint_id} has no state for this sink"
            restore = "restore a checkpoint or savepoint that contains this sink (--restore PATH)"
        elif context.checkpoint_dir is None:
            start = "the job starts from the beginning"
            restore = "restore a savepoint of the run that wrote them (--restore PATH)"
        else:
            start = "the job starts from the beginning"
            restore = (
                "restore the checkpoint or savepoint that wrote them (--restore PATH, or "
                "--restore latest when it is in the checkpoint directory)"
            )
        msg = (
            f"{self.label}: the output directory {self.directory} already holds "
            f"{len(existing)} committed file(s) ({_listing([p.name for p in existing])}), but "
            f"{start}, so its records would be written again. Delete the old output, choose "
            f"another output directory, {restore}, or pass --allow-existing-output to add to "
            "them knowingly."
        )
        raise RestoreRefusedError(msg)

    def _create_directory(self) -> None:
        with _output_errors(f"{self.label}: cannot create {str(self.directory)!r}"):
            self.directory.mkdir(parents=True, exist_ok=True)

    async def open(self) -> None:
        self._create_directory()
        if not self.restored:
            self._refuse_existing_output()
            self._delete_stale_pending(None, set())
        # In-progress files of earlier attempts were never pre-committed: their records will be
        # replayed from the checkpoint's source positions, so they are garbage.
        for path in self.directory.glob(".part-*.inprogress"):
            index = path.name.split("-")[1]
            if index.isdigit() and self._is_mine(int(index)) and self.token not in path.name:
                path.unlink(missing_ok=True)

    # ---------------------------------------------------------------- writing and committing

    async def write(self, values: list[Any]) -> None:
        if self._file is None:
            self.counter += 1
            self._current = self.directory / (
                f".part-{self.subtask}-{self.token}-{self.counter:05d}.inprogress"
            )
            self._file = await aiofiles.open(self._current, "wb")
        dumps = orjson.dumps
        await self._file.write(b"".join([dumps(v) + b"\n" for v in values]))

    async def _seal(self) -> Path | None:
        if self._file is None:
            return None
        await self._file.flush()
        await aiofiles.os.wrap(os.fsync)(self._file.fileno())
        await self._file.close()
        self._file = None
        current = self._current
        self._current = None
        return current

    async def snapshot_state(self, checkpoint_id: int) -> list[Any]:
        sealed = await self._seal()
        if sealed is not None:
            stem = f"{sealed.name[1 : -len('.inprogress')]}-chk{checkpoint_id}"
            pending = sealed.with_name(f".{stem}{_PENDING_SUFFIX}")
            await aiofiles.os.replace(sealed, pending)
            self.pending.append(
                {"checkpoint": checkpoint_id, "pending": pending.name, "final": f"{stem}.jsonl"}
            )
        return [dict(p) for p in self.pending]

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        from actors.faults import crash_point

        due = [p for p in self.pending if p["checkpoint"] <= checkpoint_id]
        if not due:
            return
        crash_point("before-commit", f"two-phase file sink subtask {self.subtask}")
        for entry in due:
            await self._commit(entry)
        self.pending = [p for p in self.pending if p["checkpoint"] > checkpoint_id]

    async def _commit(self, entry: dict[str, Any]) -> None:
        pending = self.directory / entry["pending"]
        final = self.directory / entry["final"]
        if pending.exists():
            await aiofiles.os.replace(pending, final)
        elif not final.exists():
            msg = (
                f"two-phase file sink: pending file {pending} of checkpoint "
                f"{entry['checkpoint']} is missing and was never committed; output was lost"
            )
            raise FileNotFoundError(msg)

    async def close(self) -> None:
        if self._file is not None:
            await self._file.close()
            self._file = None


def _is_plain_name(name: str, directory: Path) -> bool:
    """Whether ``name`` is one file name that stays inside ``directory`` (no separator, no ``..``,
    not absolute)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return False
    inside = os.path.normpath(os.path.join(os.path.abspath(directory), name))
    return os.path.dirname(inside) == os.path.normpath(os.path.abspath(directory))


def _listing(names: list[str]) -> str:
    """The first few of ``names``, for one log or error line."""
    shown = ", ".join(names[:_LISTED_FILES])
    more = len(names) - _LISTED_FILES
    return f"{shown}, and {more} more" if more > 0 else shown
