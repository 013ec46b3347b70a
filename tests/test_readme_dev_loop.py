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

import kafka_fixtures
import pytest
from cli_helpers import ROOT, RUN_TIMEOUT_S, max_completed, read_address, stop_process, wait_for
from etl_expectations import assert_exact_output, committed_records, expected_output
from kafka_fixtures import KAFKA_BOOTSTRAP_ENV

kafka_bootstrap = kafka_fixtures.kafka_bootstrap

README_BOOTSTRAP = "127.0.0.1:9092"


def dev_loop_commands() -> list[str]:
    """The commands of the README's "Kafka: the dev loop" block, continuation lines joined,
    comments dropped."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Kafka: the dev loop", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block, "the README's dev loop has no bash block"
    joined = block.group(1).replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        command = line.split(" #", 1)[0].strip()
        if command and not command.startswith("#"):
            commands.append(re.sub(r"\s+", " ", command))
    return commands


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
