"""The README's Kafka dev loop, run as written: load the sample events, run the ETL, stop it with
a savepoint, resume from the savepoint directory, and once more (stop, resume), so the directory
holds two savepoints when the resume command runs again. Only the broker's address, the ``/tmp``
folders and the interpreter are replaced (the session's broker, this test's folders, this
Python); the commands run through bash, ``$(cat ...)`` included."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import kafka_fixtures
import pytest
from cli_helpers import ROOT, RUN_TIMEOUT_S, max_completed, read_address, stop_process, wait_for
from etl_expectations import assert_exact_output, committed_records, expected_output
from kafka_fixtures import KAFKA_BOOTSTRAP_ENV, unique_name

kafka_bootstrap = kafka_fixtures.kafka_bootstrap

README_BOOTSTRAP = "127.0.0.1:9092"


def readme_block(heading: str, language: str = "bash") -> str:
    """The first ``language`` code block of the README after ``heading``."""
    readme = (ROOT / "README.md").read_text()
    assert heading in readme, f"the README has no {heading!r}"
    section = readme.split(heading, 1)[1]
    block = re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert block, f"the README's {heading!r} has no {language} block"
    return block.group(1)


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block, continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        command = line.split(" #", 1)[0].strip()
        if command and not command.startswith("#"):
            commands.append(re.sub(r"\s+", " ", command))
    return commands


def dev_loop_commands() -> list[str]:
    """The commands of the README's "Kafka: the dev loop" block."""
    return shell_commands(readme_block("## Kafka: the dev loop"))


def localized(command: str, bootstrap: str, tmp: Path) -> str:
    command = command.replace(README_BOOTSTRAP, bootstrap).replace("/tmp/", f"{tmp}/")
    return re.sub(r"^python ", shlex.quote(sys.executable) + " ", command)


@pytest.mark.slow
@pytest.mark.skipif(
    bool(os.environ.get(KAFKA_BOOTSTRAP_ENV, "").strip()),
    reason="the README's dev loop loads the default topic 'events', which a shared cluster may "
    "already hold with other events",
)
def test_the_dev_loop_runs_as_written_with_two_savepoints(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    broker, load, run, stop, resume = dev_loop_commands()
    assert broker.startswith("python -m runtime broker"), broker
    chk, sp, out = tmp_path / "kafka-chk", tmp_path / "kafka-sp", tmp_path / "kafka-out"
    assert all(str(path.name) in run + stop + resume for path in (chk, sp, out))

    def shell(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", localized(command, kafka_bootstrap, tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )

    loaded = shell(load)
    assert loaded.returncode == 0 and "loaded 3000 events" in loaded.stdout, loaded.stderr

    def run_until_stopped(command: str, name: str, wait_for_all_output: bool) -> tuple[str, str]:
        """Run ``command`` in the background until it completed a checkpoint (and, if asked,
        committed the whole expected output), then run the README's stop command; the run's
        stderr and the savepoint folder the stop wrote."""
        stderr_path = tmp_path / f"{name}.stderr"
        previous_address = read_address(chk)
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(
                ["bash", "-c", "exec " + localized(command, kafka_bootstrap, tmp_path)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            wait_for(
                lambda: read_address(chk) not in (None, previous_address),
                f"{name}: its control endpoint",
                proc,
                stderr_path,
            )
            first = max_completed(chk)
            wait_for(lambda: max_completed(chk) > first, f"{name}: a checkpoint", proc, stderr_path)
            if wait_for_all_output:
                total = sum(len(rows) for rows in expected_output().values())
                wait_for(
                    lambda: len(committed_records(out)) >= total,
                    f"{name}: all output committed",
                    proc,
                    stderr_path,
                    timeout=60,
                )
            stopped = shell(stop)
            assert stopped.returncode == 0, stopped.stderr
            assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, stderr_path.read_text()
        finally:
            stop_process(proc)
        match = re.search(r"stopped with savepoint \d+ at (\S+)", stopped.stdout)
        assert match, stopped.stdout
        return stderr_path.read_text(), Path(match.group(1)).name

    _, first_savepoint = run_until_stopped(run, "run", wait_for_all_output=False)
    resumed, second_savepoint = run_until_stopped(resume, "resume", wait_for_all_output=False)
    assert f"restoring the newest valid snapshot in it, {first_savepoint}" in resumed
    assert sorted(p.name for p in sp.iterdir()) == sorted([first_savepoint, second_savepoint])

    # Two savepoints now: the same resume command takes the newer one.
    resumed_again, third_savepoint = run_until_stopped(resume, "resume-2", wait_for_all_output=True)
    assert f"restoring the newest valid snapshot in it, {second_savepoint}" in resumed_again
    assert third_savepoint not in (first_savepoint, second_savepoint)
    assert_exact_output(out)


def test_the_notebook_form_runs_as_written(kafka_bootstrap: str) -> None:
    """The README's ``run_job(build, max_records=10)`` on a live topic returns, and the collect
    sink holds the 10 records, committed. Only the broker's address and the topic are replaced
    (a topic of this test's own, loaded with the sample events)."""
    code = readme_block("### From a notebook or a script", "python")
    assert 'KafkaSource("127.0.0.1:9092", "events")' in code
    topic = unique_name("notebook-events")
    loaded = subprocess.run(
        [
            sys.executable,
            "examples/load_events.py",
            "--bootstrap",
            kafka_bootstrap,
            "--topic",
            topic,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert loaded.returncode == 0 and "loaded 3000 events" in loaded.stdout, loaded.stderr
    localized_code = code.replace(README_BOOTSTRAP, kafka_bootstrap).replace(
        '"events"', repr(topic)
    )
    namespace: dict[str, Any] = {}
    exec(compile(localized_code, "README.md", "exec"), namespace)
    result, sink = namespace["result"], namespace["sink"]
    assert result.stopped_by == "max_records"
    assert len(sink.committed) == 10
    assert sink.committed == sink.results
    assert all(event["kind"] == "purchase" for event in sink.committed)
