"""Progress on the terminal: per operator its records in/out and their rates, backpressure and
watermark, and the job's checkpoints.

On a TTY the display is a table drawn with rich at the bottom of the terminal: what the job
prints (``.print()`` sinks on the same terminal), log lines and other stderr output scroll above
it, and it fits the terminal's width (operator names are cut with an ellipsis). Its last frame,
drawn once the job ended, stays on screen above the summary and shows the same counts. Otherwise
a plain line per operator is printed every ``plain_interval_s``.

The figures are the job master's metrics snapshot (:meth:`JobMaster.metrics_snapshot`), which
every view reads; the display computes none of its own and never touches task state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from actors.events import MAX_TIMESTAMP
from runtime.master.jobmaster import JobMaster, JobResult
from runtime.master.metrics import CheckpointCounts, JobMetricsSnapshot

EXACT_COUNT_BELOW = 10_000_000
"""Counts below this are shown in full (``9,999,999``: 9 columns), larger ones compact."""

WATERMARK_CLOCK_FROM_MS = 10**11
"""Watermarks from here on (1973) are epoch milliseconds, shown as a UTC time of day."""

BACKPRESSURE_WARN_MS_PER_S = 100.0
BACKPRESSURE_HIGH_MS_PER_S = 500.0


# --------------------------------------------------------------------------- formatting


def compact_number(n: float) -> str:
    """``0``, ``1.5``, ``950``, ``12.3k``, ``4.5M``, ``1.2G``: at most 6 characters."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= limit:
            scaled = n / limit
            return f"{scaled:.1f}{suffix}" if scaled < 100 else f"{scaled:.0f}{suffix}"
    if n < 10 and round(n, 1) != round(n):
        return f"{n:.1f}"
    return f"{n:.0f}"


def count_text(n: int) -> str:
    """A record count: in full (as the summary prints it) unless it is too wide."""
    return f"{n:,}" if n < EXACT_COUNT_BELOW else compact_number(n)


def rate_text(per_s: float | None) -> str:
    return "—" if per_s is None else compact_number(per_s)


def watermark_text(watermark: int | None, idle: bool) -> str:
    if idle:
        return "idle"
    if watermark is None:
        return "—"
    if watermark >= MAX_TIMESTAMP:
        return "end"
    if watermark >= WATERMARK_CLOCK_FROM_MS:
        return time.strftime("%H:%M:%S", time.gmtime(watermark / 1000))
    return compact_number(watermark) if watermark >= 0 else str(watermark)


def backpressure_text(ms_per_s: float | None) -> Text:
    if ms_per_s is None:
        return Text("—")
    style = ""
    if ms_per_s >= BACKPRESSURE_HIGH_MS_PER_S:
        style = "bold red"
    elif ms_per_s >= BACKPRESSURE_WARN_MS_PER_S:
        style = "yellow"
    return Text(f"{ms_per_s / 10:.0f}%", style=style)


def checkpoints_text(checkpoints: CheckpointCounts) -> str:
    """``checkpoints: 11 completed, 1 failed, 1 in progress; last #12 (35ms)``."""
    text = f"checkpoints: {checkpoints.completed} completed"
    if checkpoints.failed:
        text += f", {checkpoints.failed} failed"
    if checkpoints.in_progress:
        text += f", {checkpoints.in_progress} in progress"
    if checkpoints.last_completed_id is not None:
        text += f"; last #{checkpoints.last_completed_id}"
        if checkpoints.last_duration_ms is not None:
            text += f" ({checkpoints.last_duration_ms:.0f}ms)"
    return text


