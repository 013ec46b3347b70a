"""The key the hash partitioner computed travels with the buffer to the keyed operator, which then
does not call the key selector again: one call per record, at any parallelism, for keyed
process functions (one input) and keyed co-process functions (both inputs)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from connectors import CollectionSource, CollectSink
from runtime import (
    AggregateFunction,
    Collector,
    EventTimeSessionWindows,
    Job,
    JobFailedError,
    KeyedCoProcessFunction,
    KeyedProcessContext,
    KeyedProcessFunction,
    SlidingEventTimeWindows,
    TumblingEventTimeWindows,
    WatermarkStrategy,
    run_job,
)
from state import ValueStateDescriptor

RECORDS = [(f"k{i % 7}", i) for i in range(600)]


class CountingSelector:
    """``record[0]``, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, record: tuple[str, int]) -> str:
        self.calls += 1
        return record[0]


class RunningCount(KeyedProcessFunction[Any, Any, Any]):
    def open(self, ctx: Any) -> None:
        self.count = ctx.get_state(ValueStateDescriptor("count", default=0))

    def process_element(
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        self.count.update(self.count.value() + 1)
        out.collect((ctx.current_key, self.count.value()))


@pytest.mark.parametrize("parallelism", [1, 3])
def test_a_keyed_process_function_gets_the_partitioner_s_keys(parallelism: int) -> None:
    selector = CountingSelector()
    sink = CollectSink()

    def build(job: Job) -> None:
        job.from_source(CollectionSource(RECORDS)).key_by(selector).process(RunningCount()).sink_to(
            sink
        )

    run_job(build, parallelism=parallelism)
    assert selector.calls == len(RECORDS)
    per_key = Counter(key for key, _ in RECORDS)
    assert sorted(sink.results) == sorted(
        (key, n) for key, total in per_key.items() for n in range(1, total + 1)
    )


class Tagging(KeyedCoProcessFunction[Any, Any, Any]):
    def process_element1(self, value: Any, ctx: Any, out: Collector[Any]) -> None:
        out.collect(("first", ctx.current_key, value[1]))

    def process_element2(self, value: Any, ctx: Any, out: Collector[Any]) -> None:
        out.collect(("second", ctx.current_key, value[1]))


@pytest.mark.parametrize("parallelism", [1, 2])
def test_a_keyed_co_process_function_gets_the_keys_of_both_inputs(parallelism: int) -> None:
    first, second = CountingSelector(), CountingSelector()
    sink = CollectSink()

    def build(job: Job) -> None:
        a = job.from_source(CollectionSource(RECORDS))
        b = job.from_source(CollectionSource(RECORDS[:100]))
        a.connect(b).key_by(first, second).process(Tagging()).sink_to(sink)

    run_job(build, parallelism=parallelism)
    assert (first.calls, second.calls) == (len(RECORDS), 100)
    assert sorted(sink.results) == sorted(
        [("first", k, i) for k, i in RECORDS] + [("second", k, i) for k, i in RECORDS[:100]]
    )


class CountAndSum(AggregateFunction[Any, Any, Any]):
    def create_accumulator(self) -> Any:
        return (0, 0)

    def add(self, value: Any, accumulator: Any) -> Any:
        return (accumulator[0] + 1, accumulator[1] + value[1])

    def get_result(self, accumulator: Any) -> Any:
        return accumulator


@pytest.mark.parametrize("parallelism", [1, 2])
@pytest.mark.parametrize("kind", ["reduce", "aggregate"])
def test_rolling_reduce_and_aggregate_get_the_partitioner_s_keys(
    kind: str, parallelism: int
) -> None:
    selector = CountingSelector()
    sink = CollectSink()

    def build(job: Job) -> None:
        keyed = job.from_source(CollectionSource(RECORDS)).key_by(selector)
        if kind == "reduce":
            rolled = keyed.reduce(lambda a, b: (a[0], a[1] + b[1]))
            keyed_results = rolled.map(lambda r: (r[0], r[1]))
        else:
            keyed_results = keyed.aggregate(CountAndSum()).map(lambda r: ("", r[1]))
        keyed_results.sink_to(sink)

    run_job(build, parallelism=parallelism)
    assert selector.calls == len(RECORDS)
    totals: dict[str, int] = {}
    for key, value in RECORDS:
        totals[key] = totals.get(key, 0) + value
    finals = set(sink.results)
    if kind == "reduce":
        assert set(totals.items()) <= finals
    else:
        assert set(totals.values()) <= {total for _, total in finals}


def test_a_failing_reduce_function_names_its_record() -> None:
    def fail_on_42(a: Any, b: Any) -> Any:
        if b[1] == 42:
            raise ValueError("no 42")
        return b

    def build(job: Job) -> None:
        job.from_source(CollectionSource(RECORDS)).key_by(lambda r: r[0]).reduce(
            fail_on_42, name="picky"
        ).sink_to(CollectSink())

    with pytest.raises(JobFailedError) as info:
        run_job(build, parallelism=1)
    message = str(info.value)
    assert "'picky' (subtask 1/1)" in message
    assert "on record ('k0', 42)" in message
    assert "ValueError: no 42" in message


WINDOWS: dict[str, Any] = {
    "tumbling": TumblingEventTimeWindows.of(100),  # the tumbling fast path
    "sliding": SlidingEventTimeWindows.of(100, 50),  # the fast path of other assigners
    "session": EventTimeSessionWindows.with_gap(5),  # the trigger-driven path
}


@pytest.mark.parametrize("parallelism", [1, 2])
@pytest.mark.parametrize("assigner", sorted(WINDOWS))
def test_a_window_operator_gets_the_partitioner_s_keys(assigner: str, parallelism: int) -> None:
    selector = CountingSelector()
    sink = CollectSink()
    strategy = WatermarkStrategy.for_monotonous_timestamps().with_timestamp_assigner(
        lambda record, _: record[1]
    )

    def build(job: Job) -> None:
        (
            job.from_source(CollectionSource(RECORDS))
            .assign_timestamps_and_watermarks(strategy)
            .key_by(selector)
            .window(WINDOWS[assigner])
            .reduce(lambda a, b: (a[0], a[1] + b[1]))
            .sink_to(sink)
        )

    run_job(build, parallelism=parallelism)
    assert selector.calls == len(RECORDS)
    # Every record is in some window of its key: the sums per key add up (sliding: twice).
    times = 2 if assigner == "sliding" else 1
    totals = Counter[str]()
    for key, value in RECORDS:
        totals[key] += value * times
    results = Counter[str]()
    for key, value in sink.results:
        results[key] += value
    assert results == totals
