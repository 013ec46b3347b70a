"""``python -m runtime list``: the jobs running on this machine, from the job registry
(:mod:`runtime.shell.registry`), each with the state its control endpoint reports now."""

from __future__ import annotations

import json
import sys
from typing import Any

from runtime.shell import registry
from runtime.shell.rest import ControlClientError, call

STATUS_TIMEOUT_S = 2.0
"""How long ``list`` waits for one job's ``/status`` before showing it as not answering."""

COLUMNS = ("NAME", "PID", "ADDRESS", "STATE", "UPTIME", "CHECKPOINT DIR")


def print_jobs(as_json: bool = False) -> int:
    """Print the running jobs (a table on a terminal, plain columns otherwise, or JSON)."""
    try:
        jobs = registry.running_jobs()
    except OSError as exc:
        sys.stderr.write(f"error: cannot read the job registry {registry.runtime_dir()}: {exc}\n")
        return 1
    rows = [_row(job) for job in jobs]
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no jobs running (registry: {registry.runtime_dir()})")
    elif sys.stdout.isatty():
        _print_table(rows)
    else:
        _print_columns(rows)
    return 0


def _row(job: registry.JobEntry) -> dict[str, Any]:
    row = job.public_json()
    row["state"] = _live_state(job)
    return row


def _live_state(job: registry.JobEntry) -> str:
    if job.address is None:
        return job.state
    try:
        status = call(job.address, "GET", "/status", timeout=STATUS_TIMEOUT_S, token=job.token)
    except ControlClientError:
        return "not answering"
    return str(status.get("status", job.state))


def format_uptime(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h03m``, ``4d02h``: the two largest units."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _cells(row: dict[str, Any]) -> list[str]:
    return [
        row["name"],
        str(row["pid"]),
        row["address"] or "-",
        row["state"],
        format_uptime(row["uptime_s"]),
        row["checkpoint_dir"] or "-",
    ]


def _print_columns(rows: list[dict[str, Any]]) -> None:
    lines = [list(COLUMNS), *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    for line in lines:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*_cells(row))
    Console().print(table)
