"""Helpers for in-process job tests: step the event loop until a condition holds (no sleeps)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


async def wait_until(
    predicate: Callable[[], bool],
    what: str,
    job: asyncio.Task[Any] | None = None,
    steps: int = 100_000,
) -> None:
    """Step the loop until ``predicate`` holds; a job that ended meanwhile raises its own error."""
    for _ in range(steps):
        if predicate():
            return
        if job is not None and job.done():
            job.result()  # raises the job's failure
            msg = f"the job ended while waiting for {what}"
            raise AssertionError(msg)
        await asyncio.sleep(0)
    msg = f"gave up waiting for {what}"
    raise AssertionError(msg)
