"""Checkpointing cost: throughput with checkpoints every second versus none, checkpoint duration and
alignment time with 100,000 keys, and restore time from a checkpoint of that size.

    python bench/checkpoints.py [--records 3000000] [--keys 100000] [--parallelism 2] [--repeat 7]

The pipeline: pre-generated JSON events → parse → keep purchases → key by user → running total and
count per user in keyed state → a counting sink. Parallelism 2 so that the keyed operator has
several input channels and barriers are really aligned. The default size runs about 6 s per run, so
that each checkpointed run takes several checkpoints (a 2 s run took two, too few to measure their
cost). Runs alternate between the two settings; the loss is printed from the best run of each (other
load only ever adds time) and per pair of runs, with the median of the pairs, to show the noise.
Target: checkpoints every second cost less than 5% of throughput.

The machine's speed can change from one run to the next by more than the cost measured, so the
script also prints a share measured within each checkpointed run: the time its tasks spent taking
snapshots (each checkpoint's per-task snapshot time, summed: the tasks share one event loop) over
the run's time. Taking a snapshot stops a task's processing, so this is the direct cost; the
files are written off the event loop. It needs no second run to compare with, but it is not free
of the machine's speed either: checkpoints come every second of wall time, so a slower machine
spends more of each second taking them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connectors import CollectionSource
from runtime import (
    CheckpointConfig,
    Collector,
    ExecutionConfig,
    Job,
    KeyedProcessContext,
    KeyedProcessFunction,
    RuntimeContext,
    Sink,
    SinkWriter,
)
from runtime.master.coordinator import CheckpointStatus
from runtime.master.jobmaster import JobMaster
from runtime.shell.runner import build_graph, run_coroutine
from state import ValueStateDescriptor
from state.keyed import with_shared_keys
from state.storage import CheckpointStorage, load_checkpoint, load_latest_valid


class Totals(KeyedProcessFunction[str, dict[str, Any], tuple[str, float, int]]):
    def open(self, ctx: RuntimeContext) -> None:
        self.total = ctx.get_state(ValueStateDescriptor("total", default=0.0))
        self.count = ctx.get_state(ValueStateDescriptor("count", default=0))

    def process_element(
        self, value: dict[str, Any], ctx: KeyedProcessContext[str], out: Collector[Any]
    ) -> None:
        total = self.total.value() + value["amount"]
        n = self.count.value() + 1
        self.total.update(total)
        self.count.update(n)
        out.collect((value["user"], total, n))


class CountingSink(Sink):
    def __init__(self) -> None:
        self.count = 0

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        sink = self

        class Writer(SinkWriter):
            async def write(self, values: list[Any]) -> None:
                sink.count += len(values)

        return Writer()


def make_events(n: int, keys: int) -> list[bytes]:
    rng = random.Random(42)
    kinds = ["purchase"] * 6 + ["view"] * 4
    # Every key appears at least once, so the state really holds `keys` entries.
    return [
        orjson.dumps(
            {
                "user": f"u{(i if i < keys else rng.randrange(keys)):06d}",
                "kind": "purchase" if i < keys else rng.choice(kinds),
                "amount": round(rng.uniform(1, 100), 2),
            }
        )
        for i in range(n)
    ]


def build_for(events: list[bytes], sink: CountingSink) -> Any:
    def build(job: Job) -> None:
        (
            job.from_source(CollectionSource(events))
            .uid("events")
            .map(orjson.loads)
            .filter(lambda e: e["kind"] == "purchase")
            .key_by(lambda e: e["user"])
            .process(Totals())
            .uid("totals")
            .sink_to(sink)
            .uid("sink")
        )

    return build


def run(
    events: list[bytes],
    parallelism: int,
    interval: float | None,
    directory: str | None,
    restore: Any = None,
) -> tuple[float, JobMaster, int]:
    sink = CountingSink()
    graph = build_graph(build_for(events, sink), parallelism=parallelism, name="bench")
    config = ExecutionConfig(checkpoint=CheckpointConfig(interval_s=interval, retained=2))
    master = JobMaster(
        graph, config, storage=CheckpointStorage(directory, "bench"), restored=restore
    )
    started = time.perf_counter()
    run_coroutine(master.run())
    return time.perf_counter() - started, master, sink.count


TARGET_LOSS_PERCENT = 5.0


def _periodic(master: JobMaster) -> list[Any]:
    """The periodic checkpoints of a run that completed (the final one of the bounded job too)."""
    return [
        s
        for s in master.coordinator.history
        if s.status is CheckpointStatus.COMPLETED and s.kind == "checkpoint"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=3_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--parallelism", type=int, default=2)
    # Seven, not three: pairs of runs differ by up to ±20% on a shared machine, and the best of
    # three of each setting still moved the loss by several points from one invocation to the next
    # (0.3, 5.2 and 7.1% on one main; the best of seven: 2.2%).
    parser.add_argument("--repeat", type=int, default=7, help="runs per setting; the best counts")
    args = parser.parse_args()
    events = make_events(args.records, args.keys)
    p = args.parallelism

    # Runs alternate between the two settings and the best of each counts: other load on the
    # machine only ever adds time.
    plain_s = chk_s = float("inf")
    pair_losses: list[float] = []
    timed_checkpoints: list[int] = []
    # Per checkpointed run: the tasks' snapshot time over the run's time.
    snapshot_shares: list[float] = []
    for _ in range(args.repeat):
        plain_run_s, _, plain_out = run(events, p, None, None)
        plain_s = min(plain_s, plain_run_s)
        with tempfile.TemporaryDirectory() as scratch:
            chk_run_s, timed_master, chk_out = run(events, p, 1.0, scratch)
            assert chk_out == plain_out, (chk_out, plain_out)
            chk_s = min(chk_s, chk_run_s)
        pair_losses.append(1 - plain_run_s / chk_run_s)
        timed = _periodic(timed_master)
        timed_checkpoints.append(len(timed))
        snapshot_ms = sum(sum(s.snapshot_ms.values()) for s in timed)
        snapshot_shares.append(snapshot_ms / (chk_run_s * 1000.0))
    with tempfile.TemporaryDirectory() as directory:
        _, master, _ = run(events, p, 1.0, directory)
        periodic = _periodic(master)
        durations = [s.duration_ms or 0.0 for s in periodic]
        alignments = [max(s.alignment_ms.values(), default=0.0) for s in periodic]
        sizes = [s.state_size for s in periodic]

        # A checkpoint holding every key: the last one of the run.
        latest = load_latest_valid(directory)
        assert latest is not None
        started = time.perf_counter()
        load_checkpoint(latest.path or "")
        load_s = time.perf_counter() - started
        keys_in_state = sum(
            len(with_shared_keys(snapshot.keyed or {})["count"]["keys"])
            for _, snapshot in latest.operators["totals"].subtask_states.snapshots()
        )
        # Restore into a job with no new input: the time it takes is the restore.
        empty_s, _, _ = run([], p, None, None)
        restored_s, _, _ = run([], p, None, None, restore=latest)
        restore_s = restored_s - empty_s

    rate_plain = args.records / plain_s
    rate_chk = args.records / chk_s
    print(
        f"records: {args.records:,}   keys: {args.keys:,}   parallelism: {p}   "
        f"best of {args.repeat} runs per setting"
    )
    print(f"{'no checkpoints':<34}{rate_plain:>14,.0f} records/s")
    print(f"{'checkpoint every 1s':<34}{rate_chk:>14,.0f} records/s")
    loss = (1 - rate_chk / rate_plain) * 100
    verdict = "meets" if loss < TARGET_LOSS_PERCENT else "ABOVE"
    print(
        f"{'throughput lost to checkpoints':<34}{loss:>13.1f} %   best / best; {verdict} the "
        f"target of < {TARGET_LOSS_PERCENT:.0f} %"
    )
    print(
        f"{'  per pair of runs':<34}{'':>4}"
        f"{', '.join(f'{100 * x:.1f}' for x in pair_losses)} %; "
        f"median {100 * statistics.median(pair_losses):.1f} %"
    )
    print(
        f"{'time spent taking snapshots':<34}{100 * statistics.median(snapshot_shares):>13.1f} %   "
        "median of the checkpointed runs (each: its tasks' snapshot time over its time; "
        f"{', '.join(f'{100 * x:.1f}' for x in snapshot_shares)} %): a same-run share; a "
        "slower machine spends more of each second on snapshots"
    )
    print(f"{'  checkpoints in the timed runs':<34}{'':>4}{', '.join(map(str, timed_checkpoints))}")
    if periodic:
        print(f"{'checkpoints completed':<34}{len(periodic):>14}")
        print(
            f"{'checkpoint duration (median/max)':<34}{statistics.median(durations):>10.1f} / {max(durations):.1f} ms"
        )
        print(
            f"{'alignment time (median/max)':<34}{statistics.median(alignments):>10.1f} / {max(alignments):.1f} ms"
        )
        print(f"{'state size (last periodic)':<34}{sizes[-1]:>14,} bytes")
    print(f"{'final checkpoint keys':<34}{keys_in_state:>14,} ({latest.state_size:,} bytes)")
    print(f"{'load + verify checkpoint':<34}{load_s * 1000:>14.1f} ms")
    print(f"{'restore into a job (load+init)':<34}{restore_s * 1000:>14.1f} ms")


if __name__ == "__main__":
    main()
