"""``python -m runtime run JOB.py --watch``: an edit of the job file, or of a module it imports
from its folder, stops the job with a savepoint and resumes the new version from it; a version
that does not import or whose state does not restore is refused while the old one runs on."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import (
    ROOT,
    checkpointed_run_args,
    committed_output_checkpoints,
    max_completed,
    printed_address,
    registered_job,
    replace_in_file,
    set_args,
    start_cli,
    stderr_line,
    stop_process,
    wait_for,
)

pytestmark = pytest.mark.slow

JOBS = ROOT / "tests" / "jobs"
KEYS = 5
RELOADED = r"^watch: reloaded (?P<files>[^:]+): savepoint (?P<id>\d+) .*running again (?P<s>[\d.]+)s after the save "
REFUSED = r"^error: watch: (?P<files>.+?) changed, but the new version is not run"


@dataclass
class WatchedRun:
    proc: subprocess.Popen[bytes]
    stderr: Path
    job: Path
    labels: Path
    out: Path
    chk: Path

    def wait_line(self, pattern: str, what: str, after: int = 0) -> re.Match[str]:
        return wait_for(
            lambda: stderr_line(self.stderr, pattern, after), what, self.proc, self.stderr
        )

    def position(self) -> int:
        return len(self.stderr.read_text())

    def keeps_running(self) -> None:
        """A checkpoint completes after now: the job still runs."""
        seen = max_completed(self.chk)
        wait_for(
            lambda: max_completed(self.chk) > seen, "a later checkpoint", self.proc, self.stderr
        )

    def versions_started(self) -> int:
        """Job masters started so far (each starts its control endpoint)."""
        return self.stderr.read_text().count("control endpoint: http://")

    def terminate(self) -> int:
        """SIGTERM, as ``docker stop``: the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def write_input(path: Path, records: int) -> None:
    with path.open("w") as file:
        for seq in range(records):
            file.write(json.dumps({"key": f"k{seq % KEYS}", "seq": seq}) + "\n")


def not_watched_job(folder: str, names: list[str]) -> list[str]:
    return [name for name in names if not name.startswith("watched_")]


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[Callable[..., WatchedRun]]:
    runs: list[WatchedRun] = []

    def start(records: int, rate: int, *extra: str) -> WatchedRun:
        # The job's folder holds only the job and its module: the watcher watches that folder.
        folder = Path(shutil.copytree(JOBS, tmp_path / "job", ignore=not_watched_job))
        job, labels = folder / "watched_counts.py", folder / "watched_labels.py"
        write_input(tmp_path / "in.jsonl", records)
        out, chk, stderr = tmp_path / "out", tmp_path / "chk", tmp_path / "stderr.txt"
        proc = start_cli(
            stderr,
            "run",
            str(job),
            *set_args(input=tmp_path / "in.jsonl", output=out, rate=rate),
            *checkpointed_run_args(chk, rest=True),
            "--watch",
            *extra,
        )
        run = WatchedRun(proc, stderr, job, labels, out, chk)
        runs.append(run)
        run.wait_line(r"^watch: watching watched_counts.py, watched_labels.py", "the watch line")
        wait_for(lambda: committed_output_checkpoints(out), "committed output", proc, stderr)
        return run

    yield start
    for run in runs:
        stop_process(run.proc)


def committed_records(out: Path) -> dict[int, list[dict[str, object]]]:
    """Per checkpoint id, the records its committed files hold."""
    found: dict[int, list[dict[str, object]]] = {}
    for path in out.glob("part-*.jsonl"):
        checkpoint = int(re.search(r"-chk(\d+)\.jsonl$", path.name).group(1))  # type: ignore[union-attr]
        found.setdefault(checkpoint, []).extend(
            json.loads(line) for line in path.read_text().splitlines()
        )
    return found


