"""Errors users cause or meet outside their code: one ``error:`` line saying what and what to do,
the right exit code, no traceback (each in a real ``python -m runtime`` child process)."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import kafka_fixtures
import pytest
from cli_helpers import (
    ROOT,
    error_lines,
    get_json,
    operator_records_in,
    printed_address,
    run_cli,
    run_cli_in,
    run_command,
    run_command_in,
    runtime_command,
    start_cli,
    stop_process,
    the_one_error,
    wait_for,
    without_permission_override,
)
from kafka_fixtures import create_topics, unique_name

from connectors.kafka.broker import LocalKafkaBroker, find_free_port

kafka_bootstrap = kafka_fixtures.kafka_bootstrap

QUIET = ("--no-progress", "--rest-port", "-1")
EXIT_FAILED = 1
EXIT_USAGE = 2


def test_a_missing_input_file_names_the_file_and_the_operator(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-events.jsonl"
    proc = run_cli(
        "run",
        "examples/file_etl.py",
        *("--set", f"input={missing}", "--set", f"output={tmp_path / 'out'}"),
        *QUIET,
    )
    assert proc.returncode == EXIT_FAILED, proc.stderr
    error = the_one_error(proc)
    assert f"input '{missing}' does not exist" in error
    assert "source 'Source: File(no-such-events.jsonl)' (uid events)" in error


def test_a_missing_relative_input_file_says_where_it_was_looked_for() -> None:
    proc = run_cli("run", "examples/wordcount.py", "--set", "input=no-such-words.txt", *QUIET)
    assert proc.returncode == EXIT_FAILED, proc.stderr
    assert f"'no-such-words.txt' does not exist (relative to {ROOT})" in the_one_error(proc)


@pytest.mark.parametrize(
    "where", [(), ("--taskmanagers", "2")], ids=["in-process", "on-taskmanagers"]
)
def test_invalid_utf8_in_a_text_file_names_the_file_and_the_line(
    tmp_path: Path, where: tuple[str, ...]
) -> None:
    """Also when the reader runs in a TaskManager: the failure crosses the process boundary as
    the same one line."""
    text = tmp_path / "latin1.txt"
    text.write_bytes("first line\nsecond line\nCaf\u00e9 au lait\n".encode("latin-1"))
    proc = run_cli("run", "examples/wordcount.py", "--set", f"input={text}", *where, *QUIET)
    assert proc.returncode == EXIT_FAILED, proc.stderr
    error = the_one_error(proc)
    assert error.startswith(f"{text} line 3: not valid UTF-8 (byte 4 of the line"), error
    assert "convert the file" in error


def test_invalid_json_is_one_line_naming_the_file_and_the_line(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text('{"user": "a", "kind": "purchase", "amount": 1, "ts": 1}\n{"user": \n')
    proc = run_cli(
        "run",
        "examples/file_etl.py",
        *("--set", f"input={events}", "--set", f"output={tmp_path / 'out'}"),
        *QUIET,
    )
    assert proc.returncode == EXIT_FAILED, proc.stderr
    assert the_one_error(proc).startswith(f"{events} line 2: invalid JSON")


def _refused_checkpoint_dir(directory: Path, locked: Path | None = None, mode: int = 0) -> str:
    """The error line of a run with ``--checkpoint-dir directory`` (``locked``, a directory,
    has permissions ``mode`` meanwhile), asserting that it was refused before the job ran."""
    if locked is not None:
        locked.mkdir()
        locked.chmod(mode)
    try:
        proc = run_command(
            without_permission_override(
                runtime_command("run", "examples/wordcount.py", "--checkpoint-dir", str(directory))
            )
        )
    finally:
        if locked is not None:
            locked.chmod(0o755)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert proc.stdout == ""  # the job did not run: word count prints its counts
    return the_one_error(proc)


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_the_job_runs(tmp_path: Path) -> None:
    file = tmp_path / "chk"
    file.write_text("not a directory\n")
    assert _refused_checkpoint_dir(file) == (
        f"--checkpoint-dir: {file} is not a directory: give a directory (it is created when "
        "missing)"
    )


def test_a_checkpoint_dir_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert _refused_checkpoint_dir(tmp_path / "file" / "chk") == (
        f"--checkpoint-dir: cannot create {tmp_path / 'file' / 'chk'}: {tmp_path / 'file'} is "
        "not a directory"
    )


def test_a_checkpoint_dir_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    read_only = tmp_path / "read-only"
    assert _refused_checkpoint_dir(read_only / "jobs" / "chk", read_only, 0o555) == (
        f"--checkpoint-dir: cannot create {read_only / 'jobs' / 'chk'}: {read_only} is not "
        "writable; fix its permissions or give another directory"
    )


def test_a_read_only_checkpoint_dir_is_refused_before_the_job_runs(tmp_path: Path) -> None:
    read_only = tmp_path / "chk"
    assert _refused_checkpoint_dir(read_only, read_only, 0o555) == (
        f"--checkpoint-dir: cannot write into {read_only} (Permission denied): fix its "
        "permissions or give another directory"
    )
    assert list(read_only.iterdir()) == []


def test_an_unreadable_checkpoint_dir_is_refused_before_the_job_runs(tmp_path: Path) -> None:
    unreadable = tmp_path / "chk"
    assert _refused_checkpoint_dir(unreadable, unreadable, 0o333) == (
        f"--checkpoint-dir: cannot read {unreadable} (Permission denied): fix its permissions "
        "or give another directory"
    )


SHADOWED_JOB = """
    from connectors import FileSource
    from state import ValueStateDescriptor


    def build(job):
        job.from_source(FileSource(job.params["input"])).print()
