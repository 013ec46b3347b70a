"""Rolling keyed aggregations (Flink's ``KeyedStream.aggregate``/``sum``/``min``/``max``/
``min_by``/``max_by``): one output per record equal to a plain Python computation, at parallelism
1 and 2, for dict, tuple and attribute fields; their state is keyed state, so a restore (also at
another parallelism) continues each key's aggregate."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from loop_helpers import ControlledSource, start_job_on_master, take_checkpoint, wait_until

from connectors import CollectionSource, CollectSink
from runtime import (
    AggregateFunction,
    CheckpointConfig,
    ExecutionConfig,
    Job,
    JobDefinitionError,
    JobFailedError,
    RuntimeContext,
    run_job,
)
from runtime.api.aggregations import FieldAggregation
from state.storage import CheckpointStorage, load_checkpoint

WAIT_S = 10.0


def make_records(n: int = 300) -> list[dict[str, Any]]:
    # Amounts repeat within a key, so ties decide min_by/max_by (the first record wins).
    return [{"user": f"u{i % 7}", "amount": (i * 7) % 11, "seq": i} for i in range(n)]


def rolling(
    records: list[Any], key: Callable[[Any], Any], step: Callable[[Any, Any], Any]
) -> dict[Any, list[Any]]:
    """Per key, the running value after each of its records: the reference computation."""
    running: dict[Any, Any] = {}
    out: dict[Any, list[Any]] = collections.defaultdict(list)
    for record in records:
        k = key(record)
        running[k] = record if k not in running else step(running[k], record)
        out[k].append(running[k])
    return dict(out)


def by_key(results: list[Any], key: Callable[[Any], Any]) -> dict[Any, list[Any]]:
    out: dict[Any, list[Any]] = collections.defaultdict(list)
    for record in results:
        out[key(record)].append(record)
    return dict(out)


def _set(record: dict[str, Any], amount: Any) -> dict[str, Any]:
    return {**record, "amount": amount}


REFERENCE: dict[str, Callable[[Any, Any], Any]] = {
    "sum": lambda a, r: _set(a, a["amount"] + r["amount"]),
    "min": lambda a, r: _set(a, min(a["amount"], r["amount"])),
    "max": lambda a, r: _set(a, max(a["amount"], r["amount"])),
    "min_by": lambda a, r: r if r["amount"] < a["amount"] else a,
    "max_by": lambda a, r: r if r["amount"] > a["amount"] else a,
}


@pytest.mark.parametrize("parallelism", [1, 2])
@pytest.mark.parametrize("kind", list(REFERENCE))
def test_field_aggregations_equal_a_plain_python_computation(kind: str, parallelism: int) -> None:
    records = make_records()
    sink = CollectSink()

    def build(job: Job) -> None:
        keyed = (
            job.from_source(CollectionSource(records))
            .set_parallelism(1)
            .key_by(lambda r: r["user"])
        )
        getattr(keyed, kind)("amount").set_parallelism(parallelism).sink_to(sink)

    run_job(build, parallelism=parallelism)
    expected = rolling(records, lambda r: r["user"], REFERENCE[kind])
    assert by_key(sink.results, lambda r: r["user"]) == expected
    assert len(sink.results) == len(records), "one output per record"


def test_min_keeps_the_first_records_other_fields_while_min_by_keeps_the_whole_record() -> None:
    records = [
        {"user": "a", "amount": 5, "seq": 0},
        {"user": "a", "amount": 3, "seq": 1},
        {"user": "a", "amount": 3, "seq": 2},
        {"user": "a", "amount": 9, "seq": 3},
    ]
    outputs: dict[str, CollectSink] = {kind: CollectSink() for kind in ("min", "min_by", "max_by")}

    def build(job: Job) -> None:
        keyed = job.from_source(CollectionSource(records)).key_by(lambda r: r["user"])
        for kind, sink in outputs.items():
            getattr(keyed, kind)("amount").sink_to(sink)

    run_job(build)
    assert [(r["amount"], r["seq"]) for r in outputs["min"].results] == [
        (5, 0),
        (3, 0),
        (3, 0),
        (3, 0),
    ]
    assert [r["seq"] for r in outputs["min_by"].results] == [0, 1, 1, 1], "first on ties"
    assert [r["seq"] for r in outputs["max_by"].results] == [0, 0, 0, 3]


class Sale(NamedTuple):
    shop: str
    amount: int


@dataclasses.dataclass(frozen=True)
class Order:
    shop: str
    amount: int
    note: str = ""


@pytest.mark.parametrize(
    ("records", "field", "key", "summed"),
    [
        ([("s1", 3), ("s2", 4), ("s1", 5)], 1, 0, ("s1", 8)),
        ([["s1", 3], ["s2", 4], ["s1", 5]], 1, 0, ["s1", 8]),
        ([Sale("s1", 3), Sale("s2", 4), Sale("s1", 5)], "amount", "shop", Sale("s1", 8)),
        ([Sale("s1", 3), Sale("s2", 4), Sale("s1", 5)], 1, "shop", Sale("s1", 8)),
    ],
)
def test_sum_by_tuple_or_list_index_and_named_tuple_field(
    records: list[Any], field: Any, key: Any, summed: Any
) -> None:
    sink = CollectSink()

    def key_of(record: Any) -> Any:
        return record[key] if isinstance(key, int) else getattr(record, key)

    def build(job: Job) -> None:
        job.from_source(CollectionSource(records)).key_by(key_of).sum(field).sink_to(sink)

    run_job(build)
    assert sink.results == [records[0], records[1], summed]
    assert type(sink.results[2]) is type(summed)


def test_a_named_tuple_restored_as_a_plain_tuple_is_summed_by_field_name_again() -> None:
    aggregation = FieldAggregation("sum", "amount")
    # The snapshot kept Sale("s1", 3) as ("s1", 3); the next record makes it a Sale again.
    assert aggregation(("s1", 3), Sale("s1", 5)) == Sale("s1", 8)
    assert type(aggregation(("s1", 3), Sale("s1", 5))) is Sale


def test_a_record_keyed_state_cannot_hold_is_refused_with_the_way_out() -> None:
    def build(job: Job) -> None:
        orders = [Order("s1", 3), Order("s1", 4)]
        job.from_source(CollectionSource(orders)).key_by(lambda o: o.shop).sum("amount").sink_to(
            CollectSink()
        )

    with pytest.raises(JobFailedError, match=r"Sum\(amount\).*dataclasses.asdict"):
        run_job(build)


def test_a_bad_field_is_refused_when_built_and_a_missing_one_names_the_record() -> None:
    def bad(job: Job) -> None:
        job.from_source(CollectionSource([1])).key_by(lambda r: r).sum(1.5)  # type: ignore[arg-type]

    with pytest.raises(JobDefinitionError, match=r"sum\(\): the field must be .* got 1.5"):
        run_job(bad)

    def missing(job: Job) -> None:
        records = [{"user": "a", "amount": 1}, {"user": "a", "price": 2}]
        job.from_source(CollectionSource(records)).key_by(lambda r: r["user"]).max(
            "amount"
        ).sink_to(CollectSink())

    with pytest.raises(JobFailedError) as failure:
        run_job(missing)
    message = str(failure.value)
    assert "Max(amount)" in message
    assert "record {'user': 'a', 'price': 2} has no field 'amount'" in message


class AverageAmount(AggregateFunction[dict[str, Any], list[int], tuple[str, float]]):
    """(user, average amount so far); the accumulator is [user hash-free count, total]."""

    def open(self, ctx: RuntimeContext) -> None:
        self.opened = True

    def create_accumulator(self) -> list[Any]:
        return ["", 0, 0]

    def add(self, value: dict[str, Any], accumulator: list[Any]) -> list[Any]:
        return [value["user"], accumulator[1] + 1, accumulator[2] + value["amount"]]

    def get_result(self, accumulator: list[Any]) -> tuple[str, float]:
        assert self.opened, "open() ran before the first record"
        return (accumulator[0], accumulator[2] / accumulator[1])

    def merge(self, a: list[Any], b: list[Any]) -> list[Any]:
        return [a[0] or b[0], a[1] + b[1], a[2] + b[2]]


def average_reference(records: list[dict[str, Any]]) -> dict[str, list[tuple[str, float]]]:
    seen: dict[str, list[int]] = collections.defaultdict(list)
    out: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
    for record in records:
        seen[record["user"]].append(record["amount"])
        amounts = seen[record["user"]]
        out[record["user"]].append((record["user"], sum(amounts) / len(amounts)))
    return dict(out)


@pytest.mark.parametrize("parallelism", [1, 2])
def test_aggregate_emits_the_running_result_per_record(parallelism: int) -> None:
    records = make_records()
    sink = CollectSink()

    def build(job: Job) -> None:
        (
            job.from_source(CollectionSource(records))
            .set_parallelism(1)
            .key_by(lambda r: r["user"])
            .aggregate(AverageAmount())
            .set_parallelism(parallelism)
            .sink_to(sink)
        )

    run_job(build, parallelism=parallelism)
    assert by_key(sink.results, lambda r: r[0]) == average_reference(records)


def test_aggregate_needs_an_aggregate_function() -> None:
    def build(job: Job) -> None:
        job.from_source(CollectionSource([1])).key_by(lambda r: r).aggregate(sum)  # type: ignore[arg-type]

    with pytest.raises(JobDefinitionError, match="aggregate\\(\\) needs an AggregateFunction"):
        run_job(build)


@pytest.mark.asyncio
@pytest.mark.parametrize("restore_parallelism", [1, 2])
async def test_a_restore_continues_every_keys_aggregates(
    tmp_path: Path, restore_parallelism: int
) -> None:
    records = make_records(120)
    half = len(records) // 2

    def job_over(source: ControlledSource, sinks: dict[str, CollectSink]) -> Callable[[Job], None]:
        def build(job: Job) -> None:
            keyed = job.from_source(source).set_parallelism(1).key_by(lambda r: r["user"])
            keyed.sum("amount").uid("sum").sink_to(sinks["sum"])
            keyed.max_by("amount").uid("max-by").sink_to(sinks["max_by"])
            keyed.aggregate(AverageAmount()).uid("average").sink_to(sinks["average"])

        return build

    # Two retained: the restore takes the checkpoint before the final one of the ended run.
    config = ExecutionConfig(checkpoint=CheckpointConfig(retained=2))
    source = ControlledSource("events")
    first = {kind: CollectSink() for kind in ("sum", "max_by", "average")}
    master, job = await start_job_on_master(
        job_over(source, first), config, storage=CheckpointStorage(tmp_path / "chk")
    )
    source.push(*records[:half])
    await wait_until(lambda: all(len(s.results) == half for s in first.values()), "half", job)
    checkpoint = await take_checkpoint(master)
    assert checkpoint.path is not None
    source.end()
    await asyncio.wait_for(job, WAIT_S)

    source2 = ControlledSource("events")
    source2.elements = list(records)  # the log, replayed from the checkpointed position
    second = {kind: CollectSink() for kind in ("sum", "max_by", "average")}
    master, job = await start_job_on_master(
        job_over(source2, second),
        config,
        restore_parallelism,
        storage=CheckpointStorage(tmp_path / "chk2"),
        restored=load_checkpoint(checkpoint.path),
    )
    source2.end()
    await asyncio.wait_for(job, WAIT_S)

    def after_half(expected: dict[Any, list[Any]]) -> dict[Any, list[Any]]:
        counts = collections.Counter(r["user"] for r in records[:half])
        return {k: v[counts[k] :] for k, v in expected.items() if v[counts[k] :]}

    user = lambda r: r["user"]  # noqa: E731
    assert by_key(second["sum"].results, user) == after_half(
        rolling(records, user, REFERENCE["sum"])
    )
    assert by_key(second["max_by"].results, user) == after_half(
        rolling(records, user, REFERENCE["max_by"])
    )
    assert by_key(second["average"].results, lambda r: r[0]) == after_half(
        average_reference(records)
    )
