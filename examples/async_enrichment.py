"""Async enrichment: every event gets its user's profile from a (simulated) async service.

    python -m runtime run examples/async_enrichment.py
    python -m runtime run examples/async_enrichment.py --set output=/tmp/enriched \
        --checkpoint-interval 1s --checkpoint-dir /tmp/enriched-chk

Params: ``input`` (JSON lines ``{"user","kind","amount","ts"}``; default the bundled
``data/events.jsonl``), ``output`` (a directory, written exactly once through the two-phase-commit
file sink; default: stdout), ``rate`` (events per second per source subtask, 0 = unlimited),
``latency`` (of each service call, default ``5ms``), ``capacity`` (requests in flight per subtask,
default 100), ``calls`` (a file the service appends each asked-for event's ``ts`` to).

The profile service stands for an HTTP API or a database: ``ProfileService.lookup`` awaits its
latency and answers a profile made up from the user id. ``map_async`` keeps up to ``capacity``
lookups in flight, emits in input order, and checkpoints the events whose lookup is pending, so a
restore asks for them again (the service may see an event twice; the output holds it once).
"""

from __future__ import annotations

import asyncio
import zlib
from pathlib import Path
from typing import Any

from connectors import FileSource, TwoPhaseCommitFileSink
from runtime import AsyncFunction, AsyncRetryStrategy, Job, RuntimeContext
from runtime.api.durations import duration_ms

BUNDLED_EVENTS = Path(__file__).parent / "data" / "events.jsonl"
TIERS = ("bronze", "silver", "gold")
REGIONS = ("eu-west", "us-east", "ap-south")


class ProfileService:
    """A simulated async user-profile service: ``latency_s`` per call."""

    def __init__(self, latency_s: float, calls_log: str | None = None) -> None:
        self.latency_s = latency_s
        self.calls_log = calls_log

    async def lookup(self, user: str, asked_for: int) -> dict[str, str]:
        self._record_call(asked_for)
        await asyncio.sleep(self.latency_s)
        digest = zlib.crc32(user.encode())
        return {"tier": TIERS[digest % len(TIERS)], "region": REGIONS[digest // 7 % len(REGIONS)]}

    def _record_call(self, asked_for: int) -> None:
        """For tests: which events the service was asked about, repeats included (a short
        append, not worth a thread)."""
        if self.calls_log:
            with open(self.calls_log, "a", encoding="utf-8") as log:
                log.write(f"{asked_for}\n")


class EnrichWithProfile(AsyncFunction[dict[str, Any], dict[str, Any]]):
    """The event with its user's tier and region; ``unknown`` when the service is too slow."""

    def __init__(self, latency_s: float, calls_log: str | None) -> None:
        self.latency_s = latency_s
        self.calls_log = calls_log

    def open(self, ctx: RuntimeContext) -> None:
        # Connections (an aiohttp session, a database pool) are made here, once per subtask.
        self.service = ProfileService(self.latency_s, self.calls_log)

    async def invoke(self, value: dict[str, Any]) -> dict[str, Any]:
        profile = await self.service.lookup(value["user"], value["ts"])
        return {**value, **profile}

    def timeout(self, value: dict[str, Any]) -> dict[str, Any]:
        return {**value, "tier": "unknown", "region": "unknown"}


def build(job: Job) -> None:
    params = job.params
    source = FileSource(
        params.get("input", str(BUNDLED_EVENTS)), format="json", rate=params.get_float("rate", 0.0)
    )
    latency_ms = duration_ms(params.get("latency", "5ms"), "latency")
    enriched = (
        job.from_source(source)
        .uid("events")
        .map_async(
            EnrichWithProfile(latency_ms / 1000, params.get("calls")),
            capacity=params.get_int("capacity", 100),
            timeout="10s",
            retry=AsyncRetryStrategy.exponential_backoff(3, initial_delay="50ms", max_delay="1s"),
            name="profile lookup",
        )
        .uid("profile-lookup")
    )
    output = params.get("output")
    if output:
        enriched.sink_to(TwoPhaseCommitFileSink(output), name="committed files").uid("output")
    else:
        enriched.map(_to_json, name="to JSON").print()


def _to_json(record: dict[str, Any]) -> str:
    import orjson

    return orjson.dumps(record).decode()