"""


def _job_next_to(tmp_path: Path, module: str) -> Path:
    (tmp_path / module).write_text("HELPER = 1\n")
    return _job_file(tmp_path, "job.py", SHADOWED_JOB)


def test_a_module_next_to_the_job_that_shadows_a_runtime_package_is_named(
    tmp_path: Path,
) -> None:
    job = _job_next_to(tmp_path, "state.py")
    proc = run_cli("run", str(job), "--set", "input=examples/data/words.txt", *QUIET)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert the_one_error(proc) == (
        f"{tmp_path / 'state.py'} has the name of the runtime's package 'state', so 'import "
        "state' finds it instead of the runtime's: rename it (e.g. to my_state.py) and its "
        "imports"
    )


def test_running_from_the_folder_of_a_shadowing_module_names_it(tmp_path: Path) -> None:
    """``python -m runtime`` puts the working directory first on ``sys.path``: the runtime's own
    imports would find the user's ``connectors.py`` (today: a traceback deep in them)."""
    job = _job_next_to(tmp_path, "connectors.py")
    proc = run_cli_in(
        tmp_path, "run", job.name, "--set", f"input={ROOT}/examples/data/words.txt", *QUIET
    )
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert the_one_error(proc).startswith(
        f"{tmp_path / 'connectors.py'} has the name of the runtime's package 'connectors'"
    )


def test_a_program_importing_the_runtime_next_to_a_shadowing_module_gets_an_import_error(
    tmp_path: Path,
) -> None:
    """Only for the packages the runtime imports itself: a program's own ``connectors.py`` is
    its business as long as it does not also want the runtime's connectors."""
    (tmp_path / "state.py").write_text("HELPER = 1\n")
    (tmp_path / "program.py").write_text("import runtime\nprint('imported')\n")
    proc = run_command_in(tmp_path, [sys.executable, "program.py"])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ImportError: {tmp_path / 'state.py'} has the name of the runtime's package 'state', so "
        "'import state' finds it instead of the runtime's: rename it (e.g. to my_state.py) and "
        "its imports"
    )
    (tmp_path / "state.py").rename(tmp_path / "connectors.py")
    proc = run_command_in(tmp_path, [sys.executable, "program.py"])
    assert (proc.returncode, proc.stdout) == (0, "imported\n"), proc.stderr


