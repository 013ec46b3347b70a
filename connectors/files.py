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
