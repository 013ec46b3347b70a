"""Window operator overhead: a tumbling event-time window aggregation in the runtime at
parallelism 1, with and without checkpoints every second, versus the same windows computed by a
hand-written loop.

    python bench/windows.py [--records 1000000] [--keys 10000] [--repeat 3] [--profile]

Input, both ways: the same pre-generated JSON events ``{"user", "ts", "amount"}`` (as in
``pipeline.py``: what a Kafka ETL job reads), 10 per millisecond of event time, out of order by up
to 500 ms. Per user and 10-second tumbling window: the number of events and the sum of amounts,
with a watermark 1 s behind the newest timestamp.

- **runtime**: ``CollectionSource → map(orjson.loads) → assign_timestamps_and_watermarks →
  key_by(user) → window(TumblingEventTimeWindows.of("10s")).aggregate(AggregateFunction) →
  summing sink``, run by the job master on uvloop (``run_job``'s way), checkpoints in memory.
- **hand loop**: one ``for`` loop over the same events: ``orjson.loads``, a dict of (count, sum)
  per window start and user, the watermark after every source batch (1,024 events), and each
  window emitted (summed) when the watermark passes its end, the rest at the end.

Both produce every window's result; the counts and sums are checked equal. It prints the best of
``--repeat`` alternating runs of each way, throughputs (events/s), and the ratio runtime / hand
loop (target >= 0.5) without and with checkpoints. The input is frozen out of the garbage
collector (``gc.freeze()``) before the runs: it is the benchmark's, not the pipeline's.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import random
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connectors import CollectionSource
from runtime import (
    AggregateFunction,
    CheckpointConfig,
    ExecutionConfig,
    Job,
    RuntimeContext,
    Sink,
    SinkWriter,
    TumblingEventTimeWindows,
)
from runtime.api.sources import DEFAULT_SOURCE_BATCH
from runtime.master.jobmaster import JobMaster
from runtime.shell.runner import build_graph, run_coroutine

TARGET_RATIO = 0.5
WINDOW_MS = 10_000
OUT_OF_ORDERNESS_MS = 1_000
BASE_TS = 1_700_000_000_000

Event = dict[str, Any]


def make_events(n: int, keys: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    randrange, dumps = rng.randrange, orjson.dumps
    return [
        dumps(
            {
                "user": f"u{randrange(keys)}",
                "ts": BASE_TS + i // 10 - randrange(500),
                "amount": randrange(1, 10_000),
            }
        )
        for i in range(n)
    ]


# ----------------------------------------------------------------------------- the runtime job


class CountAndSum(AggregateFunction[Event, list[int], tuple[int, int]]):
    def create_accumulator(self) -> list[int]:
        return [0, 0]

    def add(self, value: Event, accumulator: list[int]) -> list[int]:
        accumulator[0] += 1
        accumulator[1] += value["amount"]
        return accumulator

    def get_result(self, accumulator: list[int]) -> tuple[int, int]:
        return accumulator[0], accumulator[1]

    def merge(self, a: list[int], b: list[int]) -> list[int]:
        return [a[0] + b[0], a[1] + b[1]]


class TotalsSink(Sink):
    """Counts the window results and sums their counts and amounts (cheap, checked)."""

    def __init__(self) -> None:
        self.windows = 0
        self.events = 0
        self.amount = 0

    def name(self) -> str:
        return "Totals"

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        sink = self

        class Writer(SinkWriter):
            async def write(self, values: list[Any]) -> None:
                sink.windows += len(values)
                sink.events += sum(v[0] for v in values)
                sink.amount += sum(v[1] for v in values)

        return Writer()


def event_time(event: Event) -> int:
    return int(event["ts"])


def user_of(event: Event) -> str:
    return str(event["user"])


def run_runtime(
    source: CollectionSource, interval_s: float | None
) -> tuple[float, TotalsSink, int]:
    """One run; its seconds, its sink and the checkpoints it completed (with an interval also
    the final one of the bounded job, which holds the last windows' state)."""
    sink = TotalsSink()

    def build(job: Job) -> None:
        (
            job.from_source(source)
            .uid("events")
            .map(orjson.loads)
            .uid("parse")
            .assign_timestamps_and_watermarks(event_time, OUT_OF_ORDERNESS_MS)
            .key_by(user_of)
            .window(TumblingEventTimeWindows.of(WINDOW_MS))
            .aggregate(CountAndSum())
            .uid("windows")
            .sink_to(sink)
        )

    graph = build_graph(build, parallelism=1, name="bench-windows")
    config = ExecutionConfig(checkpoint=CheckpointConfig(interval_s=interval_s))
    gc.collect()
    started = time.perf_counter()
    result = run_coroutine(JobMaster(graph, config).run())
    return time.perf_counter() - started, sink, result.checkpoints_completed


# ----------------------------------------------------------------------------- the hand loop


def hand_loop(events: list[bytes], batch: int) -> tuple[int, int, int]:
    """Every window's (count, sum) per user; returns (windows, events, amount) over them."""
    windows: dict[int, dict[str, list[int]]] = {}
    watermark = -(1 << 63)
    highest = -(1 << 63)
    emitted = total_events = total_amount = 0
    next_end = None  # the earliest pending window end, to skip the firing check

    def fire(up_to: int) -> None:
        nonlocal emitted, total_events, total_amount
        for start in sorted(s for s in windows if s + WINDOW_MS - 1 <= up_to):
            for count, amount in windows.pop(start).values():
                emitted += 1
                total_events += count
                total_amount += amount

    loads = orjson.loads
    for offset in range(0, len(events), batch):
        for raw in events[offset : offset + batch]:
            event = loads(raw)
            user, ts, amount = event["user"], event["ts"], event["amount"]
            start = ts - ts % WINDOW_MS
            per_user = windows.get(start)
            if per_user is None:
                per_user = windows[start] = {}
                if next_end is None or start + WINDOW_MS - 1 < next_end:
                    next_end = start + WINDOW_MS - 1
            acc = per_user.get(user)
            if acc is None:
                per_user[user] = [1, amount]
            else:
                acc[0] += 1
                acc[1] += amount
            if ts > highest:
                highest = ts
        if highest - OUT_OF_ORDERNESS_MS - 1 > watermark:
            watermark = highest - OUT_OF_ORDERNESS_MS - 1
            if next_end is not None and next_end <= watermark:
                fire(watermark)
                next_end = min((s + WINDOW_MS - 1 for s in windows), default=None)
    fire(1 << 63)
    return emitted, total_events, total_amount


def run_hand(events: list[bytes]) -> tuple[float, tuple[int, int, int]]:
    gc.collect()
    started = time.perf_counter()
    result = hand_loop(events, DEFAULT_SOURCE_BATCH)
    return time.perf_counter() - started, result


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per way")
    parser.add_argument(
        "--checkpoint-interval", type=float, default=1.0, help="seconds, for the checkpointed runs"
    )
    parser.add_argument("--profile", action="store_true", help="also cProfile one runtime run")
    args = parser.parse_args()
    n = args.records

    started = time.perf_counter()
    events = make_events(n, args.keys)
    source = CollectionSource(events)
    # The pre-generated input (two lists of N objects: ours and the source's copy) is not part of
    # either way, but every full garbage collection would traverse it, and the runtime, which
    # holds records in buffers, triggers more of them: frozen, it is left out of the collections
    # of both ways (as a job reading Kafka or files has no such list).
    gc.collect()
    gc.freeze()
    print(
        f"input: {n:,} events, {args.keys:,} keys (generated in {time.perf_counter() - started:.1f}s)"
    )

    expected = hand_loop(events, DEFAULT_SOURCE_BATCH)
    print(f"windows (user x 10 s): {expected[0]:,}; events in them: {expected[1]:,}")

    checkpointed = f"runtime, {args.checkpoint_interval:g}s checkpoints"
    ways: dict[str, list[float]] = {"hand loop": [], "runtime": [], checkpointed: []}
    checkpoints: list[int] = []
    for i in range(args.repeat):
        order = list(ways) if i % 2 == 0 else list(reversed(ways))
        for way in order:
            if way == "hand loop":
                seconds, result = run_hand(events)
            else:
                interval = args.checkpoint_interval if way == checkpointed else None
                seconds, sink, completed = run_runtime(source, interval)
                if interval is not None:
                    checkpoints.append(completed)
                result = (sink.windows, sink.events, sink.amount)
            assert result == expected, f"{way}: {result} != hand loop {expected}"
            ways[way].append(seconds)

    hand_rate = n / min(ways["hand loop"])
    w = 28
    print(f"\n{'':<{w}}{'best s':>10}{'events/s':>14}{'ratio':>8}")
    for way, times in ways.items():
        rate = n / min(times)
        ratio = "" if way == "hand loop" else f"{rate / hand_rate:.2f}"
        print(f"{way:<{w}}{min(times):>10.3f}{rate:>14,.0f}{ratio:>8}")
    worst = min(n / min(t) for way, t in ways.items() if way != "hand loop") / hand_rate
    verdict = "ok" if worst >= TARGET_RATIO else "BELOW TARGET"
    print(
        f"checkpoints completed per checkpointed run: {sorted(set(checkpoints))} (counting the "
        "final one of the bounded job)"
    )
    print(
        f"\nratio runtime / hand loop, best / best: >= {worst:.2f} (target {TARGET_RATIO}: {verdict})"
    )

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run_runtime(source, None)
        profiler.disable()
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(20)
        print(stream.getvalue())


if __name__ == "__main__":
    main()
