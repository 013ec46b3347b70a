"""Progress on the terminal: records in/out per operator and their rates.

On a TTY the table is redrawn in place; otherwise a plain line per operator is printed every
``plain_interval_s``. The reporter only reads counters; it never touches task state.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from runtime.master.jobmaster import JobMaster, JobResult


def _rate(n: float) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f}M/s"
    if n >= 1_000:
        return f"{n / 1_000:.1f}k/s"
    return f"{n:.0f}/s"


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
        self._drawn = 0
        self._last: dict[str, tuple[int, int]] = {}
        self._last_time = time.monotonic()

    def _lines(self) -> list[str]:
        now = time.monotonic()
        dt = max(1e-6, now - self._last_time)
        self._last_time = now
        master = self.master
        lines = [
            f"job {master.graph.name!r} {master.status} · attempt {master.attempt} · "
            f"{now - master.started:.1f}s · checkpoints {len(master.coordinator.completed_ids)}"
        ]
        width = max((len(s.name) for s in master.operator_summaries()), default=10)
        width = min(width, 48)
        for summary in master.operator_summaries(include_live=True):
            last_in, last_out = self._last.get(
                summary.uid, (summary.records_in, summary.records_out)
            )
            self._last[summary.uid] = (summary.records_in, summary.records_out)
            rate_in = max(0, summary.records_in - last_in) / dt
            rate_out = max(0, summary.records_out - last_out) / dt
            lines.append(
                f"  {summary.name[:width]:<{width}}  in {summary.records_in:>10,} "
                f"({_rate(rate_in):>8})  out {summary.records_out:>10,} ({_rate(rate_out):>8})"
            )
        return lines

    def draw(self) -> None:
        lines = self._lines()
        out = self.stream
        if self.tty:
            if self._drawn:
                out.write(f"\x1b[{self._drawn}F")
            for line in lines:
                out.write("\x1b[2K" + line + "\n")
            self._drawn = len(lines)
        else:
            out.write("\n".join(lines) + "\n")
        out.flush()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.draw()

    def summary(self, result: JobResult) -> None:
        out = self.stream
        if self.tty and self._drawn:
            self.draw()
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
