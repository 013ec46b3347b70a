"""The progress display: the job master's counts once a job ended (what the display's last frame
and the summary read), and ``python -m runtime run`` in an 80x24 pseudo-terminal read through a
terminal emulator: the records the job prints stay on screen above the table, no line of the
display is wider than the terminal, a log line does not break it, and its last frame shows the
summary's counts."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

from cli_helpers import ROOT, run_in_terminal
from rich.console import Console

from connectors import CollectionSource, CollectSink
from runtime import Job
from runtime.master.jobmaster import JobMaster
from runtime.master.metrics import (
    AlertStatus,
    CheckpointCounts,
    JobMetricsSnapshot,
    OperatorMetrics,
)
from runtime.plan.jobfile import build_graph
from runtime.shell.progress import progress_table

RECORDS = 50
PRINTING_JOB = ROOT / "tests" / "jobs" / "printed_progress.py"
PRINTED = 60
TABLE_HEADER = re.compile(r"^operator\s+p\s+in\s+in/s\s+out\s+out/s\s+backpr\s+watermark$")
SUMMARY_LINE = re.compile(r"^  (.+): ([\d,]+) in, ([\d,]+) out \(parallelism \d+\)$")


def _counted_job(job: Job) -> None:
    job.from_source(CollectionSource(list(range(RECORDS)))).map(
        lambda n: n * 2, name="double"
    ).sink_to(CollectSink())


def test_counts_after_the_job_ended_equal_the_result() -> None:
    """Once a job ended, its live counters are already in the totals: the counts read with the
    live ones (the display's last frame, ``/status``) are the result's, not twice them."""
    master = JobMaster(build_graph(_counted_job, None, 1))
    result = asyncio.run(master.run())
    counts = {s.uid: (s.records_in, s.records_out) for s in result.operators}
    assert counts[next(s.uid for s in result.operators if s.name == "double")] == (
        RECORDS,
        RECORDS,
    )
    after = {s.uid: (s.records_in, s.records_out) for s in master.operator_summaries(True)}
    assert after == counts


def test_the_display_in_an_80_column_terminal_keeps_records_and_ends_with_the_summary() -> None:
    run = run_in_terminal(
        "run",
        str(PRINTING_JOB),
        "--set",
        f"count={PRINTED}",
        "--set",
        "rate=40",
        "--rest-port",
        "-1",
    )
    screen = run.screen_lines()
    shown = "\n".join(screen)
    assert run.returncode == 0, shown

    # Every record is on screen (in the scrollback), whole and in order, none lost to a redraw.
    records = [line for line in screen if line.startswith("record ")]
    assert records == [f"record {i:04d}" for i in range(PRINTED)], shown
    # The job's log line is there too, whole.
    assert any(re.search(r"WARNING \S+: halfway at record 30$", line) for line in screen), shown

    # One table, at the bottom: earlier frames were redrawn in place, none left behind.
    headers = [i for i, line in enumerate(screen) if TABLE_HEADER.match(line)]
    assert len(headers) == 1, shown
    summary_at = next(i for i, line in enumerate(screen) if " finished in " in line)
    frame_rows = screen[headers[0] + 1 : summary_at]
    assert not any(line.startswith("record ") for line in screen[headers[0] :]), shown

    # Until the summary, nothing written is wider than the terminal (the long name is cut).
    written = run.text_lines()
    until_summary = written[: next(i for i, line in enumerate(written) if " finished in " in line)]
    too_wide = [line for line in until_summary if len(line) > run.columns]
    assert not too_wide, too_wide
    assert any(row.startswith("format every recor") and "…" in row for row in frame_rows), shown

    # The last frame shows the summary's counts, operator by operator (the summary's lines as
    # written: the terminal wraps the long one).
    summary = [SUMMARY_LINE.match(line) for line in written[len(until_summary) + 1 :]]
    summary_counts = [(m.group(2), m.group(3)) for m in summary if m is not None]
    frame_counts = [(row.split()[-6], row.split()[-4]) for row in frame_rows]
    assert len(summary_counts) == 3, written
    assert frame_counts == summary_counts, shown
    checkpoints = re.search(r"\((\d+) attempts?, (\d+) checkpoints?\)", written[len(until_summary)])
    assert checkpoints, written
    assert screen[headers[0] - 1].startswith(f"checkpoints: {checkpoints.group(2)} completed")
    assert screen[headers[0] - 2].startswith("job 'printed_progress' finished · attempt 1 ")
    assert summary_counts[1] == (f"{PRINTED}", f"{PRINTED}")


def test_with_stdout_redirected_the_records_go_to_the_file_and_the_display_stays_on_the_terminal(
    tmp_path: Path,
) -> None:
    """``run job.py > records.txt`` on a terminal: the display must not take the records over
    to the terminal (stderr); they all go to the file, and only there."""
    records_file = tmp_path / "records.txt"
    run = run_in_terminal(
        "run", str(PRINTING_JOB), "--set", f"count={PRINTED}", "--set", "rate=200",
        "--rest-port", "-1", stdout_path=records_file,
    )  # fmt: skip
    screen = run.screen_lines()
    assert run.returncode == 0, screen
    assert records_file.read_text().splitlines() == [f"record {i:04d}" for i in range(PRINTED)]
    assert not any(line.startswith("record ") for line in screen), screen
    assert sum(1 for line in screen if TABLE_HEADER.match(line)) == 1, screen


def _operator(name: str, **figures: object) -> OperatorMetrics:
    defaults: dict[str, object] = {
        "uid": name,
        "name": name,
        "vertex": 0,
        "parallelism": 1,
        "records_in": 0,
        "records_out": 0,
        "records_in_per_s": None,
        "records_out_per_s": None,
        "busy_ms_per_s": None,
        "idle_ms_per_s": None,
        "backpressured_ms_per_s": None,
        "watermark": None,
        "idle": False,
        "input_watermark": None,
        "late_records_dropped": 0,
        "subtasks": (),
    }
    return OperatorMetrics(**{**defaults, **figures})


def test_a_frame_fits_80_columns_with_large_figures_and_shows_what_it_knows() -> None:
    progress = JobMetricsSnapshot(
        job="a job whose name is long enough to need cutting at eighty columns, surely",
        status="running",
        attempt=3,
        uptime_s=3725.0,
        restarts=2,
        operators=(
            _operator(
                "Source: Kafka(events-with-a-very-long-topic-name)",
                parallelism=12,
                records_out=123_456_789_012,
                records_out_per_s=98_765.4,
                backpressured_ms_per_s=870.0,
                watermark=1_767_225_600_000,  # 2026-01-01T00:00:00Z
            ),
            _operator("count", records_in=9_999_999, records_out=42, idle=True),
            _operator("Sink: Print", records_in=42, records_in_per_s=1.5),
        ),
        checkpoints=CheckpointCounts(
            completed=1234,
            failed=2,
            in_progress=1,
            last_duration_ms=87.4,
            last_size_bytes=4096,
            last_completed_id=1236,
        ),
        alert=AlertStatus(active=True, message="3 checkpoints failed within 10min: timed out"),
        source_lag={},
    )
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(progress_table(progress, 80))
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    header, checkpoints, alert, columns, source, count, sink = lines
    assert alert == "alert: 3 checkpoints failed within 10min: timed out"
    assert header.startswith("job 'a job whose name") and header.endswith("…")
    assert checkpoints == (
        "checkpoints: 1234 completed, 2 failed, 1 in progress; last #1236 (87ms)"
    )
    assert columns.split() == ["operator", "p", "in", "in/s", "out", "out/s", "backpr", "watermark"]
    assert source.split()[-7:] == ["12", "0", "—", "123G", "98.8k", "87%", "00:00:00"]
    assert source.startswith("Source: Kafka(") and "…" in source
    assert count.split() == ["count", "1", "9,999,999", "—", "42", "—", "—", "idle"]
    assert sink.split() == ["Sink:", "Print", "1", "42", "1.5", "0", "—", "—", "—"]
