"""The broadcast state pattern: rules sent to every subtask and kept in broadcast state, read by a
keyed (or non-keyed) stream. Rules updated while events flow reach the events after them, the
non-broadcast side cannot write the state, keyed state and timers work beside it, and a restore
at another parallelism gives every subtask every rule.

The two inputs have no order between them, so the tests wait until every subtask acknowledged a
rule (``process_broadcast_element`` emits an acknowledgement) before they push the events that
must see it: deterministic without sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import kafka_fixtures
import orjson
import pytest
from cli_helpers import ROOT, run_cli
from kafka_fixtures import create_topics, load_sample_events, produce, unique_name
from loop_helpers import (
    ControlledSource,
    operator_metric,
    start_job_on_master,
    take_checkpoint,
    wait_until,
)

from connectors import CollectionSource, CollectSink, committed_files
from runtime import (
    BroadcastContext,
    BroadcastProcessFunction,
    BroadcastReadOnlyContext,
    CheckpointConfig,
    Collector,
    ExecutionConfig,
    Job,
    JobDefinitionError,
    JobFailedError,
    KeyedBroadcastContext,
    KeyedBroadcastProcessFunction,
    KeyedBroadcastReadOnlyContext,
    OutputTag,
    RuntimeContext,
    WatermarkStrategy,
    run_job,
    run_job_async,
)
from runtime.plan.restore import RestoreReport
from runtime.shell.runner import build_graph
from state import (
    MapStateDescriptor,
    OperatorStateStore,
    ReadOnlyStateError,
    RestoreRefusedError,
    StateSerializer,
    StateTtlConfig,
    ValueStateDescriptor,
)
from state.operator import redistribute_operator_state
from state.serde import packb, unpackb
from state.storage import CheckpointStorage, find_latest_valid, load_checkpoint

kafka_bootstrap = kafka_fixtures.kafka_bootstrap

RULES = MapStateDescriptor[str, int]("rules")
COUNT = ValueStateDescriptor[int]("count")

WAIT_S = 10.0


def rule_acks(sink: CollectSink, rule: Any) -> int:
    return sum(1 for r in sink.results if r == ("ack", rule))


class ThresholdAlerts(KeyedBroadcastProcessFunction[str, Any, Any, Any]):
    """Events ``(user, amount)`` against the broadcast rules ``(name, limit)`` (a limit of None
    removes the rule); per event ``(user, amount, count of the user's events, {rule: exceeded})``;
    the broadcast record ``("dump",)`` makes each subtask emit ``("dump", subtask, rules)``."""

    def open(self, ctx: RuntimeContext) -> None:
        self.subtask = ctx.subtask_index
        self.count = ctx.get_state(COUNT)

    def process_element(
        self, value: Any, ctx: KeyedBroadcastReadOnlyContext[str], out: Collector[Any]
    ) -> None:
        user, amount = value
        assert ctx.current_key == user
        count = (self.count.value() or 0) + 1
        self.count.update(count)
        rules = ctx.get_broadcast_state(RULES)
        out.collect((user, amount, count, {name: amount > limit for name, limit in rules.items()}))

    def process_broadcast_element(
        self, value: Any, ctx: KeyedBroadcastContext, out: Collector[Any]
    ) -> None:
        rules = ctx.get_broadcast_state(RULES)
        if value == ("dump",):
            out.collect(("dump", self.subtask, sorted(rules.items())))
            return
        name, limit = value
        if limit is None:
            rules.remove(name)
        else:
            rules.put(name, limit)
        out.collect(("ack", value))


def rules_job(
    events: ControlledSource, rules: ControlledSource, sink: CollectSink, parallelism: int | None
) -> Any:
    def build(job: Job) -> None:
        broadcast = job.from_source(rules).set_parallelism(1).broadcast(RULES)
        keyed = job.from_source(events).set_parallelism(1).key_by(lambda e: e[0])
        alerts = keyed.connect(broadcast).process(ThresholdAlerts(), name="alerts").uid("alerts")
        if parallelism is not None:
            alerts.set_parallelism(parallelism)
        alerts.sink_to(sink).set_parallelism(1)

    return build


def events_of(sink: CollectSink) -> list[Any]:
    return [r for r in sink.results if r[0] not in ("ack", "dump")]


@contextlib.asynccontextmanager
async def cancelled_at_exit(job: asyncio.Task[Any]) -> Any:
    try:
        yield
    finally:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job


@pytest.mark.asyncio
async def test_events_after_a_rule_update_see_the_new_rule_in_every_subtask() -> None:
    events, rules, sink = ControlledSource("events"), ControlledSource("rules"), CollectSink()
    _, job = await start_job_on_master(rules_job(events, rules, sink, 3), ExecutionConfig())
    async with cancelled_at_exit(job):
        rules.push(("big", 100))
        await wait_until(lambda: rule_acks(sink, ("big", 100)) == 3, "every subtask's ack", job)
        users = ["ann", "bob", "cy", "dee", "eve"]
        events.push(*[(u, 150) for u in users])
        await wait_until(lambda: len(events_of(sink)) == 5, "the first events", job)
        assert sorted(events_of(sink)) == [(u, 150, 1, {"big": True}) for u in users]

        rules.push(("big", 200), ("small", 10))
        await wait_until(lambda: rule_acks(sink, ("small", 10)) == 3, "the update's acks", job)
        events.push(*[(u, 150) for u in users])
        await wait_until(lambda: len(events_of(sink)) == 10, "the second events", job)
        assert sorted(events_of(sink)[5:]) == [
            (u, 150, 2, {"big": False, "small": True}) for u in users
        ]

        rules.push(("big", None))  # removed
        await wait_until(lambda: rule_acks(sink, ("big", None)) == 3, "the removal's acks", job)
        events.push(("ann", 5))
        await wait_until(lambda: len(events_of(sink)) == 11, "the last event", job)
        assert events_of(sink)[-1] == ("ann", 5, 3, {"small": False})


class WritesInProcessElement(BroadcastProcessFunction[Any, Any, Any]):
    def process_element(
        self, value: Any, ctx: BroadcastReadOnlyContext, out: Collector[Any]
    ) -> None:
        ctx.get_broadcast_state(RULES).put("from-an-event", value)

    def process_broadcast_element(
        self, value: Any, ctx: BroadcastContext, out: Collector[Any]
    ) -> None:
        ctx.get_broadcast_state(RULES).put(value, 1)


def test_the_read_only_view_refuses_writes_naming_the_operator() -> None:
    def build(job: Job) -> None:
        rules = job.from_source(CollectionSource(["r"])).broadcast(RULES)
        (
            job.from_source(CollectionSource([1]))
            .connect(rules)
            .process(WritesInProcessElement(), name="enrich")
            .sink_to(CollectSink())
        )

    with pytest.raises(JobFailedError) as failure:
        run_job(build)
    message = str(failure.value)
    assert (
        "operator 'enrich' (subtask 1/1): cannot put into broadcast state 'rules' outside "
        "process_broadcast_element(): this view of it is read-only" in message
    )
    cause = failure.value.__cause__
    while cause is not None and not isinstance(cause, ReadOnlyStateError):
        cause = cause.__cause__
    assert isinstance(cause, ReadOnlyStateError)


class Enrich(BroadcastProcessFunction[Any, Any, Any]):
    """Non-keyed: events ``(id, country)`` get the country's name from the broadcast reference
    data ``(code, name)``; ``ctx.output`` is not used."""

    def process_element(
        self, value: Any, ctx: BroadcastReadOnlyContext, out: Collector[Any]
    ) -> None:
        names = ctx.get_broadcast_state(RULES)
        out.collect((value[0], names.get(value[1], "?")))

    def process_broadcast_element(
        self, value: Any, ctx: BroadcastContext, out: Collector[Any]
    ) -> None:
        ctx.get_broadcast_state(RULES).put(value[0], value[1])
        out.collect(("ack", value))


@pytest.mark.asyncio
async def test_a_non_keyed_stream_reads_the_reference_data_in_every_subtask() -> None:
    events, reference, sink = ControlledSource("events"), ControlledSource("ref"), CollectSink()

    def build(job: Job) -> None:
        ref = job.from_source(reference).set_parallelism(1).broadcast(RULES)
        (
            job.from_source(events)
            .set_parallelism(1)
            .rebalance()
            .connect(ref)
            .process(Enrich())
            .set_parallelism(2)
            .sink_to(sink)
            .set_parallelism(1)
        )

    _, job = await start_job_on_master(build, ExecutionConfig())
    async with cancelled_at_exit(job):
        reference.push(("de", "Germany"), ("fr", "France"))
        await wait_until(lambda: rule_acks(sink, ("fr", "France")) == 2, "both acks", job)
        events.push(*[(i, "de" if i % 2 else "fr") for i in range(6)])
        await wait_until(lambda: len(events_of(sink)) == 6, "the events", job)
        assert sorted(events_of(sink)) == [(i, "Germany" if i % 2 else "France") for i in range(6)]


class CountsAndTimers(KeyedBroadcastProcessFunction[str, Any, Any, Any]):
    """Counts events ``(user, ts)`` per user in keyed state, with an event-time timer 10 ms after
    each (with a timestamp) that emits ``("timer", user, ts, count, label)``, the label from the broadcast state; the
    broadcast record ``"reset"`` clears every user's count through ``apply_to_keyed_state`` and
    emits ``("reset", user, count)`` per user it cleared."""

    def open(self, ctx: RuntimeContext) -> None:
        self.count = ctx.get_state(COUNT)

    def process_element(
        self, value: Any, ctx: KeyedBroadcastReadOnlyContext[str], out: Collector[Any]
    ) -> None:
        self.count.update((self.count.value() or 0) + 1)
        if ctx.timestamp is not None:
            ctx.timer_service().register_event_time_timer(ctx.timestamp + 10)

    def on_timer(
        self, timestamp: int, ctx: KeyedBroadcastReadOnlyContext[str], out: Collector[Any]
    ) -> None:
        label = ctx.get_broadcast_state(RULES).get("label")
        out.collect(("timer", ctx.current_key, timestamp, self.count.value(), label))

    def process_broadcast_element(
        self, value: Any, ctx: KeyedBroadcastContext, out: Collector[Any]
    ) -> None:
        if value == "reset":

            def reset(key: Any, state: Any) -> None:
                out.collect(("reset", key, state.value()))
                state.clear()

            ctx.apply_to_keyed_state(COUNT, reset)
        else:
            ctx.get_broadcast_state(RULES).put("label", value)
        out.collect(("ack", value))


def test_keyed_state_and_event_time_timers_beside_broadcast_state() -> None:
    """The rules input is bounded and has no watermarks: event time is held at its minimum
    until it ends, so the timers fire after the label arrived and read it."""
    sink = CollectSink()
    events = [("a", 100), ("b", 105), ("a", 120), ("c", 130)]

    def build(job: Job) -> None:
        labels = job.from_source(CollectionSource(["gold"])).broadcast(RULES)
        (
            job.from_source(CollectionSource(events))
            .assign_timestamps_and_watermarks(
                WatermarkStrategy.for_monotonous_timestamps().with_timestamp_assigner(
                    lambda e, _ts: e[1]
                )
            )
            .key_by(lambda e: e[0])
            .connect(labels)
            .process(CountsAndTimers())
            .sink_to(sink)
        )

    run_job(build, parallelism=2)
    timers = sorted(r for r in sink.results if r[0] == "timer")
    assert timers == [
        ("timer", "a", 110, 2, "gold"),
        ("timer", "a", 130, 2, "gold"),
        ("timer", "b", 115, 1, "gold"),
        ("timer", "c", 140, 1, "gold"),
    ]


@pytest.mark.asyncio
async def test_apply_to_keyed_state_visits_every_key_of_every_subtask() -> None:
    events, commands, sink = ControlledSource("events"), ControlledSource("cmds"), CollectSink()

    def build(job: Job) -> None:
        broadcast = job.from_source(commands).set_parallelism(1).broadcast(RULES)
        (
            job.from_source(events)
            .set_parallelism(1)
            .key_by(lambda e: e[0])
            .connect(broadcast)
            .process(CountsAndTimers())
            .uid("counts")
            .set_parallelism(3)
            .sink_to(sink)
            .set_parallelism(1)
        )

    def records_in() -> int:
        return operator_metric(master, "counts", "records_in")

    master, job = await start_job_on_master(build, ExecutionConfig())
    async with cancelled_at_exit(job):
        users = ["ann", "bob", "cy", "dee", "eve", "fay"]
        events.push(*[(u, 1) for u in users], ("ann", 2), ("bob", 2))
        await wait_until(lambda: records_in() == 8, "every event counted", job)
        commands.push("reset")
        await wait_until(lambda: rule_acks(sink, "reset") == 3, "the reset's acks", job)
        resets = sorted(r for r in sink.results if r[0] == "reset")
        assert resets == [("reset", u, 2 if u in ("ann", "bob") else 1) for u in users]

        events.push(("ann", 3))
        await wait_until(lambda: records_in() == 8 + 3 + 1, "the new event counted", job)
        commands.push("reset")
        await wait_until(lambda: rule_acks(sink, "reset") == 6, "the second reset's acks", job)
        assert [r for r in sink.results if r[0] == "reset"][len(users) :] == [("reset", "ann", 1)]


@pytest.mark.asyncio
@pytest.mark.parametrize(("before", "after"), [(1, 3), (3, 2)])
async def test_a_restore_at_another_parallelism_keeps_every_rule_in_every_subtask(
    tmp_path: Path, before: int, after: int
) -> None:
    """Rules added, updated and removed, a checkpoint, then a restore at another parallelism:
    each new subtask dumps its broadcast state (the broadcast record ``("dump",)``), and every
    one holds every rule; events then see them (and their keyed counts continue)."""
    config = ExecutionConfig(checkpoint=CheckpointConfig(retained=2))
    events, rules, sink = ControlledSource("events"), ControlledSource("rules"), CollectSink()
    master, job = await start_job_on_master(
        rules_job(events, rules, sink, None),
        config,
        before,
        storage=CheckpointStorage(tmp_path / "chk"),
    )
    pushed_rules = [("a", 1), ("b", 2), ("c", 3), ("a", 10), ("b", None), ("d", 4)]
    users = [f"user-{i}" for i in range(8)]
    async with cancelled_at_exit(job):
        rules.push(*pushed_rules)
        await wait_until(lambda: rule_acks(sink, ("d", 4)) == before, "every ack", job)
        events.push(*[(u, 5) for u in users])
        await wait_until(lambda: len(events_of(sink)) == len(users), "the events", job)
        checkpoint = await take_checkpoint(master)
        assert checkpoint.path is not None
    expected = [("a", 10), ("c", 3), ("d", 4)]

    restored = load_checkpoint(checkpoint.path)
    graph = build_graph(rules_job(events, rules, sink, None), {}, after)
    report = RestoreReport(graph, restored)
    report.check(allow_non_restored_state=False)
    assert "broadcast state of alerts (alerts), whole in every subtask: rules" in report.describe(
        graph
    )

    events2, rules2, sink2 = ControlledSource("events"), ControlledSource("rules"), CollectSink()
    events2.elements, rules2.elements = list(events.elements), list(rules.elements)
    master, job = await start_job_on_master(
        rules_job(events2, rules2, sink2, None),
        config,
        after,
        storage=CheckpointStorage(tmp_path / "chk2"),
        restored=restored,
    )
    async with cancelled_at_exit(job):
        rules2.push(("dump",))
        await wait_until(
            lambda: sum(1 for r in sink2.results if r[0] == "dump") == after, "every dump", job
        )
        dumps = sorted(r for r in sink2.results if r[0] == "dump")
        assert dumps == [("dump", index, expected) for index in range(after)]
        events2.push(*[(u, 5) for u in users])
        await wait_until(lambda: len(events_of(sink2)) == len(users), "the events", job)
        assert sorted(events_of(sink2)) == [
            (u, 5, 2, {"a": False, "c": True, "d": True}) for u in users
        ]


def test_broadcast_takes_map_state_descriptors_without_ttl() -> None:
    def build_with(*descriptors: Any) -> Any:
        def build(job: Job) -> None:
            job.from_source(CollectionSource([1])).broadcast(*descriptors)

        return build

    with pytest.raises(JobDefinitionError, match="broadcast\\(\\) takes MapStateDescriptors"):
        build_graph(build_with(COUNT), {}, 1)
    ttl = MapStateDescriptor[str, int]("expiring", ttl=StateTtlConfig.of("1min"))
    with pytest.raises(JobDefinitionError, match="a TTL is not supported on broadcast state"):
        build_graph(build_with(ttl), {}, 1)
    with pytest.raises(JobDefinitionError, match="two descriptors of broadcast state 'rules'"):
        build_graph(build_with(RULES, MapStateDescriptor("rules")), {}, 1)


def test_a_keyed_broadcast_function_needs_a_keyed_stream() -> None:
    def build(job: Job) -> None:
        rules = job.from_source(CollectionSource([1])).broadcast(RULES)
        job.from_source(CollectionSource([1])).connect(rules).process(ThresholdAlerts())

    with pytest.raises(JobDefinitionError, match="call key_by\\(\\) before connect\\(\\)"):
        build_graph(build, {}, 1)


# --------------------------------------------------------------------------- the example

EXAMPLE = ROOT / "examples" / "enrichment_broadcast.py"
EVENTS = ROOT / "examples" / "data" / "events.jsonl"
REFERENCE = ROOT / "examples" / "data" / "user_segments.jsonl"


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def expected_enrichment() -> list[bytes]:
    """Every bundled event with its user's segment and country, in plain Python."""
    profiles = {
        r["user"]: {"segment": r["segment"], "country": r["country"]} for r in json_lines(REFERENCE)
    }
    return sorted(orjson.dumps({**e, **profiles[e["user"]]}) for e in json_lines(EVENTS))


def committed_enrichment(out: Path) -> list[bytes]:
    return sorted(
        orjson.dumps(orjson.loads(line))
        for path in committed_files(out)
        for line in path.read_bytes().splitlines()
        if line.strip()
    )


@pytest.mark.parametrize("taskmanagers", ["1", "2"])
def test_the_enrichment_example_runs_on_files_without_kafka(
    tmp_path: Path, taskmanagers: str
) -> None:
    """Also with two TaskManager processes: the reference rows cross processes to every subtask."""
    out = tmp_path / "out"
    result = run_cli(
        "run", str(EXAMPLE), "-p", "2", "--taskmanagers", taskmanagers, "--set", f"output={out}"
    )
    assert result.returncode == 0, result.stderr
    assert len(expected_enrichment()) == 3000
    assert committed_enrichment(out) == expected_enrichment()


@pytest.mark.slow
def test_the_enrichment_example_enriches_a_kafka_topic_from_a_file_and_a_topic(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Events from a topic of 4 partitions; the reference rows of the first 30 users from a file,
    those of the other 10 from a reference topic: every event enriched once (exactly-once file
    sink), also those that came before their user's row."""
    events_topic, reference_topic = unique_name("bc-events"), unique_name("bc-reference")
    load_sample_events(kafka_bootstrap, events_topic)
    rows = json_lines(REFERENCE)
    reference_file = tmp_path / "reference.jsonl"
    reference_file.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows[:30]))
    asyncio.run(create_topics(kafka_bootstrap, reference_topic))
    asyncio.run(
        produce(
            kafka_bootstrap,
            reference_topic,
            [{"key": r["user"].encode(), "value": orjson.dumps(r)} for r in rows[30:]],
        )
    )
    out = tmp_path / "out"
    result = run_cli(
        "run",
        str(EXAMPLE),
        "-p",
        "2",
        "--set",
        f"bootstrap={kafka_bootstrap}",
        "--set",
        f"input_topic={events_topic}",
        "--set",
        f"reference_topic={reference_topic}",
        "--set",
        f"reference={reference_file}",
        "--set",
        "bounded=true",
        "--set",
        f"output={out}",
        "--checkpoint-interval",
        "100ms",
    )
    assert result.returncode == 0, result.stderr
    assert committed_enrichment(out) == expected_enrichment()


