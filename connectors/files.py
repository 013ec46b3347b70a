"""Bounded file source (text or JSON lines) and a simple JSON-lines file sink.

The file source reads whole files as splits: one split per file (a directory gives one per file,
sorted by name), assigned evenly over the source's subtasks. A split carries the byte offset and
line number of the next unread line, kept in operator state, so a restore resumes exactly there.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import orjson

from runtime.functions import RuntimeContext
from runtime.sinks import Sink, SinkWriter
from runtime.sources import END_OF_INPUT, EndOfInput, Source, SourceReader, SourceReaderContext

_CHUNK = 1 << 18


class RecordFormatError(ValueError):
    """A line could not be parsed; names the file and line."""


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
            msg = f"FileSource: input {str(self.path)!r} does not exist"
            raise FileNotFoundError(msg)
        return [self.path]

    def create_splits(self, parallelism: int) -> list[Any]:
        return [{"path": str(p), "offset": 0, "line": 0} for p in self._files()]

    def create_reader(self, context: SourceReaderContext) -> SourceReader[Any]:
        return _FileReader(self.format)


class _FileReader(SourceReader[Any]):
    def __init__(self, format: str) -> None:
        self.json = format == "json"
        self.splits: deque[dict[str, Any]] = deque()
        self.done: list[dict[str, Any]] = []
        self._file: Any = None
        self._lines: deque[bytes] = deque()
        self._tail = b""
        self._eof = False
        self._position = ""

    def add_splits(self, splits: list[Any]) -> None:
        for split in splits:
            self.splits.append(dict(split))

    def _open_current(self) -> bool:
        while self.splits:
            split = self.splits[0]
            if self._file is None:
                self._file = open(split["path"], "rb")
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
        return [line.decode("utf-8").rstrip("\r") for line in raw]

    def snapshot_splits(self) -> list[Any]:
        return [dict(s) for s in self.done] + [dict(s) for s in self.splits]

    def describe_position(self) -> str | None:
        return self._position or None

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = await aiofiles.open(self.path, "wb")

    async def write(self, values: list[Any]) -> None:
        dumps = orjson.dumps
        await self._file.write(b"".join([dumps(v) + b"\n" for v in values]))

    async def finish(self) -> None:
        await self._file.flush()

    async def close(self) -> None:
        if self._file is not None:
            await self._file.close()
            self._file = None


class TwoPhaseCommitFileSink(Sink):
    """Exactly-once JSON-lines output into a directory: only committed files are visible.

    Per subtask, records go to an in-progress part file ``.part-<subtask>-<token>-<n>.inprogress``.

    1. Snapshot (pre-commit): the in-progress file is flushed, fsynced and renamed to
       ``.part-….pending``; the pending file and its final name go into operator state.
    2. ``notify_checkpoint_complete(n)``: every pending file of checkpoints ``<= n`` is renamed to
       its final name ``part-<subtask>-<token>-<n>.jsonl``.
    3. Restore: pending files named in the restored state are committed (idempotently: a file
       already renamed is left alone), and this subtask's orphaned in-progress files are deleted.

    Names that start with a dot are never output: readers should ignore them (most tools do).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def name(self) -> str:
        return f"TwoPhaseCommitFiles({self.directory.name})"

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        return _TwoPhaseCommitWriter(self.directory, context.subtask_index, context.parallelism)


def committed_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The committed (visible) part files of a two-phase-commit file sink, sorted by name."""
    return sorted(p for p in Path(directory).glob("part-*.jsonl"))


class _TwoPhaseCommitWriter(SinkWriter):
    def __init__(self, directory: Path, subtask: int, parallelism: int) -> None:
        self.directory = directory
        self.subtask = subtask
        self.parallelism = parallelism
        self.token = os.urandom(4).hex()
        self.counter = 0
        self._file: Any = None
        self._current: Path | None = None
        self.pending: list[dict[str, Any]] = []
        """``{"checkpoint": id, "pending": name, "final": name}`` for files not yet committed."""

    async def restore(self, state: list[Any]) -> None:
        from actors.faults import crash_point

        crash_point("during-restore", f"two-phase file sink subtask {self.subtask}")
        self.directory.mkdir(parents=True, exist_ok=True)
        for entry in state:
            await self._commit(entry)

    async def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # In-progress files of earlier attempts were never pre-committed: their records will be
        # replayed from the checkpoint's source positions, so they are garbage.
        mine = f".part-{self.subtask}-"
        for path in self.directory.glob(".part-*.inprogress"):
            index = path.name.split("-")[1]
            orphan_of_removed_subtask = self.subtask == 0 and int(index) >= self.parallelism
            if (
                path.name.startswith(mine) or orphan_of_removed_subtask
            ) and self.token not in path.name:
                path.unlink(missing_ok=True)

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
            stem = sealed.name[1 : -len(".inprogress")]
            pending = sealed.with_name(f".{stem}.pending")
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
