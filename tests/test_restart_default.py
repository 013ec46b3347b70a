"""The default restart strategy of ``python -m runtime run`` (as Flink's): ``exponential-delay``
with periodic checkpointing, ``none`` without; the effective strategy is said at start-up."""

from __future__ import annotations

from pathlib import Path

import orjson
from cli_helpers import run_cli

from connectors.files import committed_files

COUNT = 600
FAIL_AT = 300

FAILS_ONCE_JOB = '''
from pathlib import Path

from connectors import GeneratorSource, TwoPhaseCommitFileSink


def build(job):
    marker = Path(job.params["marker"])

    def double(i):
        if i == FAIL_AT and not marker.exists():
            marker.touch()
            raise RuntimeError(f"transient failure at {i} (first attempt only)")
        return i * 2

    (
        job.from_source(GeneratorSource(lambda i: i, rate=1000, count=COUNT))
        .uid("numbers")
        .map(double, name="double")
        .uid("double")
        .sink_to(TwoPhaseCommitFileSink(job.params["output"]), name="files")
        .uid("files")
    )
'''.replace("FAIL_AT", str(FAIL_AT)).replace("COUNT", str(COUNT))

TINY_JOB = """
from connectors import CollectionSource, CollectSink


def build(job):
    job.from_source(CollectionSource([1, 2, 3])).sink_to(CollectSink())
"""


def _tiny(tmp_path: Path) -> str:
    job = tmp_path / "tiny.py"
    job.write_text(TINY_JOB)
    return str(job)


def _fails_once(tmp_path: Path, *extra: str) -> tuple[int, str, Path]:
    job, out = tmp_path / "fails_once.py", tmp_path / "out"
    job.write_text(FAILS_ONCE_JOB)
    result = run_cli(
        "run",
        str(job),
        "--set",
        f"marker={tmp_path / 'failed-once'}",
        "--set",
        f"output={out}",
        "--checkpoint-interval",
        "100ms",
        "--rest-port",
        "-1",
        "--no-progress",
        *extra,
    )
    return result.returncode, result.stderr, out


def _committed_values(out: Path) -> list[int]:
    return sorted(
        orjson.loads(line) for path in committed_files(out) for line in path.read_bytes().split()
    )


def test_the_start_up_lines_say_the_default_strategy_with_checkpointing(tmp_path: Path) -> None:
    result = run_cli(
        "run", _tiny(tmp_path), "--checkpoint-interval", "100ms", "--rest-port", "-1"
    )
    assert result.returncode == 0, result.stderr
    assert (
        "restart strategy: exponential-delay (1s \u2192 1min, unlimited attempts, reset after 1h "
        "without failure) (default with checkpointing)"
    ) in result.stderr


def test_the_start_up_lines_say_the_default_strategy_without_checkpointing(
    tmp_path: Path,
) -> None:
    result = run_cli("run", _tiny(tmp_path), "--rest-port", "-1")
    assert result.returncode == 0, result.stderr
    assert "restart strategy: none (default without checkpointing)" in result.stderr


def test_the_start_up_lines_say_an_explicit_strategy(tmp_path: Path) -> None:
    result = run_cli(
        "run",
        _tiny(tmp_path),
        "--checkpoint-interval",
        "100ms",
        "--restart-strategy",
        "fixed-delay:2:500ms",
        "--rest-port",
        "-1",
    )
    assert result.returncode == 0, result.stderr
    assert "restart strategy: fixed-delay (2 attempts, 500ms apart)\n" in result.stderr


def test_with_checkpointing_a_transient_failure_restarts_by_default(tmp_path: Path) -> None:
    returncode, stderr, out = _fails_once(tmp_path)
    assert returncode == 0, stderr
    assert "WARNING" in stderr
    assert "transient failure at 300 (first attempt only)" in stderr
    assert "restarting in 1.00s" in stderr
    assert _committed_values(out) == [2 * i for i in range(COUNT)]


def test_an_explicit_restart_strategy_none_still_fails_at_once(tmp_path: Path) -> None:
    returncode, stderr, out = _fails_once(tmp_path, "--restart-strategy", "none")
    assert returncode == 1, stderr
    assert "transient failure at 300 (first attempt only)" in stderr
    assert "restarting" not in stderr
    assert len(_committed_values(out)) < COUNT