def test_no_broker_at_the_bootstrap_address_is_one_line_naming_it(tmp_path: Path) -> None:
    address = f"127.0.0.1:{find_free_port()}"  # nothing listens there
    proc = run_cli(
        "run",
        "examples/kafka_etl.py",
        *("--set", f"bootstrap={address}", "--set", f"output={tmp_path / 'out'}"),
        *QUIET,
    )
    assert proc.returncode == EXIT_FAILED, proc.stderr
    error = the_one_error(proc)
    assert error.startswith(
        f"source 'Source: Kafka events' (uid kafka-events): no Kafka broker answers at {address}"
    ), error
    assert "connect timeout 40s" in error
    assert "python -m runtime broker" in error


def test_a_missing_topic_is_one_line_naming_it_and_how_to_create_it(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    topic = unique_name("missing")
    proc = run_cli(
        "run",
        "examples/kafka_etl.py",
        *("--set", f"bootstrap={kafka_bootstrap}", "--set", f"input_topic={topic}"),
        *("--set", f"output={tmp_path / 'out'}"),
        *QUIET,
    )
    assert proc.returncode == EXIT_FAILED, proc.stderr
    assert the_one_error(proc) == (
        f"source 'Source: Kafka events' (uid kafka-events): Kafka topic {topic} does not exist "
        f"on {kafka_bootstrap}: create it first (e.g. kafka-topics.sh --bootstrap-server "
        f"{kafka_bootstrap} --create --topic {topic}), or fix the topic name"
    )


SOURCE_JOB = """
    from connectors.kafka import KafkaSource
    from runtime import Job


    def build(job: Job) -> None:
        source = KafkaSource(
            job.params["bootstrap"],
            job.params["topic"],
            discovery_interval_s=0.1,  # the periodic partition discovery meets the lost broker
            client_options={"request_timeout_ms": 1000},
        )
        job.from_source(source, name="Source: Kafka").print()
"""


def _job_file(tmp_path: Path, name: str, source: str) -> Path:
    job = tmp_path / name
    job.write_text(textwrap.dedent(source))
    return job


def _running(address: str) -> bool:
    status = get_json(address, "/status")
    return status["status"] == "running" and all(
        task["state"] == "running" for task in status["tasks"]
    )


@pytest.mark.slow
def test_a_broker_that_goes_away_fails_attempts_with_one_line_each(tmp_path: Path) -> None:
    """The source's client logs every reconnection attempt: they fold into one line; each
    attempt fails on the missing broker (one line), the restart strategy restarts it, and once
    it gives up the CLI's one error line names the address."""
    with LocalKafkaBroker() as broker:
        address = broker.bootstrap_servers
        topic = unique_name("goes-away")
        asyncio.run(create_topics(address, topic))
        stderr = tmp_path / "stderr"
        proc = start_cli(
            stderr,
            *("run", str(_job_file(tmp_path, "kafka_source.py", SOURCE_JOB))),
            *("--set", f"bootstrap={address}", "--set", f"topic={topic}"),
            *("--restart-strategy", "fixed-delay:3:100ms", "--no-progress", "--rest-port", "0"),
        )
        try:
            rest = wait_for(lambda: printed_address(stderr), "the control endpoint", proc, stderr)
            wait_for(lambda: _running(rest), "the job running", proc, stderr)
            broker.stop(timeout=0.5)  # then SIGKILL: the broker goes away at once
            assert proc.wait(timeout=30) == EXIT_FAILED
        finally:
            stop_process(proc)
    text = stderr.read_text()
    assert "Traceback" not in text
    [error] = error_lines(text)
    assert f"no Kafka broker answers at {address} (Kafka({topic})," in error
    # Four starts in a second each log their failed connection: one line per cause (the
    # broker closing, then refusing), repeats folded.
    refused = [
        line.split(" ", 2)[2] for line in text.splitlines() if f'connect to "{address}"' in line
    ]
    assert refused and len(refused) == len(set(refused)) < 4, text
    attempts = [line for line in text.splitlines() if "job attempt" in line]
    assert len(attempts) == 3, text
    assert all(f"no Kafka broker answers at {address}" in line for line in attempts), text


SINK_JOB = """
    from connectors import GeneratorSource
    from connectors.kafka import KafkaSink
    from runtime import Job


    def build(job: Job) -> None:
        sink = KafkaSink(
            job.params["bootstrap"],
            job.params["topic"],
            serializer="text",
            client_options={"request_timeout_ms": 1000},  # a lost broker is noticed in 1 s
        )
        numbers = GeneratorSource(lambda i: i, count=None, rate=job.params.get_float("rate", 0))
        job.from_source(numbers, name="numbers").sink_to(sink, name="Kafka numbers")
"""


def _sink_job(tmp_path: Path) -> Path:
    return _job_file(tmp_path, "kafka_numbers.py", SINK_JOB)


def test_no_broker_for_a_kafka_sink_is_one_line_naming_it(tmp_path: Path) -> None:
    address = f"127.0.0.1:{find_free_port()}"
    proc = run_cli(
        "run",
        str(_sink_job(tmp_path)),
        *("--set", f"bootstrap={address}", "--set", "topic=numbers"),
        *QUIET,
    )
    assert proc.returncode == EXIT_FAILED, proc.stderr
    assert the_one_error(proc) == (
        f"no Kafka broker answers at {address} (Kafka(numbers), sink; connect timeout 1s): check "
        "the bootstrap address and that the broker runs (for the dev loop: python -m runtime "
        "broker)"
    )


@pytest.mark.slow
def test_a_broker_that_goes_away_under_a_kafka_sink_fails_it_with_one_line(
    tmp_path: Path,
) -> None:
    """The writer's failed sends become one line naming the sink (no line per unretrieved send),
    the restart strategy restarts, and the restarts meet no broker."""
    with LocalKafkaBroker() as broker:
        address = broker.bootstrap_servers
        stderr = tmp_path / "stderr"
        proc = start_cli(
            stderr,
            *("run", str(_sink_job(tmp_path)), "--set", f"bootstrap={address}"),
            *("--set", "topic=numbers", "--set", "rate=500", "--checkpoint-interval", "100ms"),
            *("--restart-strategy", "fixed-delay:1:100ms", "--no-progress", "--rest-port", "0"),
        )
        try:
            rest = wait_for(lambda: printed_address(stderr), "the control endpoint", proc, stderr)
            wait_for(lambda: operator_records_in(rest, "kafka-numbers") > 0, "sends", proc, stderr)
            broker.stop(timeout=0.5)  # then SIGKILL: the broker goes away at once
            assert proc.wait(timeout=60) == EXIT_FAILED
        finally:
            stop_process(proc)
    text = stderr.read_text()
    assert "Traceback" not in text and "never retrieved" not in text, text
    [error] = error_lines(text)
    assert error == (
        f"error: no Kafka broker answers at {address} (Kafka(numbers), sink; connect timeout 1s): "
        "check the bootstrap address and that the broker runs (for the dev loop: python -m "
        "runtime broker)"
    )
    [first_attempt] = [line for line in text.splitlines() if "job attempt 1 failed" in line]
    assert (
        f"KafkaSink 'Kafka numbers' (subtask 1/1): writing to Kafka(numbers) on {address} failed"
        in first_attempt
    )


@pytest.mark.parametrize(
    ("job", "output", "error"),
    [
        (
            "examples/wordcount.py",
            "counts.jsonl",
            "JSON-lines file sink: cannot write '{output}' (a file is in the way): give another "
            "output path or fix its permissions",
        ),
        (
            "examples/file_etl.py",
            "out",
            "two-phase file sink 'committed files' (subtask 1/1): cannot create '{output}' (a "
            "file is in the way): give another output path or fix its permissions",
        ),
    ],
)
def test_an_output_path_under_a_file_is_one_line_naming_the_sink(
    tmp_path: Path, job: str, output: str, error: str
) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / output
    proc = run_cli("run", job, "--set", f"output={path}", *QUIET)
    assert proc.returncode == EXIT_FAILED, proc.stderr
    assert the_one_error(proc) == error.format(output=path)