def duration_text(seconds: float) -> str:
    """``12.3s``, ``4m05s``, ``3h12m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def header_text(progress: JobMetricsSnapshot) -> str:
    return (
        f"job {progress.job!r} {progress.status} · attempt {progress.attempt} · "
        f"{duration_text(progress.uptime_s)}"
    )


# (header, width) of the columns after the operator's name; the name gets the rest of the line.
_COLUMNS = (
    ("p", 2),
    ("in", 9),
    ("in/s", 6),
    ("out", 9),
    ("out/s", 6),
    ("backpr", 6),
    ("watermark", 9),
)
_GAP = 2
_NAME_MIN = 8
_NAME_MAX = 40


def progress_table(progress: JobMetricsSnapshot, width: int) -> Group:
    """The frame drawn on a terminal ``width`` columns wide: the job's line, its checkpoints'
    line, the checkpoint failure alert while it is raised, and one row per operator; no line
    wider than ``width``."""
    fixed = sum(w for _, w in _COLUMNS) + _GAP * len(_COLUMNS)
    longest = max((len(op.name) for op in progress.operators), default=_NAME_MIN)
    name_width = max(_NAME_MIN, min(_NAME_MAX, longest, width - fixed))
    table = Table(box=None, padding=(0, 0, 0, _GAP), pad_edge=False, show_edge=False)
    table.add_column("operator", width=name_width, no_wrap=True, overflow="ellipsis")
    for title, column_width in _COLUMNS:
        table.add_column(title, width=column_width, justify="right", no_wrap=True)
    for op in progress.operators:
        name = Text(op.name, no_wrap=True, overflow="ellipsis")
        name.truncate(name_width, overflow="ellipsis")
        table.add_row(
            name,
            str(op.parallelism),
            count_text(op.records_in),
            rate_text(op.records_in_per_s),
            count_text(op.records_out),
            rate_text(op.records_out_per_s),
            backpressure_text(op.backpressured_ms_per_s),
            watermark_text(op.watermark, op.idle),
        )
    header = Text(header_text(progress), style="bold", no_wrap=True, overflow="ellipsis")
    header.truncate(width, overflow="ellipsis")
    lines = [header, Text(checkpoints_text(progress.checkpoints))]
    if progress.alert.active:
        lines.append(Text(f"alert: {progress.alert.message}", style="bold red"))
    for line in lines[1:]:
        line.no_wrap = True
        line.truncate(width, overflow="ellipsis")
    return Group(*lines, table)


def plain_lines(progress: JobMetricsSnapshot) -> list[str]:
    """The lines written when the output is not a terminal."""
    width = min(max((len(op.name) for op in progress.operators), default=10), 48)
    lines = [f"{header_text(progress)} · {checkpoints_text(progress.checkpoints)}"]
    if progress.alert.active:
        lines.append(f"alert: {progress.alert.message}")
    for op in progress.operators:
        lines.append(
            f"  {op.name[:width]:<{width}}  in {op.records_in:>10,} "
            f"({rate_text(op.records_in_per_s):>6}/s)  out {op.records_out:>10,} "
            f"({rate_text(op.records_out_per_s):>6}/s)"
        )
    return lines


# --------------------------------------------------------------------------- the reporter


def _same_terminal(a: TextIO, b: TextIO) -> bool:
    """Whether both streams write to one terminal (so one display may carry both)."""
    try:
        if not (a.isatty() and b.isatty()):
            return False
        return os.fstat(a.fileno()).st_rdev == os.fstat(b.fileno()).st_rdev
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def _logging_to(stream: TextIO, replaced: tuple[TextIO, ...]) -> Iterator[None]:
    """Root log handlers that write to one of ``replaced`` write to ``stream`` meanwhile (the
    live display's proxy, which prints them above the table instead of into it)."""
    switched: list[tuple[logging.StreamHandler[TextIO], TextIO]] = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in replaced:
            old = handler.setStream(stream)
            if old is not None:
                switched.append((handler, old))
    try:
        yield
    finally:
        for handler, old in switched:
            handler.setStream(old)


class _RenderedFrame:
    """A frame rendered once, whose lines the live display replays each time it redraws: it
    redraws after every line the job prints, and rendering the table each time would cost more
    than printing the records."""

    def __init__(self, console: Console, frame: Group) -> None:
        self.lines = console.render_lines(frame, pad=False)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        newline = Segment.line()
        for line in self.lines:
            yield from line
            yield newline


class ProgressReporter:
    def __init__(
        self,
        master: JobMaster,
        stream: TextIO | None = None,
        interval_s: float = 0.5,
        plain_interval_s: float = 5.0,
    ) -> None:
        self.master = master
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = interval_s if self.tty else plain_interval_s

    def _progress(self) -> JobMetricsSnapshot:
        return self.master.metrics_snapshot()

    def _frame(self, console: Console) -> _RenderedFrame:
        return _RenderedFrame(console, progress_table(self._progress(), console.width))

    def draw(self) -> None:
        """Write the plain lines (the output is not a terminal)."""
        self.stream.write("\n".join(plain_lines(self._progress())) + "\n")
        self.stream.flush()

    async def run(self) -> None:
        """Show progress until cancelled; on a terminal the last frame, drawn when cancelled
        (the job ended), stays on screen."""
        if not self.tty:
            while True:
                await asyncio.sleep(self.interval_s)
                self.draw()
        console = Console(
            file=self.stream, markup=False, emoji=False, highlight=False, soft_wrap=False
        )
        # What the job writes to this terminal goes through the display, which prints it above
        # the table: stdout too when it is this terminal (a redirected stdout stays as it is).
        on_terminal = [self.stream, sys.stderr]
        if _same_terminal(sys.stdout, self.stream):
            on_terminal.append(sys.stdout)
        live = Live(
            console=console,
            auto_refresh=False,
            redirect_stdout=sys.stdout in on_terminal,
            redirect_stderr=True,
            transient=False,
        )
        with live:
            # sys.stderr is the live display's proxy now.
            with _logging_to(sys.stderr, tuple(on_terminal)):
                try:
                    while True:
                        live.update(self._frame(console), refresh=True)
                        await asyncio.sleep(self.interval_s)
                finally:
                    live.update(self._frame(console), refresh=True)

    def summary(self, result: JobResult) -> None:
        out = self.stream
        out.write(
            f"job {result.job_name!r} finished in {result.duration_s:.2f}s "
            f"({result.attempts} attempt{'s' if result.attempts != 1 else ''}, "
            f"{result.checkpoints_completed} checkpoint"
            f"{'s' if result.checkpoints_completed != 1 else ''})\n"
        )
        for summary in result.operators:
            out.write(
                f"  {summary.name}: {summary.records_in:,} in, {summary.records_out:,} out "
                f"(parallelism {summary.parallelism})\n"
            )
        out.flush()