# --------------------------------------------------------------------------- state and restore


def broadcast_snapshot(subtask: int) -> dict[str, Any]:
    store = OperatorStateStore("old")
    store.get_broadcast_state("rules").put("written by", subtask)
    return store.snapshot()


@pytest.mark.parametrize(("old", "new"), [(1, 3), (3, 2), (2, 5)])
def test_new_subtask_i_restores_old_subtask_i_modulo_the_old_parallelism(
    old: int, new: int
) -> None:
    """Flink's assignment: at the same or a lower parallelism each subtask reads its own copy,
    extra subtasks read the old copies round robin (tagged here, as copies are equal in a job)."""
    restored = redistribute_operator_state([broadcast_snapshot(i) for i in range(old)], new)
    for index, snapshot in enumerate(restored):
        store = OperatorStateStore("new")
        store.restore(snapshot)
        assert store.get_broadcast_state("rules").items() == [("written by", index % old)]


def test_list_state_restored_under_a_broadcast_state_name_is_refused() -> None:
    old = OperatorStateStore("old")
    old.get_list_state("rules").add("x")
    store = OperatorStateStore("'enrich' (subtask 1/1)")
    store.restore(old.snapshot())
    with pytest.raises(RestoreRefusedError, match="'rules' was restored as even-split list state"):
        store.get_broadcast_state("rules")


