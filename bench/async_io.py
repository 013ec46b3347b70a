"""Async I/O: enrichment of events through a fake service with 5 ms latency, sequential awaits
versus ``map_async`` at several capacities.

    python bench/async_io.py [--events 100000] [--latency-ms 5] [--sequential-events 1000]
                             [--capacities 10,100,1000]

- **sequential**: one loop that awaits the service for each event in turn (what a job can do
  without async I/O, at best); measured over ``--sequential-events`` events, since 100,000 of
  them take over 8 minutes at 5 ms each.
- **map_async(capacity=C)**: ``CollectionSource → map_async(enrich, capacity=C) → counting
  sink`` at parallelism 1, run by the job master (``run_job``'s way, uvloop when installed).

The service is ``asyncio.sleep(latency)`` and returns the event with a field added; every run
checks that each event came back enriched. Prints events/s per way and the ratio of each
``map_async`` run to the sequential one (target with capacity 100: >= 50x).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connectors import CollectionSource
from runtime import Job, RuntimeContext, Sink, SinkWriter
from runtime.shell.runner import run_coroutine, run_job

TARGET_RATIO = 50.0


def make_service(latency_s: float) -> Any:
    async def enrich(event: dict[str, int]) -> dict[str, int]:
        await asyncio.sleep(latency_s)
        return {**event, "score": event["id"] % 7}

    return enrich


class CountingSink(Sink):
    """Counts what arrives and checks that it was enriched."""

    def __init__(self) -> None:
        self.count = 0

    def name(self) -> str:
        return "count"

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        sink = self

        class Writer(SinkWriter):
            async def write(self, values: list[Any]) -> None:
                for value in values:
                    assert value["score"] == value["id"] % 7
                sink.count += len(values)

        return Writer()


def sequential(events: list[dict[str, int]], latency_s: float) -> float:
    """Events per second of awaiting the service once per event, in turn."""
    enrich = make_service(latency_s)

    async def run() -> int:
        done = 0
        for event in events:
            result = await enrich(event)
            done += result["score"] >= 0
        return done

    started = time.perf_counter()
    done = run_coroutine(run())
    elapsed = time.perf_counter() - started
    assert done == len(events)
    return len(events) / elapsed


def with_map_async(events: list[dict[str, int]], latency_s: float, capacity: int) -> float:
    """Events per second through ``map_async(capacity=capacity)`` in the runtime."""
    sink = CountingSink()
    enrich = make_service(latency_s)

    def build(job: Job) -> None:
        (
            job.from_source(CollectionSource(events))
            .map_async(enrich, capacity=capacity, timeout="60s")
            .sink_to(sink)
        )

    started = time.perf_counter()
    run_job(build, parallelism=1)
    elapsed = time.perf_counter() - started
    assert sink.count == len(events), (sink.count, len(events))
    return len(events) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--latency-ms", type=float, default=5.0)
    parser.add_argument("--sequential-events", type=int, default=1000)
    parser.add_argument("--capacities", default="10,100,1000")
    args = parser.parse_args()
    latency_s = args.latency_ms / 1000
    events = [{"id": i} for i in range(args.events)]
    capacities = [int(c) for c in args.capacities.split(",")]

    base = sequential(events[: args.sequential_events], latency_s)
    print(
        f"sequential awaits          {base:>10,.0f} events/s "
        f"(over {args.sequential_events:,} events, {args.latency_ms:g} ms each)"
    )
    ratios = {}
    for capacity in capacities:
        rate = with_map_async(events, latency_s, capacity)
        ratios[capacity] = rate / base
        print(
            f"map_async(capacity={capacity:<5}) {rate:>10,.0f} events/s "
            f"({args.events:,} events)  {ratios[capacity]:6.1f}x sequential"
        )
    if 100 in ratios:
        verdict = "meets" if ratios[100] >= TARGET_RATIO else "misses"
        print(
            f"capacity 100: {ratios[100]:.1f}x sequential ({verdict} the {TARGET_RATIO:g}x target)"
        )


if __name__ == "__main__":
    main()