def test_an_edit_of_the_map_resumes_from_a_savepoint_without_losing_or_doubling_records(
    watched,
) -> None:
    records = 1000
    run = watched(records, 250)
    first_address = printed_address(run.stderr)
    replace_in_file(run.job, '"label": label()}', '"label": label(), "double": record["seq"] * 2}')
    reload = run.wait_line(RELOADED, "the reload line")
    print(stderr_line(run.stderr, r"^watch: reloaded .*$").group(0))  # type: ignore[union-attr]  # the timing
    assert reload.group("files") == "watched_counts.py"
    savepoint = int(reload.group("id"))
    addresses = re.findall(r"control endpoint: http://(\S+)", run.stderr.read_text())
    assert len(addresses) == 2 and addresses[0] == first_address, addresses
    entry = registered_job(run.proc.pid)  # the same process, listed at its new endpoint
    assert entry is not None and entry["address"] == addresses[1], entry
    run.wait_line(r"^watch: the job finished; waiting for a change", "the end of the input")
    assert run.terminate() == 0, run.stderr.read_text()

    by_checkpoint = committed_records(run.out)
    before = [r for c, rs in by_checkpoint.items() if c <= savepoint for r in rs]
    later = [r for c, rs in by_checkpoint.items() if c > savepoint for r in rs]
    assert before and later, sorted(by_checkpoint)
    assert all("double" not in r for r in before)
    assert all(r["double"] == 2 * r["seq"] for r in later)  # type: ignore[operator]
    every = before + later
    expected = {(f"k{seq % KEYS}", seq, seq // KEYS + 1) for seq in range(records)}
    assert sorted((r["key"], r["seq"], r["n"]) for r in every) == sorted(expected)


def test_a_syntax_error_is_refused_naming_its_line_and_the_fix_reloads(watched) -> None:
    run = watched(100_000, 100)
    replace_in_file(
        run.job, "    counted = (", '    raise ValueError("no such sink")\n    counted = ('
    )
    raising_line = (
        run.job.read_text().splitlines().index('    raise ValueError("no such sink")') + 1
    )
    refused = run.wait_line(
        REFUSED + r".*build\(job\) in .* raised ValueError: no such sink", "the refusal"
    )
    assert f"(at {run.job}:{raising_line})" in refused.string[refused.start() :].splitlines()[0]
    run.keeps_running()
    replace_in_file(run.job, '    raise ValueError("no such sink")\n', "")
    run.wait_line(RELOADED, "the reload once build() runs")
    mark = run.position()
    lines = run.job.read_text().splitlines()
    broken_line = next(i for i, line in enumerate(lines, 1) if line.startswith("def shape("))
    replace_in_file(
        run.job, "def shape(record: dict[str, Any]) -> dict[str, Any]:", "def shape(record:"
    )
    refused = run.wait_line(REFUSED + r".*SyntaxError", "the refusal", after=mark)
    text = run.stderr.read_text()
    assert f'File "{run.job}", line {broken_line}' in text[text.index(refused.group(0)) :]
    assert not stderr_line(run.stderr, RELOADED, after=mark)
    assert run.versions_started() == 2
    run.keeps_running()
    mark = run.position()
    replace_in_file(
        run.job, "def shape(record:", "def shape(record: dict[str, Any]) -> dict[str, Any]:"
    )
    run.wait_line(RELOADED, "the reload after the fix", after=mark)
    run.keeps_running()
    assert run.terminate() == 0, run.stderr.read_text()
    assert stderr_line(run.stderr, r"^stopped with savepoint ")


@pytest.mark.parametrize("allow", [False, True], ids=["refused", "allowed"])
def test_a_changed_uid_of_a_stateful_operator_needs_allow_non_restored_state(
    watched, allow: bool
) -> None:
    run = watched(100_000, 100, *(["--allow-non-restored-state"] if allow else []))
    replace_in_file(run.job, '.uid("running-count")', '.uid("running-count-v2")')
    if allow:
        reload = run.wait_line(RELOADED, "the reload")
        assert reload.group("files") == "watched_counts.py"
    else:
        refused = run.wait_line(REFUSED, "the refusal")
        text = run.stderr.read_text()[run.stderr.read_text().index(refused.group(0)) :]
        assert "--allow-non-restored-state" in text
        assert re.search(r"state dropped:\s+running-count\b", text), text
        assert re.search(r"starts empty:\s+running count \(running-count-v2\)", text), text
        run.keeps_running()
        assert not stderr_line(run.stderr, RELOADED)
        assert run.versions_started() == 1  # refused before the job stopped: it never did
    assert run.terminate() == 0, run.stderr.read_text()


def test_an_edit_of_a_module_from_the_jobs_folder_reloads_once_per_save(watched) -> None:
    run = watched(100_000, 100)
    new_text = run.labels.read_text().replace('return "old"', 'return "new"')
    with run.labels.open("w") as file:  # an editor writing in place, in several writes
        for start in range(0, len(new_text), 16):
            file.write(new_text[start : start + 16])
            file.flush()
            os.fsync(file.fileno())
    reload = run.wait_line(RELOADED, "the reload")
    assert reload.group("files") == "watched_labels.py"
    savepoint = int(reload.group("id"))

    def new_labels() -> bool:
        by_checkpoint = committed_records(run.out)
        return any(
            r["label"] == "new" for c, rs in by_checkpoint.items() if c > savepoint for r in rs
        )

    wait_for(new_labels, "output of the new version", run.proc, run.stderr)
    mark = run.position()
    replace_in_file(run.labels, 'return "new"', 'return "newer"')
    run.wait_line(RELOADED, "the reload of the next save", after=mark)
    assert len(re.findall(RELOADED, run.stderr.read_text(), re.MULTILINE)) == 2
    assert run.terminate() == 0, run.stderr.read_text()
    by_checkpoint = committed_records(run.out)
    assert all(r["label"] == "old" for c, rs in by_checkpoint.items() if c <= savepoint for r in rs)
    assert all(r["label"] != "old" for c, rs in by_checkpoint.items() if c > savepoint for r in rs)


def test_a_fix_of_a_job_failing_over_resumes_from_the_latest_checkpoint(watched) -> None:
    run = watched(100_000, 100)
    signature = "def shape(record: dict[str, Any]) -> dict[str, Any]:\n"
    bug = '    if record["seq"] % 7 == 6:\n        raise ValueError("bad record")\n'
    replace_in_file(run.job, signature, signature + bug)
    run.wait_line(RELOADED, "the reload of the version with the bug")
    mark = run.position()
    run.wait_line(r"job attempt 1 failed .*ValueError: bad record", "the failover", after=mark)
    replace_in_file(run.job, bug, "")
    # Between attempts there is no savepoint to take: the job is cancelled and the new version
    # resumes from what the next attempt would have restored.
    run.wait_line(r"^watch: the job was failing over \(attempt \d\): cancelled it", "the cancel")
    run.wait_line(r"^watch: reloaded watched_counts.py: .*running again", "the fix", after=mark)
    run.keeps_running()
    assert run.terminate() == 0, run.stderr.read_text()

    every = [r for rs in committed_records(run.out).values() for r in rs]
    seqs = sorted(r["seq"] for r in every)  # type: ignore[type-var]
    assert seqs == list(range(len(seqs))), "records lost or doubled across the reloads"
    assert sorted((r["key"], r["n"]) for r in every) == sorted(
        (f"k{seq % KEYS}", seq // KEYS + 1) for seq in seqs
    )


def test_ctrl_c_while_watching_cancels_as_without_watch(watched) -> None:
    run = watched(100_000, 100)
    run.proc.send_signal(signal.SIGINT)
    assert run.proc.wait(timeout=30) == 130, run.stderr.read_text()
    assert stderr_line(run.stderr, r"^error: cancelled \(Ctrl-C\): every task was closed$")