def test_a_serializer_turns_the_whole_broadcast_state_into_snapshot_data() -> None:
    as_pairs = StateSerializer(
        to_data=lambda entries: sorted(entries.items()),
        from_data=lambda pairs: {key: frozenset(value) for key, value in pairs},
    )
    store = OperatorStateStore("old")
    store.get_broadcast_state("tags", as_pairs).put("u1", frozenset({"a"}))
    [snapshot] = redistribute_operator_state([unpackb(packb(store.snapshot()))], 1)
    restored = OperatorStateStore("new")
    restored.restore(snapshot)
    assert restored.get_broadcast_state("tags", as_pairs).items() == [("u1", frozenset({"a"}))]


class ListInsteadOfBroadcast(BroadcastProcessFunction[Any, Any, Any]):
    def open(self, ctx: RuntimeContext) -> None:
        ctx.get_list_state("rules").add("x")

    def process_element(
        self, value: Any, ctx: BroadcastReadOnlyContext, out: Collector[Any]
    ) -> None:
        pass

    def process_broadcast_element(
        self, value: Any, ctx: BroadcastContext, out: Collector[Any]
    ) -> None:
        pass


def test_the_restore_report_refuses_list_state_under_a_declared_broadcast_state(
    tmp_path: Path,
) -> None:
    """A checkpoint whose operator kept list state ``rules`` does not restore into a job that
    declares broadcast state ``rules`` for it: the dry run (``checkpoints --against``) says so."""

    def job_with(descriptor: MapStateDescriptor[Any, Any]) -> Any:
        def build(job: Job) -> None:
            rules = job.from_source(CollectionSource(["r"])).broadcast(descriptor)
            (
                job.from_source(CollectionSource([1]))
                .connect(rules)
                .process(ListInsteadOfBroadcast(), name="enrich")
                .uid("enrich")
                .sink_to(CollectSink())
            )

        return build

    storage = CheckpointStorage(tmp_path / "chk", "job")
    asyncio.run(run_job_async(job_with(MapStateDescriptor("other")), storage=storage))
    checkpoint = find_latest_valid(tmp_path / "chk").checkpoint
    assert checkpoint is not None
    graph = build_graph(job_with(RULES), {}, 1)
    report = RestoreReport(graph, checkpoint)
    assert report.errors == [
        "operator 'enrich' (uid enrich) declares broadcast state 'rules', but the checkpoint "
        "holds even-split list state of that name; give the broadcast state another name, or the "
        "operator another uid() and pass --allow-non-restored-state to drop the old state"
    ]


