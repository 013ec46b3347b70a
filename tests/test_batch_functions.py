"""``map_batches(fn)`` and ``flat_map_batches(fn)``: one call per buffer with a list of records.

map_batches returns one result per record (each keeps its record's timestamp; another number
fails the task naming the operator); flat_map_batches any number, all with the batch's latest
timestamp. Per-operator record counts stay exact."""

from __future__ import annotations

from typing import Any

import pytest
from test_process_function import Stamped

from connectors import CollectionSource, CollectSink
from runtime import ExecutionConfig, Job, JobFailedError, run_job

RECORDS = list(range(1, 2501))


def timed(job: Job) -> Any:
    return job.from_source(CollectionSource(RECORDS)).assign_timestamps_and_watermarks(
        lambda r: 1000 + r
    )


@pytest.mark.parametrize("parallelism", [1, 2])
def test_map_batches_maps_every_record_in_batches_and_keeps_each_timestamp(
    parallelism: int,
) -> None:
    sink = CollectSink()
    batch_sizes: list[int] = []

    def square_all(values: list[int]) -> list[int]:
        batch_sizes.append(len(values))
        return [v * v for v in values]

    def build(job: Job) -> None:
        (
            timed(job)
            .map_batches(square_all)
            .uid("squares")
            .process(Stamped())
            .sink_to(sink)
            .uid("sink")
        )

    result = run_job(build, parallelism=parallelism, config=ExecutionConfig(buffer_size=100))
    assert sorted(sink.results) == [(r * r, 1000 + r) for r in RECORDS]
    assert sum(batch_sizes) == len(RECORDS)
    assert len(batch_sizes) < len(RECORDS) / 10, "called per batch, not per record"
    squares = next(op for op in result.operators if op.uid == "squares")
    assert (squares.records_in, squares.records_out) == (len(RECORDS), len(RECORDS))


def test_map_batches_returning_another_number_of_records_fails_naming_the_operator() -> None:
    def build(job: Job) -> None:
        timed(job).map_batches(lambda values: values[1:], name="drop-first").sink_to(CollectSink())

    with pytest.raises(JobFailedError) as info:
        run_job(build, parallelism=1)
    message = str(info.value)
    assert "'drop-first' (subtask 1/1)" in message
    assert "returned" in message and "flat_map_batches" in message


def test_a_batch_function_returning_no_list_fails_naming_the_operator() -> None:
    def build(job: Job) -> None:
        timed(job).map_batches(tuple, name="as-tuple").sink_to(CollectSink())

    with pytest.raises(JobFailedError) as info:
        run_job(build, parallelism=1)
    message = str(info.value)
    assert "'as-tuple' (subtask 1/1)" in message
    assert "returned a tuple; it must return a list" in message


@pytest.mark.parametrize("parallelism", [1, 2])
def test_flat_map_batches_results_get_the_latest_timestamp_of_their_batch(
    parallelism: int,
) -> None:
    sink = CollectSink()

    def summarise(values: list[int]) -> list[tuple[int, int]]:
        # One summary per batch: its record count and its latest timestamp, as the user sees it.
        return [(len(values), 1000 + max(values))]

    def build(job: Job) -> None:
        (timed(job).flat_map_batches(summarise).uid("summaries").process(Stamped()).sink_to(sink))

    result = run_job(build, parallelism=parallelism, config=ExecutionConfig(buffer_size=100))
    assert sum(count for (count, _), _ in sink.results) == len(RECORDS)
    assert all(latest == timestamp for (_, latest), timestamp in sink.results)
    summaries = next(op for op in result.operators if op.uid == "summaries")
    assert summaries.records_in == len(RECORDS)
    assert summaries.records_out == len(sink.results) < len(RECORDS)


def test_flat_map_batches_without_event_time_emits_records_without_timestamps() -> None:
    sink = CollectSink()

    def build(job: Job) -> None:
        (
            job.from_source(CollectionSource(RECORDS))
            .flat_map_batches(lambda values: [v for v in values if v % 3 == 0] * 2)
            .process(Stamped())
            .sink_to(sink)
        )

    run_job(build, parallelism=1)
    assert sorted(sink.results) == sorted([(v, None) for v in RECORDS if v % 3 == 0] * 2)
