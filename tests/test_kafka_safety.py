"""Kafka connectors, the safety items of issue 8: every client gets the connector's client
options; a second restore after a crash is still recoverable; tombstones have defined semantics;
the exactly-once sink refuses to write again what committed transactions already hold.

Runs against the session broker of ``kafka_fixtures`` (Tansu, or ``KAFKA_BOOTSTRAP_SERVERS``).
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

import kafka_fixtures
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.client import AIOKafkaClient
from cli_helpers import (
    WAIT_S,
    completed_checkpoint_ids,
    get_json,
    read_address,
    run_cli,
    start_cli,
    stop_process,
    wait_for,
)
from etl_expectations import assert_exact_output, expected_output
from kafka_fixtures import (
    create_topics,
    kafka_etl_args,
    load_sample_events,
    read_topic,
    unique_name,
)

from actors.faults import arm, disarm_all
from connectors import CollectSink
from connectors.kafka import KafkaRecord, KafkaSink, KafkaSource
from runtime import ExecutionConfig, JobFailedError, run_job_async
from runtime.master.restart import FixedDelayRestart

kafka_bootstrap = kafka_fixtures.kafka_bootstrap

EXIT_INJECTED_CRASH = 137


def expected_rows() -> collections.Counter[tuple[str, int, float]]:
    """(user, n, total) of every record the ETL example writes for the sample events."""
    return collections.Counter(
        (user, n, total) for user, rows in expected_output().items() for n, total in rows
    )


def exactly_once_output(output_topic: str, prefix: str) -> tuple[str, ...]:
    return (
        "--set",
        f"output_topic={output_topic}",
        "--set",
        "guarantee=exactly-once",
        "--set",
        f"transactional_id={prefix}",
    )


async def produce_values(
    bootstrap: str, topic: str, values: list[bytes | None], keys: list[bytes] | None = None
) -> None:
    """Sends ``values`` (None: a tombstone) to partition 0 of ``topic``, acknowledged."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i, value in enumerate(values):
            key = keys[i] if keys is not None else None
            await producer.send_and_wait(topic, value, key=key, partition=0)
    finally:
        await producer.stop()


def records_in(address: str, uid: str) -> int:
    """Records the operator ``uid`` of a running job has received (its control endpoint)."""
    status = get_json(address, "/status")
    return sum(op["records_in"] for op in status["operators"] if op["uid"] == uid)


async def committed_rows(
    bootstrap: str, topic: str, at_least: int
) -> collections.Counter[tuple[str, int, float]]:
    records = await read_topic(bootstrap, topic, 4, at_least=at_least)
    rows = [orjson.loads(r.value) for r in records]
    return collections.Counter((r["user"], r["n"], r["total"]) for r in rows)


# --------------------------------------------------------------------------- item 12