class KeyedStateOnTheBroadcastSide(KeyedBroadcastProcessFunction[str, Any, Any, Any]):
    def open(self, ctx: RuntimeContext) -> None:
        self.count = ctx.get_state(COUNT)

    def process_element(
        self, value: Any, ctx: KeyedBroadcastReadOnlyContext[str], out: Collector[Any]
    ) -> None:
        self.count.update(1)

    def process_broadcast_element(
        self, value: Any, ctx: KeyedBroadcastContext, out: Collector[Any]
    ) -> None:
        self.count.update(2)


def test_keyed_state_without_a_key_on_the_broadcast_side_is_refused() -> None:
    """A broadcast record has no key: a state object used there fails clearly instead of
    writing the entry of a made-up key."""

    def build(job: Job) -> None:
        rules = job.from_source(CollectionSource(["r"])).broadcast(RULES)
        (
            job.from_source(CollectionSource([("a", 1)]))
            .key_by(lambda e: e[0])
            .connect(rules)
            .process(KeyedStateOnTheBroadcastSide(), name="counts")
            .sink_to(CollectSink())
        )

    with pytest.raises(JobFailedError) as failure:
        run_job(build)
    message = str(failure.value)
    assert "operator 'counts' (subtask 1/1): keyed state has no current key in " in message
    assert "process_broadcast_element()" in message
    assert "ctx.apply_to_keyed_state(descriptor, function)" in message


