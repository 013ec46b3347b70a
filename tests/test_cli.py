"""``python -m runtime run FILE``: exit codes and messages for bad files, failing jobs, parameters."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime", "run", *args, "--no-progress", "--rest-port", "-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_job(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def test_missing_job_file_exits_2_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_job.py"
    proc = run_cli(str(missing))
    assert proc.returncode == 2, proc.stderr
    assert "no_such_job.py" in proc.stderr
    assert "not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_job_file_without_build_exits_2(tmp_path: Path) -> None:
    job = write_job(tmp_path, "nobuild.py", "def make(job):\n    pass\n")
    proc = run_cli(str(job))
    assert proc.returncode == 2, proc.stderr
    assert "defines no build(job)" in proc.stderr
    assert "nobuild.py" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_job_file_that_cannot_be_imported_exits_2_naming_the_file(tmp_path: Path) -> None:
    """A syntax error in the job file is a bad job file (exit 2), not a failed job (exit 1), and
    the message names the file and the problem rather than the runtime's own frames."""
    job = write_job(tmp_path, "broken_syntax.py", "def build(job):\n    return (\n")
    proc = run_cli(str(job))
    assert proc.returncode == 2, proc.stderr
    assert "broken_syntax.py" in proc.stderr
    assert "SyntaxError" in proc.stderr or "never closed" in proc.stderr
    assert "runtime/plan/jobfile.py" not in proc.stderr


def test_job_file_with_a_failing_import_exits_2(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        "bad_import.py",
        """\
        import module_that_does_not_exist_anywhere

        def build(job):
            pass
        """,
    )
    proc = run_cli(str(job))
    assert proc.returncode == 2, proc.stderr
    assert "bad_import.py" in proc.stderr
    assert "module_that_does_not_exist_anywhere" in proc.stderr


def test_failing_map_exits_1_naming_operator_subtask_record_and_user_traceback(
    tmp_path: Path,
) -> None:
    job = write_job(
        tmp_path,
        "failing.py",
        """\
        from connectors import CollectionSource, CollectSink


        def parse_amount(record):
            if record["amount"] == "twelve":
                raise ValueError(f"amount is not a number: {record['amount']!r}")
            return int(record["amount"])


        def build(job):
            records = [{"id": i, "amount": str(i)} for i in range(20)]
            records[13] = {"id": 13, "amount": "twelve"}
            (
                job.from_source(CollectionSource(records))
                .map(parse_amount, name="parse amounts")
                .sink_to(CollectSink())
            )
        """,
    )
    proc = run_cli(str(job))
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    assert "'parse amounts'" in err
    assert "subtask 1/1" in err
    assert "{'id': 13, 'amount': 'twelve'}" in err
    assert "ValueError: amount is not a number: 'twelve'" in err
    # The user's own traceback: their file and function, the line that raised.
    assert "Traceback" in err
    assert "failing.py" in err
    assert "in parse_amount" in err
    assert 'raise ValueError(f"amount is not a number' in err


def test_failing_job_at_parallelism_3_names_the_subtask(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        "failing_p3.py",
        """\
        from connectors import CollectionSource, CollectSink


        def check(value):
            if value == 25:
                raise RuntimeError("refusing 25")
            return value


        def build(job):
            (
                job.from_source(CollectionSource(range(30)))
                .map(check, name="check")
                .sink_to(CollectSink())
            )
        """,
    )
    proc = run_cli(str(job), "--parallelism", "3")
    assert proc.returncode == 1, proc.stderr
    # Elements 20..29 are the third subtask's slice.
    assert "'check' (subtask 3/3)" in proc.stderr
    assert "record 25" in proc.stderr
    assert "in check" in proc.stderr


def test_set_parameters_reach_job_params_and_functions(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    job = write_job(
        tmp_path,
        "params.py",
        """\
        from pathlib import Path

        from connectors import CollectionSource
        from runtime import MapFunction, Sink, SinkWriter


        class Tag(MapFunction):
            def open(self, ctx):
                self.tag = ctx.params["tag"]

            def map(self, value):
                return f"{self.tag}:{value}"


        class FileLines(Sink):
            def __init__(self, path):
                self.path = path

            def create_writer(self, context):
                return _Writer(self.path)


        class _Writer(SinkWriter):
            def __init__(self, path):
                self.path = Path(path)
                self.lines = []

            async def write(self, values):
                self.lines.extend(values)

            async def finish(self):
                self.path.write_text("\\n".join(self.lines) + "\\n")


        def build(job):
            count = job.params.get_int("count", 0)
            words = job.params.require("words").split(",")
            (
                job.from_source(CollectionSource(words * count))
                .map(Tag())
                .sink_to(FileLines(job.params["output"]))
            )
        """,
    )
    proc = run_cli(
        str(job),
        "--set",
        "count=2",
        "--set",
        "words=x,y",
        "--set",
        "tag=a=b",
        "--set",
        f"output={out}",
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().splitlines() == ["a=b:x", "a=b:y", "a=b:x", "a=b:y"]


def test_missing_required_parameter_is_a_usage_error(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        "needs_param.py",
        """\
        from connectors import CollectionSource, CollectSink


        def build(job):
            job.from_source(CollectionSource([job.params.require("input")])).sink_to(CollectSink())
        """,
    )
    proc = run_cli(str(job))
    assert proc.returncode == 2, proc.stderr
    assert "'input' is required" in proc.stderr
    assert "--set input=" in proc.stderr


def test_malformed_set_argument_is_a_usage_error(tmp_path: Path) -> None:
    job = write_job(tmp_path, "ok.py", "def build(job):\n    pass\n")
    proc = run_cli(str(job), "--set", "novalue")
    assert proc.returncode == 2
    assert "expected key=value" in proc.stderr


def test_successful_job_exits_0_and_prints_its_records(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        "printing.py",
        """\
        from connectors import CollectionSource


        def build(job):
            job.from_source(CollectionSource(["hello", "world"])).map(str.upper).print()
        """,
    )
    proc = run_cli(str(job))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["HELLO", "WORLD"]