@pytest.mark.slow
@pytest.mark.asyncio
async def test_second_restore_after_a_crash_before_the_first_checkpoint_recovers(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Run, checkpoint, crash before the commit; restore (re-commits, then fences the pool) and
    get SIGKILLed before that attempt's first checkpoint; restore again: the same transactions
    are re-committed once more although their producer is fenced now, the job completes and
    every record is committed exactly once.

    The first checkpoint is a stop-with-savepoint taken once every record reached the sink, so
    it holds all of them in pre-committed transactions and no transaction is open: Tansu shows
    the records of aborted transactions to read_committed consumers, which would blur the
    count."""
    source, output, prefix = unique_name("twice-in"), unique_name("twice-out"), unique_name("tw")
    load_sample_events(kafka_bootstrap, source)
    await create_topics(kafka_bootstrap, output, partitions=4)
    chk, savepoints = tmp_path / "chk", tmp_path / "savepoints"
    sink = (*exactly_once_output(output, prefix), "--checkpoint-interval", "5min")
    expected = expected_rows()

    stderr = tmp_path / "first.txt"
    first = start_cli(
        stderr,
        *kafka_etl_args(kafka_bootstrap, source, chk, *sink, bounded=False, rest=True),
        *("--set", "testing.crash-at=before-commit", "--set", "testing.crash-mode=exit"),
        *("--savepoint-dir", str(savepoints)),
    )
    try:
        address = wait_for(lambda: read_address(chk), "the control endpoint", first, stderr)
        wait_for(
            lambda: records_in(address, "kafka-totals") == sum(expected.values()),
            "every record at the sink",
            first,
            stderr,
        )
        # The savepoint completes, then the commit crashes: the stop command may see either.
        run_cli("stop", "--address", address, "--dir", str(savepoints))
        assert first.wait(timeout=WAIT_S) == EXIT_INJECTED_CRASH, stderr.read_text()
    finally:
        stop_process(first)
    assert "injected crash at before-commit" in stderr.read_text()
    (savepoint,) = [p.parent for p in savepoints.glob("savepoint-*/_metadata")]

    # Unbounded, so it runs on after the restore until it is killed.
    logged = ("--log-level", "INFO")
    stderr = tmp_path / "second.txt"
    second = start_cli(
        stderr,
        *kafka_etl_args(
            kafka_bootstrap, source, chk, *sink, *logged, bounded=False, restore=str(savepoint)
        ),
    )
    try:
        wait_for(
            lambda: "fenced transactional ids" in stderr.read_text(), "the fencing", second, stderr
        )
    finally:
        stop_process(second)
    assert "re-committed transaction" in stderr.read_text()
    assert completed_checkpoint_ids(chk) == []

    third = run_cli(
        *kafka_etl_args(kafka_bootstrap, source, chk, *sink, *logged, restore=str(savepoint))
    )
    assert third.returncode == 0, third.stderr
    assert "already committed" in third.stderr, third.stderr

    assert await committed_rows(kafka_bootstrap, output, sum(expected.values())) == expected


# --------------------------------------------------------------------------- item 7


def wire_settings(client: object) -> tuple[object, object, object]:
    """client_id, request timeout and metadata max age of the connections ``client`` opens (the
    aiokafka client underneath a consumer, producer or admin client)."""
    for attribute in ("_client", "client"):
        inner = getattr(client, attribute, None)
        if isinstance(inner, AIOKafkaClient):
            client = inner
            break
    assert isinstance(client, AIOKafkaClient), type(client)
    return (client._client_id, client._request_timeout_ms, client._metadata_max_age_ms)


@pytest.mark.asyncio
async def test_every_client_of_source_and_sinks_gets_the_client_options(
    kafka_bootstrap: str,
) -> None:
    """A job reads with a Kafka source (bounded, committed start, group, dead letters) and writes
    to an exactly-once and an at-least-once Kafka sink; it crashes at the commit once, so the
    restore re-commits. Every client the connectors create on the way carries the connector's
    distinctive ``client_id`` and timeouts."""
    source_topic, dead, eos_out, alo_out = (
        unique_name(n) for n in ("opts-in", "opts-dead", "opts-eos", "opts-alo")
    )
    await create_topics(kafka_bootstrap, source_topic, dead, eos_out, alo_out, partitions=2)
    await produce_values(kafka_bootstrap, source_topic, [b'{"i": 1}', b"not json", b'{"i": 2}'])
    source_options = {"client_id": unique_name("src"), "request_timeout_ms": 31_234}
    sink_options = {"client_id": unique_name("snk"), "metadata_max_age_ms": 123_456}
    source = KafkaSource(
        kafka_bootstrap,
        source_topic,
        group_id=unique_name("opts-group"),
        start="committed",
        bounded=True,
        on_error="dead-letter",
        dead_letter_topic=dead,
        client_options={**source_options, "session_timeout_ms": 6_000},
    )
    exactly_once = KafkaSink(
        kafka_bootstrap,
        eos_out,
        guarantee="exactly-once",
        transactional_id_prefix=unique_name("opts"),
        client_options=sink_options,
    )
    at_least_once = KafkaSink(kafka_bootstrap, alo_out, client_options=sink_options)
    created: dict[str, list[tuple[str, object]]] = {"source": [], "sink": []}
    source.clients.observe(lambda purpose, client: created["source"].append((purpose, client)))
    for sink in (exactly_once, at_least_once):
        sink.clients.observe(lambda purpose, client: created["sink"].append((purpose, client)))

    def build(job: Any) -> None:
        values = job.from_source(source)
        values.sink_to(exactly_once)
        values.sink_to(at_least_once)

    arm("before-commit", 1, "raise")
    try:
        config = ExecutionConfig(restart_strategy=FixedDelayRestart(attempts=1, delay_s=0.0))
        await asyncio.wait_for(run_job_async(build, config=config), WAIT_S)
    finally:
        disarm_all()
    # Discovery of partitions created while a job runs (unbounded jobs only) uses the same path.
    assert len(await source.discover_new_splits([])) == 2

    source_expected = (source_options["client_id"], 31_234, 300_000)
    sink_expected = (sink_options["client_id"], 40_000, 123_456)
    for owner, expected in (("source", source_expected), ("sink", sink_expected)):
        for purpose, client in created[owner]:
            assert wire_settings(client) == expected, f"{owner} client for {purpose}"
    assert {purpose for purpose, _ in created["source"]} == {
        "split discovery",
        "partition discovery",
        "committed offsets",
        "end offset probe",
        "reader",
        "offset commits",
        "dead letters",
    }
    assert {purpose for purpose, _ in created["sink"]} == {
        "sink",
        "exactly-once sink",
        "re-commit of restored transactions",
    }
    committed = await read_topic(kafka_bootstrap, eos_out, 2, at_least=2)
    assert sorted(orjson.loads(r.value)["i"] for r in committed) == [1, 2]


def test_an_unknown_client_option_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown Kafka client option.*securty_protocol"):
        KafkaSource("127.0.0.1:9", "in", client_options={"securty_protocol": "SSL"})
    with pytest.raises(ValueError, match=r"unknown Kafka client option.*sasl_pasword"):
        KafkaSink("127.0.0.1:9", "out", client_options={"sasl_pasword": "x"})


def test_a_client_side_deserializer_is_refused_for_the_source_s_own() -> None:
    """The source deserialises each record itself (a bad one fails, is skipped or dead-lettered
    at its offset); a deserializer in client_options would be silently left out."""
    for option in ("value_deserializer", "key_deserializer"):
        with pytest.raises(ValueError, match=rf"cannot set {option}; give deserializer="):
            KafkaSource("127.0.0.1:9", "in", client_options={option: bytes.decode})


# --------------------------------------------------------------------------- item 15


async def produce_tombstones(bootstrap: str, topic: str, keys: list[bytes]) -> None:
    """Tombstones (a key, no value) for ``keys``, partitioned by key like the events."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key in keys:
            await producer.send_and_wait(topic, None, key=key)
    finally:
        await producer.stop()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_kafka_etl_example_skips_tombstones_and_commits_the_exact_output(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Tombstones of some users among the sample events: the example ends with exit 0 and the
    exact output of the events (a tombstone carries no event)."""
    topic = unique_name("tomb-in")
    load_sample_events(kafka_bootstrap, topic)
    await produce_tombstones(kafka_bootstrap, topic, [b"u003", b"u020", b"u006"])
    out, chk = tmp_path / "out", tmp_path / "chk"
    result = run_cli(
        *kafka_etl_args(
            kafka_bootstrap, topic, chk, "--set", f"output={out}", "--log-level", "INFO"
        ),
        "--checkpoint-interval",
        "100ms",
    )
    assert result.returncode == 0, result.stderr
    assert "skipping tombstones" in result.stderr, result.stderr
    assert_exact_output(out)


async def tombstone_topic(bootstrap: str, values: list[bytes | None]) -> str:
    """A new topic of one partition holding ``values`` (None: a tombstone) with keys a, b, a, b..."""
    topic = unique_name("tomb")
    await create_topics(bootstrap, topic)
    await produce_values(
        bootstrap, topic, values, [b"b" if i % 2 else b"a" for i in range(len(values))]
    )
    return topic


def tombstone_job(source: KafkaSource) -> tuple[CollectSink, Any]:
    """A job writing what ``source`` emits into a list sink; a :class:`KafkaRecord` as its
    ``[key, value, offset]``."""
    sink = CollectSink()

    def plain(value: Any) -> Any:
        return [value.key, value.value, value.offset] if isinstance(value, KafkaRecord) else value

    def build(job: Any) -> None:
        job.from_source(source).map(plain).sink_to(sink)

    return sink, build


@pytest.mark.asyncio
@pytest.mark.parametrize("record_format", ["value", "record"])
async def test_tombstones_are_skipped_and_counted_by_default(
    kafka_bootstrap: str, record_format: str
) -> None:
    topic = await tombstone_topic(kafka_bootstrap, [b'{"i": 1}', None, b'{"i": 2}', None])
    source = KafkaSource(kafka_bootstrap, topic, bounded=True, record_format=record_format)
    sink, build = tombstone_job(source)
    await asyncio.wait_for(run_job_async(build), WAIT_S)
    values = [v[1] if record_format == "record" else v for v in sink.results]
    assert values == [{"i": 1}, {"i": 2}]
    assert source.tombstones_skipped == 2
    assert source.skipped == 0


@pytest.mark.asyncio
async def test_emitted_tombstones_are_records_with_value_none(kafka_bootstrap: str) -> None:
    topic = await tombstone_topic(kafka_bootstrap, [b'{"i": 1}', None])
    source = KafkaSource(
        kafka_bootstrap, topic, bounded=True, record_format="record", tombstones="emit"
    )
    sink, build = tombstone_job(source)
    await asyncio.wait_for(run_job_async(build), WAIT_S)
    assert sink.results == [[b"a", {"i": 1}, 0], [b"b", None, 1]]
    assert source.tombstones_skipped == 0


@pytest.mark.asyncio
async def test_tombstones_fail_names_the_position(kafka_bootstrap: str) -> None:
    # on_error="skip" is about undeserialisable bytes; a tombstone has none.
    topic = await tombstone_topic(kafka_bootstrap, [b'{"i": 1}', None])
    source = KafkaSource(kafka_bootstrap, topic, bounded=True, tombstones="fail", on_error="skip")
    _, build = tombstone_job(source)
    with pytest.raises(JobFailedError, match=f"tombstone .*topic {topic} partition 0 offset 1"):
        await asyncio.wait_for(run_job_async(build), WAIT_S)


def test_emitting_tombstones_as_bare_values_is_refused() -> None:
    with pytest.raises(ValueError, match="needs record_format='record'"):
        KafkaSource("127.0.0.1:9", "in", tombstones="emit")
    with pytest.raises(ValueError, match="tombstones must be skip, emit or fail"):
        KafkaSource("127.0.0.1:9", "in", tombstones="drop")


# --------------------------------------------------------------------------- items 4 and 10


def damage(checkpoint: Path) -> None:
    """Makes a completed checkpoint unreadable (its metadata no longer parses)."""
    (checkpoint / "_metadata").write_bytes(b"damaged")


def sigkill_after_checkpoints(args: list[str], chk: Path, stderr: Path, count: int) -> None:
    proc = start_cli(stderr, *args)
    try:
        wait_for(
            lambda: len(completed_checkpoint_ids(chk)) >= count,
            f"{count} completed checkpoints",
            proc,
            stderr,
        )
    finally:
        stop_process(proc)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_exactly_once_fallback_past_a_committed_checkpoint_is_refused_unless_kept(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """SIGKILL, damage the latest checkpoint, ``--restore latest``: the fallback to the previous
    checkpoint would write again what the damaged one committed, so it is refused (exit 2) naming
    the sink, topic and checkpoints; with ``--on-newer-committed-output keep`` the job runs.
    With every checkpoint damaged, the fresh start is refused the same way."""
    source, output, prefix = unique_name("fall-in"), unique_name("fall-out"), unique_name("fall")
    load_sample_events(kafka_bootstrap, source)
    await create_topics(kafka_bootstrap, output, partitions=4)
    chk = tmp_path / "chk"
    sink = (*exactly_once_output(output, prefix), "--retained-checkpoints", "2")
    interval = ("--checkpoint-interval", "100ms")
    throttled = kafka_etl_args(kafka_bootstrap, source, chk, *sink, *interval, "--set", "rate=300")
    sigkill_after_checkpoints(throttled, chk, tmp_path / "killed.txt", 3)
    *_, previous, latest = completed_checkpoint_ids(chk)
    damage(chk / f"chk-{latest}")

    refused = run_cli(*kafka_etl_args(kafka_bootstrap, source, chk, *sink, *interval))
    assert refused.returncode == 2, refused.stderr
    message = refused.stderr
    assert "Sink: Kafka totals" in message, message
    assert output in message, message
    assert f"refusing to restore checkpoint {previous}: checkpoint(s) {latest} completed" in message
    assert "would write the records they committed again" in message, message
    assert "--on-newer-committed-output keep" in message, message
    assert "Traceback" not in message, message

    kept = run_cli(
        *kafka_etl_args(
            kafka_bootstrap, source, chk, *sink, *interval, "--on-newer-committed-output", "keep"
        )
    )
    assert kept.returncode == 0, kept.stderr
    assert f"restoring checkpoint {previous} although checkpoint(s) {latest}" in kept.stderr

    for checkpoint in completed_checkpoint_ids(chk):
        damage(chk / f"chk-{checkpoint}")
    fresh = run_cli(*kafka_etl_args(kafka_bootstrap, source, chk, *sink, *interval))
    assert fresh.returncode == 2, fresh.stderr
    assert "refusing to start without restored state: checkpoint(s)" in fresh.stderr


@pytest.mark.slow
@pytest.mark.asyncio
async def test_exactly_once_fresh_start_on_a_used_transactional_id_prefix_is_refused(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A job that ran to its end is started again without its checkpoints (another checkpoint
    directory, as after a typo): its transactional ids show the earlier run, so the start is
    refused naming the prefix, the topic and the ways out; ``--allow-existing-output`` runs."""
    source, output, prefix = unique_name("used-in"), unique_name("used-out"), unique_name("used")
    load_sample_events(kafka_bootstrap, source)
    await create_topics(kafka_bootstrap, output, partitions=4)
    sink = (*exactly_once_output(output, prefix), "--checkpoint-interval", "100ms")
    first = run_cli(*kafka_etl_args(kafka_bootstrap, source, tmp_path / "chk", *sink))
    assert first.returncode == 0, first.stderr
    expected = expected_rows()
    assert await committed_rows(kafka_bootstrap, output, sum(expected.values())) == expected

    again = kafka_etl_args(kafka_bootstrap, source, tmp_path / "chk-typo", *sink)
    refused = run_cli(*again)
    assert refused.returncode == 2, refused.stderr
    message = refused.stderr
    assert f"transactional_id_prefix {prefix!r}" in message, message
    assert output in message, message
    assert "were used by an earlier run" in message, message
    for way_out in ("--restore PATH", "another transactional_id_prefix", "--allow-existing-output"):
        assert way_out in message, message
    # Refused before anything was written.
    assert await committed_rows(kafka_bootstrap, output, sum(expected.values())) == expected

    allowed = run_cli(*again, "--allow-existing-output")
    assert allowed.returncode == 0, allowed.stderr
    assert "--allow-existing-output" in allowed.stderr, allowed.stderr