CHANGES = OutputTag("rule-changes")


class ReportsChanges(KeyedBroadcastProcessFunction[str, Any, Any, Any]):
    """Each subtask reports the rules it took to a side output."""

    def open(self, ctx: RuntimeContext) -> None:
        self.subtask = ctx.subtask_index

    def process_element(
        self, value: Any, ctx: KeyedBroadcastReadOnlyContext[str], out: Collector[Any]
    ) -> None:
        out.collect(value)

    def process_broadcast_element(
        self, value: Any, ctx: KeyedBroadcastContext, out: Collector[Any]
    ) -> None:
        ctx.get_broadcast_state(RULES).put(value, 1)
        ctx.output(CHANGES, ("took", self.subtask, value))


def test_the_broadcast_side_emits_to_side_outputs_in_every_subtask() -> None:
    main, side = CollectSink(), CollectSink()

    def build(job: Job) -> None:
        rules = job.from_source(CollectionSource(["r1", "r2"])).broadcast(RULES)
        processed = (
            job.from_source(CollectionSource([]))
            .key_by(str)
            .connect(rules)
            .process(ReportsChanges())
        )
        processed.sink_to(main)
        processed.get_side_output(CHANGES).sink_to(side)

    run_job(build, parallelism=2)
    assert main.results == []
    assert sorted(side.results) == [("took", s, r) for s in (0, 1) for r in ("r1", "r2")]
