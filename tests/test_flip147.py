"""FLIP-147: checkpoints after tasks finished, and the end of a job that commits everything.

The reference is the FLIP-147 article (``shared/seeds/004_*.txt``): its revised end-of-job steps,
figure 4 (cascaded two-phase-commit tasks must not wait for one checkpoint each), figure 6 (tasks
C -> D and A, C -> E), the trigger race (a task that finishes while it is being triggered aborts
that checkpoint), the finished marks, the rule that operators cannot be added in front of a fully
finished operator, and the finish()/close() contract.

In-process tests wait on asyncio events fired by task state changes and checkpoint completions;
subprocess tests poll the control endpoint or the file system with a hard deadline.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from loop_helpers import ScriptedTaskHandle

from actors.protocol import (
    AcknowledgeCheckpoint,
    StopRequest,
    TaskReport,
    TaskState,
    TaskStateChanged,
    TriggerCheckpoint,
)
from connectors import (
    CollectionSource,
    CollectSink,
    GeneratorSource,
    TwoPhaseCommitFileSink,
    committed_files,
)
from runtime import (
    CheckpointConfig,
    Collector,
    ExecutionConfig,
    Job,
    JobFailedError,
    KeyedCoProcessFunction,
    MapFunction,
    RuntimeContext,
    run_job,
)
from runtime.api.sinks import Sink, SinkWriter
from runtime.api.sources import END_OF_INPUT, EndOfInput, Source, SourceReader, SourceReaderContext
from runtime.master.coordinator import (
    CheckpointCoordinator,
    CheckpointedOperator,
    CheckpointFailedError,
    CheckpointStatus,
)
from runtime.master.jobmaster import JobMaster, JobResult
from runtime.master.restart import FixedDelayRestart
from runtime.plan.restore import RestoreMismatchError, RestoreReport
from runtime.shell.runner import build_graph, run_coroutine
from runtime.testing import arm, disarm_all
from state.storage import CheckpointKind, CheckpointStorage, load_checkpoint, load_latest_valid

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
EVENTS = EXAMPLES / "data" / "events.jsonl"
COUNTRIES = EXAMPLES / "data" / "user_countries.jsonl"

# --------------------------------------------------------------------------------------------------
# helpers: subprocesses and the control endpoint


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Background:
    """A ``python -m runtime run ...`` in the background, its output in files (no pipe stalls)."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.stdout_path = tmp / f"{name}.stdout"
        self.stderr_path = tmp / f"{name}.stderr"
        self._out = self.stdout_path.open("w")
        self._err = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime", "run", *args, "--no-progress"],
            cwd=ROOT,
            stdout=self._out,
            stderr=self._err,
            text=True,
        )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait(self, timeout: float = 30.0) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            self._out.close()
            self._err.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._out.close()
        self._err.close()

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            msg = f"the job exited early with {self.proc.returncode}:\n{self.stderr}"
            raise AssertionError(msg)


def poll_until(
    predicate: Callable[[], Any], what: str, timeout: float = 20.0, job: Background | None = None
) -> Any:
    """Poll a file-system or HTTP condition with a short pause and a hard deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if job is not None:
            job.check_alive()
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout:g}s waiting for {what}"
            raise AssertionError(msg)
        time.sleep(0.02)


def rest_address(checkpoint_dir: Path, job: Background) -> str:
    address_file = checkpoint_dir / "rest-address"
    return str(
        poll_until(
            lambda: address_file.exists() and address_file.read_text().strip(),
            "the control endpoint address",
            job=job,
        )
    )


def http_get(address: str, path: str) -> Any:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as response:
        return json.loads(response.read())


def task_states(address: str) -> dict[str, str]:
    return {t["name"]: t["state"] for t in http_get(address, "/status")["tasks"]}


def read_committed(directory: Path) -> list[Any]:
    records: list[Any] = []
    for path in committed_files(directory):
        records.extend(orjson.loads(line) for line in path.read_bytes().splitlines() if line)
    return records


def visible_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


# --------------------------------------------------------------------------------------------------
# helpers: in-process jobs observed through events


class Signal:
    """Fired on every task state change and checkpoint outcome; ``wait_for`` re-checks a predicate."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()

    async def wait_for(
        self, predicate: Callable[[], bool], what: str, timeout: float = 5.0
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._event.clear()
                    await self._event.wait()
        except TimeoutError:
            msg = f"timed out after {timeout:g}s waiting for {what}"
            raise AssertionError(msg) from None


class ProbedCoordinator(CheckpointCoordinator):
    """The real coordinator, firing a signal whenever a checkpoint completes or is aborted."""

    signal: Signal

    async def _complete(self, pending: Any) -> None:
        await super()._complete(pending)
        self.signal.fire()

    def _abort(self, pending: Any, reason: str, counts: bool = True) -> None:
        super()._abort(pending, reason, counts)
        self.signal.fire()

    def trigger(self, *args: Any, **kw: Any) -> Any:
        future = super().trigger(*args, **kw)
        self.signal.fire()
        return future


class ProbedMaster(JobMaster):
    """A job master that records every task state change together with the checkpoints completed
    so far, and fires a signal on it."""

    def __init__(self, graph: Any, config: ExecutionConfig, **kw: Any) -> None:
        super().__init__(graph, config, **kw)
        self.signal = Signal()
        coordinator = ProbedCoordinator(
            self.config.checkpoint,
            self.storage,
            self.coordinator.operators,
            first_checkpoint_id=self.coordinator.next_id,
        )
        coordinator.signal = self.signal
        self.coordinator = coordinator
        self.events: list[tuple[str, TaskState, list[int]]] = []
        """(vertex id, state, ids of the checkpoints completed at that moment)."""

    def report(self, message: TaskReport) -> None:
        super().report(message)
        if isinstance(message, TaskStateChanged):
            self.events.append(
                (message.task.vertex_id, message.state, list(self.coordinator.completed_ids))
            )
            self.signal.fire()

    def state_of(self, vertex_id: str) -> TaskState:
        states = {t.state for t in self.tasks if t.vertex_id == vertex_id}
        assert len(states) == 1, (vertex_id, states)
        return states.pop()

    def completed_when(self, vertex_id: str, state: TaskState) -> list[int]:
        for vertex, seen, completed in self.events:
            if vertex == vertex_id and seen is state:
                return completed
        msg = f"{vertex_id} never reached {state}"
        raise AssertionError(msg)

    def reached(self, vertex_id: str, state: TaskState) -> bool:
        return any(v == vertex_id and s is state for v, s, _ in self.events)

    def history(self) -> list[tuple[int, CheckpointStatus, str | None]]:
        return [(s.checkpoint_id, s.status, s.failure) for s in self.coordinator.history]


def probed_master(
    build: Callable[[Job], Any], config: ExecutionConfig, parallelism: int = 1, **kw: Any
) -> ProbedMaster:
    return ProbedMaster(build_graph(build, parallelism=parallelism), config, **kw)


async def finish_job(job: asyncio.Task[JobResult], timeout: float = 5.0) -> JobResult:
    async with asyncio.timeout(timeout):
        return await job


async def cancel_job(job: asyncio.Task[Any]) -> None:
    if not job.done():
        job.cancel()
    try:
        await job
    except (asyncio.CancelledError, Exception):
        pass


class HeldSource(Source[Any]):
    """An unbounded-looking source that emits ``first`` at once, then nothing (``poll`` returns
    None) until the test calls :meth:`release`; then it emits ``after`` and ends."""

    bounded = False

    def __init__(self, first: list[Any], after: list[Any]) -> None:
        self.first = list(first)
        self.after = list(after)
        self.released = asyncio.Event()
        self._contexts: list[SourceReaderContext] = []

    def create_splits(self, parallelism: int) -> list[Any]:
        return [{"split": i, "phase": 0} for i in range(parallelism)]

    def create_reader(self, context: SourceReaderContext) -> SourceReader[Any]:
        self._contexts.append(context)
        return _HeldReader(self, context.subtask_index)

    def release(self) -> None:
        self.released.set()
        for context in self._contexts:
            context.notify_available()


class _HeldReader(SourceReader[Any]):
    def __init__(self, source: HeldSource, subtask: int) -> None:
        self.source = source
        self.subtask = subtask
        self.splits: list[dict[str, Any]] = []

    def add_splits(self, splits: list[Any]) -> None:
        self.splits.extend(dict(s) for s in splits)

    def poll(self, max_records: int) -> list[Any] | EndOfInput | None:
        for split in self.splits:
            if split["phase"] == 0:
                split["phase"] = 1
                return list(self.source.first) if split["split"] == 0 else []
            if split["phase"] == 1:
                if not self.source.released.is_set():
                    return None
                split["phase"] = 2
                return list(self.source.after) if split["split"] == 0 else []
        return END_OF_INPUT

    def snapshot_splits(self) -> list[Any]:
        return [dict(s) for s in self.splits]


def expected_etl_output() -> list[dict[str, Any]]:
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    result = []
    for line in EVENTS.read_bytes().splitlines():
        if not line.strip():
            continue
        event = orjson.loads(line)
        if event.get("kind") != "purchase":
            continue
        user = event["user"]
        totals[user] = round(totals.get(user, 0.0) + float(event["amount"]), 2)
        counts[user] = counts.get(user, 0) + 1
        result.append({"user": user, "total": totals[user], "n": counts[user]})
    return result


def canonical(records: list[Any]) -> list[bytes]:
    return sorted(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in records)


# ==================================================================================================
# 1. A bounded job commits everything and ends promptly, whatever the checkpoint interval.


@pytest.mark.parametrize("parallelism", [1, 2])
def test_bounded_file_etl_cli_commits_everything_promptly_with_hour_interval(
    tmp_path: Path, parallelism: int
) -> None:
    output = tmp_path / "out"
    started = time.monotonic()
    proc = cli(
        "run",
        str(EXAMPLES / "file_etl.py"),
        "--parallelism",
        str(parallelism),
        "--set",
        f"output={output}",
        "--checkpoint-interval",
        "1h",
        "--checkpoint-dir",
        str(tmp_path / "chk"),
        "--no-progress",
        timeout=30,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 5.0, f"a 3000-line job with a 1h interval took {elapsed:.1f}s to end"
    # Everything is committed (no in-progress or pending file left behind), exactly once.
    assert not [p.name for p in output.iterdir() if p.name.startswith(".")]
    assert canonical(read_committed(output)) == canonical(expected_etl_output())
    # The final checkpoint on disk marks every operator finished.
    final = load_latest_valid(tmp_path / "chk")
    assert final is not None
    assert {uid: e.fully_finished for uid, e in final.operators.items()} == {
        uid: True for uid in final.operators
    }


def test_bounded_job_in_process_commits_everything_with_one_final_checkpoint(
    tmp_path: Path,
) -> None:
    """Figure 4: three cascaded tasks, each with a two-phase-commit sink, share one checkpoint
    (they do not wait for a checkpoint each), with a periodic interval far beyond the job."""
    out = [tmp_path / f"out{i}" for i in range(3)]
    n = 5000

    def build(job: Job) -> None:
        first = job.from_source(CollectionSource(range(n)), name="numbers").uid("numbers")
        first.sink_to(TwoPhaseCommitFileSink(out[0]), name="sink0").uid("sink0")
        second = first.rebalance().map(lambda x: x * 2, name="double").uid("double")
        second.sink_to(TwoPhaseCommitFileSink(out[1]), name="sink1").uid("sink1")
        third = second.rebalance().map(lambda x: x + 1, name="plus-one").uid("plus-one")
        third.sink_to(TwoPhaseCommitFileSink(out[2]), name="sink2").uid("sink2")

    config = ExecutionConfig(checkpoint=CheckpointConfig(interval_s=3600))
    started = time.monotonic()
    result = run_job(build, parallelism=2, config=config)
    elapsed = time.monotonic() - started
    assert elapsed < 5.0, f"took {elapsed:.1f}s"
    assert sorted(read_committed(out[0])) == list(range(n))
    assert sorted(read_committed(out[1])) == [2 * i for i in range(n)]
    assert sorted(read_committed(out[2])) == [2 * i + 1 for i in range(n)]
    for directory in out:
        assert not [p.name for p in directory.iterdir() if p.name.startswith(".")]
    assert result.checkpoints_completed == 1, (
        f"{result.checkpoints_completed} checkpoints: every task should finish on the same "
        "final checkpoint"
    )


# ==================================================================================================
# 2. Figure 6: C -> D and A, C -> E.


def figure6(
    a: HeldSource, c_records: list[Any], sink_d: Sink, sink_e: Sink
) -> Callable[[Job], None]:
    def build(job: Job) -> None:
        source_a = job.from_source(a, name="A").uid("A").disable_chaining()
        source_c = job.from_source(CollectionSource(c_records), name="C").uid("C")
        source_c = source_c.disable_chaining()
        source_c.sink_to(sink_d, name="D").uid("D").disable_chaining()
        source_a.union(source_c).sink_to(sink_e, name="E").uid("E").disable_chaining()

    return build


@pytest.mark.asyncio
async def test_figure6_d_finishes_with_c_on_one_checkpoint_while_a_runs() -> None:
    a = HeldSource(first=["a0", "a1"], after=["a2", "a3"])
    c_records = [f"c{i}" for i in range(20)]
    sink_d, sink_e = CollectSink(), CollectSink()
    # No periodic checkpoints: the test triggers each one, so which checkpoint did what is exact.
    master = probed_master(figure6(a, c_records, sink_d, sink_e), ExecutionConfig())
    assert [v.id for v in master.graph.vertices] == ["A", "C", "D", "E"]
    job = asyncio.create_task(master.run())
    try:
        wait = master.signal.wait_for
        await wait(
            lambda: (
                master.reached("C", TaskState.FINISHING)
                and master.reached("D", TaskState.FINISHING)
                and master.reached("E", TaskState.RUNNING)
                and master.reached("A", TaskState.RUNNING)
            ),
            "C and D to finish their data",
        )
        # C ends its data first: the first task to leave RUNNING is C.
        first_end = next(
            v for v, s, _ in master.events if s in (TaskState.FINISHING, TaskState.FINISHED)
        )
        assert first_end == "C"
        # Nothing ends before a checkpoint: C and D wait in FINISHING, E keeps running.
        assert master.state_of("C") is TaskState.FINISHING
        assert master.state_of("D") is TaskState.FINISHING
        assert master.state_of("E") is TaskState.RUNNING
        assert master.coordinator.completed_ids == []
        assert sink_d.committed == []

        first = await master.coordinator.request_trigger(CheckpointKind.CHECKPOINT)
        await wait(
            lambda: (
                master.state_of("C") is TaskState.FINISHED
                and master.state_of("D") is TaskState.FINISHED
            ),
            "C and D to finish after the first checkpoint",
        )
        # D finished on the very checkpoint C finished on (its barrier came after EndOfData).
        assert master.completed_when("C", TaskState.FINISHED) == [first.checkpoint_id]
        assert master.completed_when("D", TaskState.FINISHED) == [first.checkpoint_id]
        assert sink_d.committed == c_records
        # E waits for both inputs: A still runs, so E neither finished its data nor ended.
        assert master.state_of("A") is TaskState.RUNNING
        assert master.state_of("E") is TaskState.RUNNING
        assert not master.reached("E", TaskState.FINISHING)
        assert sorted(sink_e.committed) == sorted(["a0", "a1", *c_records])
        # FLIP-147 marks: C and D fully finished, A and E not.
        marks = {uid: e.fully_finished for uid, e in first.operators.items()}
        assert marks == {"A": False, "C": True, "D": True, "E": False}

        # Checkpoints go on after C finished: the trigger now goes to A only.
        second = await master.coordinator.request_trigger(CheckpointKind.CHECKPOINT)
        assert second.checkpoint_id > first.checkpoint_id
        assert master.state_of("A") is TaskState.RUNNING
        assert master.state_of("E") is TaskState.RUNNING
        marks = {uid: e.fully_finished for uid, e in second.operators.items()}
        assert marks == {"A": False, "C": True, "D": True, "E": False}
        assert [(i, s) for i, s, _ in master.history()] == [
            (first.checkpoint_id, CheckpointStatus.COMPLETED),
            (second.checkpoint_id, CheckpointStatus.COMPLETED),
        ]

        a.release()
        result = await finish_job(job)
    finally:
        await cancel_job(job)
    assert all(t.state is TaskState.FINISHED for t in master.tasks)
    # E needed a checkpoint of its own, later than the one C and D finished on.
    e_finished_on = master.completed_when("E", TaskState.FINISHED)
    assert e_finished_on[-1] > second.checkpoint_id
    assert sorted(sink_e.committed) == sorted(["a0", "a1", "a2", "a3", *c_records])
    assert sink_d.committed == c_records
    assert result.checkpoints_completed == 3


@pytest.mark.asyncio
async def test_figure6_with_periodic_checkpoints() -> None:
    """The same job with periodic checkpoints: D ends while A runs, checkpoints keep completing
    after C finished, and E only ends once A ended."""
    a = HeldSource(first=["a0"], after=["a1"])
    c_records = list(range(200))
    sink_d, sink_e = CollectSink(), CollectSink()
    config = ExecutionConfig(checkpoint=CheckpointConfig(interval_s=0.02))
    master = probed_master(figure6(a, c_records, sink_d, sink_e), config)
    job = asyncio.create_task(master.run())
    try:
        wait = master.signal.wait_for
        await wait(
            lambda: (
                master.reached("C", TaskState.FINISHED) and master.reached("D", TaskState.FINISHED)
            ),
            "C and D to finish",
        )
        c_done = master.completed_when("C", TaskState.FINISHED)[-1]
        assert master.state_of("A") is TaskState.RUNNING
        assert master.state_of("E") is TaskState.RUNNING
        assert sink_d.committed == c_records

        def completed_after_c() -> list[int]:
            return [
                i
                for i, status, _ in master.history()
                if status is CheckpointStatus.COMPLETED and i > c_done
            ]

        await wait(lambda: len(completed_after_c()) >= 3, "checkpoints after C finished")
        assert master.state_of("A") is TaskState.RUNNING
        assert master.state_of("E") is TaskState.RUNNING
        assert not master.reached("E", TaskState.FINISHING)
        assert [f for _, s, f in master.history() if s is CheckpointStatus.FAILED] == []
        latest = master.coordinator.latest_completed
        assert latest is not None
        assert {uid: e.fully_finished for uid, e in latest.operators.items()} == {
            "A": False,
            "C": True,
            "D": True,
            "E": False,
        }
        a.release()
        await finish_job(job)
    finally:
        await cancel_job(job)
    assert sorted(sink_e.committed, key=str) == sorted(["a0", "a1", *c_records], key=str)


# ==================================================================================================
# 3. Kill after the bounded source finished; restore does not run it again.


@pytest.mark.parametrize("side_input_change", ["modified", "deleted"])
def test_kill_after_bounded_source_finished_then_restore_skips_it(
    tmp_path: Path, side_input_change: str
) -> None:
    countries = tmp_path / "countries.jsonl"
    original = {
        orjson.loads(line)["user"]: orjson.loads(line)["country"]
        for line in COUNTRIES.read_bytes().splitlines()
        if line.strip()
    }
    countries.write_bytes(COUNTRIES.read_bytes())
    output = tmp_path / "out"
    chk = tmp_path / "chk"
    example = str(EXAMPLES / "bounded_with_stream.py")
    common = ["--set", f"output={output}", "--set", f"countries={countries}"]
    job = Background(
        tmp_path,
        "first",
        example,
        *common,
        "--set",
        "rate=300",
        "--checkpoint-interval",
        "50ms",
        "--checkpoint-dir",
        str(chk),
    )
    try:
        address = rest_address(chk, job)
        poll_until(
            lambda: task_states(address).get("Source: countries (1/1)") == "finished",
            "the countries source to finish",
            job=job,
        )
        seen = max((h["id"] for h in http_get(address, "/checkpoints")["history"]), default=0)

        def completed_after_finish() -> bool:
            history = http_get(address, "/checkpoints")["history"]
            return any(h["id"] > seen and h["status"] == "completed" for h in history)

        poll_until(
            completed_after_finish, "a checkpoint after the countries source finished", job=job
        )
        states = task_states(address)
        assert states["Source: clicks (1/1)"] == "running"
    finally:
        job.kill()
    latest = load_latest_valid(chk)
    assert latest is not None
    assert latest.operators["countries"].fully_finished
    assert not latest.operators["clicks"].fully_finished
    before = read_committed(output)
    n = 5000
    assert len(before) < n

    # If the finished source were run again, it would fail (deleted) or re-emit other countries.
    if side_input_change == "deleted":
        countries.unlink()
    else:
        countries.write_bytes(
            b"".join(
                orjson.dumps({"user": user, "country": "XX"}) + b"\n" for user in sorted(original)
            )
        )
    restored = cli(
        "run",
        example,
        *common,
        "--set",
        f"count={n}",
        "--set",
        "rate=0",
        "--checkpoint-dir",
        str(chk),
        "--restore",
        "latest",
        "--no-progress",
        timeout=60,
    )
    assert restored.returncode == 0, restored.stderr
    assert f"restoring checkpoint {latest.checkpoint_id}" in restored.stderr
    records = read_committed(output)
    clicks = Counter(r["click"] for r in records)
    duplicates = sorted(c for c, k in clicks.items() if k > 1)
    assert duplicates == [], f"clicks committed twice: {duplicates[:10]}"
    assert sorted(clicks) == list(range(n))
    wrong = [r for r in records if r["country"] != original[r["user"]]]
    assert wrong == [], f"{len(wrong)} clicks with a wrong country, e.g. {wrong[:3]}"
    assert all(r["user"] == f"u{r['click'] % 50:02d}" for r in records)


# ==================================================================================================
# 4. A checkpoint triggered while its target finishes is aborted; the next one completes.


@pytest.mark.asyncio
async def test_trigger_refused_by_a_finishing_task_aborts_and_next_checkpoint_completes() -> None:
    """Driven with scripted task handles: the trigger cannot be delivered to its target because
    the task just finished (its state report has not been seen yet)."""
    source = ScriptedTaskHandle("source", state=TaskState.FINISHED)
    middle = ScriptedTaskHandle("middle", state=TaskState.FINISHING, upstream=(source.task_id,))
    sink = ScriptedTaskHandle("sink", upstream=(middle.task_id,))
    other = ScriptedTaskHandle("other")
    tasks = [source, middle, sink, other]
    coordinator = CheckpointCoordinator(
        CheckpointConfig(tolerable_failures=0),
        None,
        {t.task_id.vertex_id: CheckpointedOperator(t.name, 1, 128) for t in tasks},
    )
    coordinator.attach(tasks)
    runner = asyncio.create_task(coordinator.run())
    try:
        middle.accepts = False  # it finished just now: the trigger cannot be delivered
        first = coordinator.trigger(CheckpointKind.CHECKPOINT)
        with pytest.raises(CheckpointFailedError, match="finished"):
            await first
        [stats] = coordinator.history
        assert stats.status is CheckpointStatus.FAILED
        assert stats.failure is not None and "middle" in stats.failure
        assert "finished" in stats.failure
        assert coordinator.pending == {}
        # The aborted checkpoint does not count as a failure (tolerable_failures is 0).
        assert coordinator.consecutive_failures == 0

        # The task's FINISHED report arrives; the next trigger takes the new set of targets.
        middle.state = TaskState.FINISHED
        coordinator.on_report(TaskStateChanged(middle.task_id, TaskState.FINISHED))
        second = coordinator.trigger(CheckpointKind.CHECKPOINT)
        triggered = {
            t.task_id.vertex_id: [m for m in t.sent if isinstance(m, TriggerCheckpoint)]
            for t in (sink, other)
        }
        assert {name: len(mails) for name, mails in triggered.items()} == {"sink": 1, "other": 1}
        second_id = triggered["sink"][0].checkpoint_id
        assert second_id > stats.checkpoint_id
        for task in (sink, other):
            coordinator.on_report(
                AcknowledgeCheckpoint(task.task_id, second_id, {}, False, 0.0, 0.0)
            )
        completed = await asyncio.wait_for(second, 5)
        assert completed.checkpoint_id == second_id
        assert completed.operators["source"].fully_finished
        assert completed.operators["middle"].fully_finished
        assert not completed.operators["sink"].fully_finished
        statuses = [(s.checkpoint_id, s.status) for s in coordinator.history]
        assert statuses == [
            (stats.checkpoint_id, CheckpointStatus.FAILED),
            (second_id, CheckpointStatus.COMPLETED),
        ]
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


class _GatedCloseSink(Sink):
    """A two-phase sink (the testing one) whose close() waits until the test opens a gate."""

    def __init__(self) -> None:
        self.inner = CollectSink()
        self.closing = asyncio.Event()
        self.gate = asyncio.Event()

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        return _GatedCloseWriter(self, self.inner.create_writer(context))


class _GatedCloseWriter(SinkWriter):
    def __init__(self, sink: _GatedCloseSink, inner: SinkWriter) -> None:
        self.sink = sink
        self.inner = inner

    async def write(self, values: list[Any]) -> None:
        await self.inner.write(values)

    async def snapshot_state(self, checkpoint_id: int) -> list[Any]:
        return await self.inner.snapshot_state(checkpoint_id)

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        await self.inner.notify_checkpoint_complete(checkpoint_id)

    async def close(self) -> None:
        self.sink.closing.set()
        await self.sink.gate.wait()


@pytest.mark.asyncio
async def test_checkpoint_triggered_while_its_target_finishes_is_aborted_in_a_real_job() -> None:
    """T (after bounded C) has taken its final checkpoint and is closing (still FINISHING, its
    upstream finished) when the next checkpoint is triggered on it: that checkpoint cannot
    complete; it is aborted when T reports FINISHED, and the next one completes."""
    a = HeldSource(first=["a0"], after=["a1"])
    gated = _GatedCloseSink()
    sink_a = CollectSink()

    def build(job: Job) -> None:
        job.from_source(a, name="A").uid("A").sink_to(sink_a, name="SA").uid("SA")
        c = job.from_source(CollectionSource(range(10)), name="C").uid("C")
        c.sink_to(gated, name="T").uid("T").disable_chaining()

    master = probed_master(build, ExecutionConfig())
    job = asyncio.create_task(master.run())
    try:
        wait = master.signal.wait_for
        await wait(lambda: master.reached("T", TaskState.FINISHING), "T to finish its data")
        first = await master.coordinator.request_trigger(CheckpointKind.CHECKPOINT)
        await asyncio.wait_for(gated.closing.wait(), 5)
        assert gated.inner.committed == list(range(10))
        assert master.state_of("C") is TaskState.FINISHED
        assert master.state_of("T") is TaskState.FINISHING

        racing = master.coordinator.request_trigger(CheckpointKind.CHECKPOINT)
        await wait(
            lambda: any(i > first.checkpoint_id for i, _, _ in master.history()),
            "the racing checkpoint to be triggered",
        )
        gated.gate.set()  # T finishes while the racing checkpoint waits for it
        with pytest.raises(CheckpointFailedError, match="finished"):
            await asyncio.wait_for(racing, 5)
        assert master.state_of("T") is TaskState.FINISHED

        after = await asyncio.wait_for(
            master.coordinator.request_trigger(CheckpointKind.CHECKPOINT), 5
        )
        history = master.history()
        failed = [(i, f) for i, s, f in history if s is CheckpointStatus.FAILED]
        assert len(failed) == 1, history
        failed_id, failure = failed[0]
        assert failure is not None and "finished" in failure and "T" in failure
        assert after.checkpoint_id > failed_id
        assert (after.checkpoint_id, CheckpointStatus.COMPLETED, None) in history
        assert master.state_of("A") is TaskState.RUNNING
        a.release()
        await finish_job(job)
    finally:
        gated.gate.set()
        await cancel_job(job)
    assert sink_a.committed == ["a0", "a1"]


# ==================================================================================================
# 5. stop --drain fires event-time timers and commits everything; stop without drain resumes.

TIMERS_JOB = """
from connectors import GeneratorSource, TwoPhaseCommitFileSink
from runtime import KeyedProcessFunction

KEYS = 7
FAR_FUTURE = 10**13


def record(i):
    return {"key": f"k{i % KEYS}", "i": i, "ts": 1_000 * i}


class MarkAtEnd(KeyedProcessFunction):
    def process_element(self, value, ctx, out):
        ctx.timer_service().register_event_time_timer(FAR_FUTURE)
        out.collect({"key": value["key"], "i": value["i"]})

    def on_timer(self, timestamp, ctx, out):
        out.collect({"marker": ctx.current_key, "at": timestamp})


def build(job):
    count = job.params.get("count")
    source = GeneratorSource(
        record, rate=job.params.get_float("rate", 400.0), count=int(count) if count else None
    )
    (
        job.from_source(source, name="generator").uid("generator")
        .assign_timestamps_and_watermarks(lambda r: r["ts"], name="timestamps").uid("timestamps")
        .key_by(lambda r: r["key"])
        .process(MarkAtEnd(), name="mark").uid("mark")
        .sink_to(TwoPhaseCommitFileSink(job.params.require("output")), name="out").uid("out")
    )
"""
TIMER_KEYS = 7
FAR_FUTURE = 10**13


def records_flowing(address: str, at_least: int) -> bool:
    operators = {o["uid"]: o for o in http_get(address, "/status")["operators"]}
    states = set(task_states(address).values())
    return states == {"running"} and operators["out"]["records_in"] >= at_least


def test_stop_with_drain_fires_event_time_timers_and_commits_everything(tmp_path: Path) -> None:
    job_file = tmp_path / "timers_job.py"
    job_file.write_text(TIMERS_JOB)
    output, chk, savepoints = tmp_path / "out", tmp_path / "chk", tmp_path / "sp"
    job = Background(
        tmp_path,
        "job",
        str(job_file),
        "--set",
        f"output={output}",
        "--checkpoint-dir",
        str(chk),
        "--savepoint-dir",
        str(savepoints),
    )
    try:
        address = rest_address(chk, job)
        poll_until(lambda: records_flowing(address, 50), "records to reach the sink", job=job)
        stop = cli("stop", "--address", address, "--dir", str(savepoints), "--drain", timeout=30)
        assert stop.returncode == 0, stop.stderr
        code = job.wait(30)
    finally:
        job.kill()
    assert code == 0, job.stderr
    assert "stopped with savepoint" in job.stderr
    records = read_committed(output)
    markers = [r for r in records if "marker" in r]
    data = [r for r in records if "marker" not in r]
    assert sorted(m["marker"] for m in markers) == [f"k{i}" for i in range(TIMER_KEYS)]
    assert all(m["at"] == FAR_FUTURE for m in markers)
    indexes = sorted(r["i"] for r in data)
    assert indexes == list(range(len(indexes))), "every record up to the stop, exactly once"
    assert len(indexes) >= 50
    assert not [p.name for p in output.iterdir() if p.name.startswith(".")]
    savepoint = load_checkpoint(next(savepoints.iterdir()))
    assert savepoint.kind is CheckpointKind.SAVEPOINT
    assert all(e.fully_finished for e in savepoint.operators.values())


def test_stop_without_drain_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    job_file = tmp_path / "timers_job.py"
    job_file.write_text(TIMERS_JOB)
    n, rate = "1200", "600"

    straight_out = tmp_path / "straight"
    straight = cli(
        "run",
        str(job_file),
        "--set",
        f"output={straight_out}",
        "--set",
        f"count={n}",
        "--set",
        "rate=0",
        "--no-progress",
        timeout=30,
    )
    assert straight.returncode == 0, straight.stderr
    expected = read_committed(straight_out)
    assert len(expected) == int(n) + TIMER_KEYS

    output, chk, savepoints = tmp_path / "out", tmp_path / "chk", tmp_path / "sp"
    params = ["--set", f"output={output}", "--set", f"count={n}"]
    job = Background(
        tmp_path,
        "first",
        str(job_file),
        *params,
        "--set",
        f"rate={rate}",
        "--checkpoint-dir",
        str(chk),
        "--savepoint-dir",
        str(savepoints),
    )
    try:
        address = rest_address(chk, job)
        poll_until(lambda: records_flowing(address, 50), "records to reach the sink", job=job)
        stop = cli("stop", "--address", address, "--dir", str(savepoints), timeout=30)
        assert stop.returncode == 0, stop.stderr
        code = job.wait(30)
    finally:
        job.kill()
    assert code == 0, job.stderr
    committed_at_stop = read_committed(output)
    assert [r for r in committed_at_stop if "marker" in r] == [], "no drain: timers must not fire"
    assert 0 < len(committed_at_stop) < int(n), "the stop should come before the end of the input"
    [savepoint_dir] = list(savepoints.iterdir())
    savepoint = load_checkpoint(savepoint_dir)
    assert not any(e.fully_finished for e in savepoint.operators.values())

    resumed = cli(
        "run",
        str(job_file),
        *params,
        "--set",
        "rate=0",
        "--restore",
        str(savepoint_dir),
        "--no-progress",
        timeout=30,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert canonical(read_committed(output)) == canonical(expected)


# ==================================================================================================
# 6. finish() only on a graceful end; close() always.

LIFECYCLE: list[tuple[str, int, str]] = []
_seen: dict[str, Any] = {}


class Recording(MapFunction[Any, Any]):
    def __init__(self, label: str, fail_on: Any = None) -> None:
        self.label = label
        self.fail_on = fail_on
        self.subtask = -1

    def open(self, ctx: RuntimeContext) -> None:
        self.subtask = ctx.subtask_index
        LIFECYCLE.append((self.label, self.subtask, "open"))

    def map(self, value: Any) -> Any:
        event = _seen.get("event")
        if event is not None:
            event.set()
        if self.fail_on is not None and value == self.fail_on and not _seen.get("failed"):
            _seen["failed"] = True
            msg = f"bad record {value}"
            raise ValueError(msg)
        return value

    def finish(self) -> None:
        LIFECYCLE.append((self.label, self.subtask, "finish"))

    def close(self) -> None:
        LIFECYCLE.append((self.label, self.subtask, "close"))


def lifecycle_by_instance() -> dict[tuple[str, int], list[str]]:
    result: dict[tuple[str, int], list[str]] = {}
    for label, subtask, call in LIFECYCLE:
        result.setdefault((label, subtask), []).append(call)
    return result


@pytest.fixture
def lifecycle() -> Any:
    LIFECYCLE.clear()
    _seen.clear()
    yield LIFECYCLE
    LIFECYCLE.clear()
    _seen.clear()


def lifecycle_job(source: Source[Any], fail_on: Any = None) -> Callable[[Job], None]:
    def build(job: Job) -> None:
        first = job.from_source(source, name="source").uid("source")
        mapped = first.map(Recording("first", fail_on), name="first").uid("first")
        second = mapped.rebalance().map(Recording("second"), name="second").uid("second")
        second.sink_to(CollectSink(), name="sink").uid("sink")

    return build


@pytest.mark.asyncio
async def test_finish_not_called_on_cancel_close_always(lifecycle: Any) -> None:
    _seen["event"] = asyncio.Event()
    source = GeneratorSource(lambda i: i, rate=200.0)
    master = probed_master(lifecycle_job(source), ExecutionConfig(), parallelism=2)
    job = asyncio.create_task(master.run())
    try:
        await asyncio.wait_for(_seen["event"].wait(), 5)
        await master.signal.wait_for(
            lambda: all(t.state is TaskState.RUNNING for t in master.tasks), "every task to run"
        )
    finally:
        job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    calls = lifecycle_by_instance()
    assert sorted(calls) == [("first", 0), ("first", 1), ("second", 0), ("second", 1)]
    assert all(c == ["open", "close"] for c in calls.values()), calls
    assert all(t.state is TaskState.CANCELED for t in master.tasks)


@pytest.mark.asyncio
async def test_finish_not_called_on_failure_close_always(lifecycle: Any) -> None:
    # Unbounded input, so that no subtask ends its input (and finishes) before the failure.
    source = GeneratorSource(lambda i: i, rate=1000.0)
    master = probed_master(lifecycle_job(source, fail_on=25), ExecutionConfig(), parallelism=2)
    with pytest.raises(JobFailedError, match="bad record 25"):
        await asyncio.wait_for(master.run(), 5)
    calls = lifecycle_by_instance()
    assert sorted(calls) == [("first", 0), ("first", 1), ("second", 0), ("second", 1)]
    for instance, seen in calls.items():
        assert "finish" not in seen, (instance, seen)
        assert seen == ["open", "close"], (instance, seen)


@pytest.mark.asyncio
async def test_failure_then_graceful_end_after_restart(lifecycle: Any, tmp_path: Path) -> None:
    """The failed attempt only closes; the attempt that ends gracefully finishes, then closes."""
    config = ExecutionConfig(
        checkpoint=CheckpointConfig(interval_s=0.01),
        restart_strategy=FixedDelayRestart(attempts=1, delay_s=0.0),
    )
    sink = TwoPhaseCommitFileSink(tmp_path / "out")

    def build(job: Job) -> None:
        source = job.from_source(CollectionSource(range(2000), rate=20000.0), name="source")
        mapped = source.uid("source").map(Recording("first", 1500), name="first").uid("first")
        mapped.sink_to(sink, name="sink").uid("sink")

    master = probed_master(build, config)
    result = await asyncio.wait_for(master.run(), 10)
    assert result.attempts == 2
    assert LIFECYCLE == [
        ("first", 0, "open"),
        ("first", 0, "close"),
        ("first", 0, "open"),
        ("first", 0, "finish"),
        ("first", 0, "close"),
    ]
    assert sorted(read_committed(tmp_path / "out")) == list(range(2000))


@pytest.mark.asyncio
@pytest.mark.parametrize("drain", [False, True])
async def test_finish_only_with_drain_on_stop_with_savepoint(
    lifecycle: Any, tmp_path: Path, drain: bool
) -> None:
    _seen["event"] = asyncio.Event()
    master = probed_master(
        lifecycle_job(GeneratorSource(lambda i: i, rate=500.0)), ExecutionConfig(), parallelism=2
    )
    job = asyncio.create_task(master.run())
    try:
        await asyncio.wait_for(_seen["event"].wait(), 5)
        await master.signal.wait_for(
            lambda: all(t.state is TaskState.RUNNING for t in master.tasks), "every task to run"
        )
        savepoint = await asyncio.wait_for(
            master.coordinator.request_trigger(
                CheckpointKind.SAVEPOINT, str(tmp_path / "sp"), StopRequest(drain=drain)
            ),
            5,
        )
        result = await finish_job(job)
    finally:
        await cancel_job(job)
    assert result.stopped_with_savepoint == savepoint.path
    expected = ["open", "finish", "close"] if drain else ["open", "close"]
    calls = lifecycle_by_instance()
    assert len(calls) == 4
    assert all(c == expected for c in calls.values()), calls


STOPPABLE_JOB = """
from pathlib import Path

from connectors import GeneratorSource
from runtime import MapFunction


class Recording(MapFunction):
    def __init__(self, log):
        self.log = log

    def open(self, ctx):
        self.subtask = ctx.subtask_index
        self._write("open")

    def map(self, value):
        return value

    def finish(self):
        self._write("finish")

    def close(self):
        self._write("close")

    def _write(self, what):
        with open(self.log, "a") as f:
            f.write(f"{self.subtask} {what}\\n")


def build(job):
    log = job.params.require("log")
    (
        job.from_source(GeneratorSource(lambda i: i, rate=200.0), name="generator").uid("gen")
        .map(Recording(log), name="recording").uid("recording")
        .print()
    )
"""


def test_cancel_through_the_control_endpoint_closes_without_finish(tmp_path: Path) -> None:
    job_file = tmp_path / "stoppable.py"
    job_file.write_text(STOPPABLE_JOB)
    log, chk = tmp_path / "lifecycle.log", tmp_path / "chk"
    job = Background(
        tmp_path,
        "job",
        str(job_file),
        "-p",
        "2",
        "--set",
        f"log={log}",
        "--checkpoint-dir",
        str(chk),
    )
    try:
        address = rest_address(chk, job)

        def flowing() -> bool:
            operators = {o["uid"]: o for o in http_get(address, "/status")["operators"]}
            return operators["recording"]["records_in"] > 0

        poll_until(flowing, "records to flow", job=job)
        cancel = cli("cancel", "--address", address, timeout=30)
        assert cancel.returncode == 0, cancel.stderr
        code = job.wait(30)
    finally:
        job.kill()
    assert code == 130, job.stderr
    lines = sorted(log.read_text().splitlines())
    assert lines == ["0 close", "0 open", "1 close", "1 open"]


# ==================================================================================================
# 7. Operators cannot be added in front of a fully finished operator.

BOUNDED_JOB = """
from connectors import CollectionSource, TwoPhaseCommitFileSink


def build(job):
    numbers = job.from_source(CollectionSource(range(100)), name="numbers").uid("numbers")
    {insert}
    doubled = numbers.map(lambda x: x * 2, name="double").uid("double")
    doubled.sink_to(TwoPhaseCommitFileSink(job.params.require("output")), name="out").uid("out")
"""
INSERTED = 'numbers = numbers.map(lambda x: x + 1, name="inserted").uid("inserted")'


def test_adding_an_operator_in_front_of_a_finished_one_is_rejected_on_restore(
    tmp_path: Path,
) -> None:
    original, modified = tmp_path / "original.py", tmp_path / "modified.py"
    original.write_text(BOUNDED_JOB.format(insert=""))
    modified.write_text(BOUNDED_JOB.format(insert=INSERTED))
    output, chk = tmp_path / "out", tmp_path / "chk"
    first = cli(
        "run",
        str(original),
        "--set",
        f"output={output}",
        "--checkpoint-dir",
        str(chk),
        "--no-progress",
    )
    assert first.returncode == 0, first.stderr
    assert sorted(read_committed(output)) == [2 * i for i in range(100)]
    final = load_latest_valid(chk)
    assert final is not None and final.path is not None
    assert all(e.fully_finished for e in final.operators.values())
    files_before = visible_files(output)

    for restore in (final.path, "latest"):
        rejected = cli(
            "run",
            str(modified),
            "--set",
            f"output={output}",
            "--checkpoint-dir",
            str(chk),
            "--restore",
            restore,
            "--no-progress",
        )
        assert rejected.returncode == 2, rejected.stderr
        message = rejected.stderr
        assert "operators cannot be added in front of a finished operator" in message
        assert "operator 'double' (uid double) had finished in the checkpoint" in message
        assert "'inserted' (uid inserted)" in message
        assert "Traceback" not in message
    assert visible_files(output) == files_before, "a rejected restore must not run anything"

    dry_run = cli("checkpoints", str(chk), "--against", str(modified), "--set", f"output={output}")
    assert dry_run.returncode == 0, dry_run.stderr
    assert "operators cannot be added in front of a finished operator" in dry_run.stdout

    # The unchanged job restores the finished checkpoint without running anything again.
    again = cli(
        "run",
        str(original),
        "--set",
        f"output={output}",
        "--checkpoint-dir",
        str(chk),
        "--restore",
        final.path,
        "--no-progress",
    )
    assert again.returncode == 0, again.stderr
    assert sorted(read_committed(output)) == [2 * i for i in range(100)]


def test_restore_report_names_the_operator_in_process(tmp_path: Path) -> None:
    out = tmp_path / "out"
    chk_dir = tmp_path / "chk"

    def original(job: Job) -> None:
        numbers = job.from_source(CollectionSource(range(10)), name="numbers").uid("numbers")
        numbers.map(lambda x: x, name="double").uid("double").sink_to(
            TwoPhaseCommitFileSink(out), name="out"
        ).uid("out")

    def modified(job: Job) -> None:
        numbers = job.from_source(CollectionSource(range(10)), name="numbers").uid("numbers")
        numbers = numbers.map(lambda x: x, name="inserted").uid("inserted")
        numbers.map(lambda x: x, name="double").uid("double").sink_to(
            TwoPhaseCommitFileSink(out), name="out"
        ).uid("out")

    run_to_end(original, chk_dir)
    final = load_latest_valid(chk_dir)
    assert final is not None
    report = RestoreReport(build_graph(modified), final)
    with pytest.raises(RestoreMismatchError) as caught:
        report.check(allow_non_restored_state=False)
    message = str(caught.value)
    assert "'double' (uid double)" in message
    assert "'inserted' (uid inserted)" in message
    assert "operators cannot be added in front of a finished operator" in message
    # Adding an operator behind the finished ones is allowed by the rule.
    assert RestoreReport(build_graph(original), final).errors == []


@pytest.mark.parametrize("sink_kind", ["two-phase file sink", "TestingSink"])
def test_crash_before_the_final_commit_commits_on_restore_of_the_finished_checkpoint(
    tmp_path: Path, sink_kind: str
) -> None:
    """The job ended its data and completed its final checkpoint, then crashed before the sink
    committed. The restart restores that fully finished checkpoint: nothing runs again, and the
    sink commits what the checkpoint says was pending (runtime.testing promises the same of
    TestingSink: "assert committed equals the expected output")."""
    out = tmp_path / "out"
    testing_sink = CollectSink()  # the same class as runtime.testing.TestingSink
    sink: Sink = TwoPhaseCommitFileSink(out) if sink_kind == "two-phase file sink" else testing_sink

    def build(job: Job) -> None:
        numbers = job.from_source(CollectionSource(range(100)), name="numbers").uid("numbers")
        numbers.map(lambda x: x * 3, name="triple").uid("triple").sink_to(sink, name="out").uid(
            "out"
        )

    config = ExecutionConfig(restart_strategy=FixedDelayRestart(attempts=1, delay_s=0.0))
    arm("before-commit", 1, "raise")
    try:
        result = run_job(build, config=config)
    finally:
        disarm_all()
    assert result.attempts == 2, "the crash before the commit should have restarted the job"
    committed = (
        read_committed(out) if sink_kind == "two-phase file sink" else testing_sink.committed
    )
    assert sorted(committed) == [3 * i for i in range(100)]


class EndMarkers(KeyedCoProcessFunction[Any, Any, Any]):
    """Emits every record, and a marker when each input ends (the API's end_input hook)."""

    def open(self, ctx: RuntimeContext) -> None:
        LIFECYCLE.append(("join", ctx.subtask_index, "open"))

    def process_element1(self, value: Any, ctx: Any, out: Collector[Any]) -> None:
        out.collect({"left": value})

    def process_element2(self, value: Any, ctx: Any, out: Collector[Any]) -> None:
        out.collect({"right": value})

    def end_input(self, input_number: int, out: Collector[Any]) -> None:
        out.collect({"end": input_number})

    def finish(self) -> None:
        LIFECYCLE.append(("join", 0, "finish"))


def run_to_end(build: Callable[[Job], Any], chk: Path, restored: Any = None) -> JobResult:
    graph = build_graph(build)
    master = JobMaster(
        graph, ExecutionConfig(), storage=CheckpointStorage(chk, graph.name), restored=restored
    )
    result: JobResult = run_coroutine(master.run())
    return result


def test_operator_added_behind_finished_operators_does_not_run_them_again(
    tmp_path: Path, lifecycle: Any
) -> None:
    """Adding an operator *behind* fully finished ones is allowed (only in front is not), but the
    finished operators must not run again: here the new sink is chained behind the finished join,
    and running the join again would call end_input() again and commit its markers twice."""
    out, chk = tmp_path / "out", tmp_path / "chk"
    audit = CollectSink()

    def build(job: Job, add_audit: bool = False) -> None:
        left = job.from_source(CollectionSource(range(3)), name="left").uid("left")
        right = job.from_source(CollectionSource(range(3)), name="right").uid("right")
        joined = (
            left.connect(right)
            .key_by(lambda v: v, lambda v: v)
            .process(EndMarkers(), name="join")
            .uid("join")
        )
        joined.sink_to(TwoPhaseCommitFileSink(out), name="out").uid("out")
        if add_audit:
            joined.sink_to(audit, name="audit").uid("audit")

    run_to_end(build, chk)
    before = read_committed(out)
    assert sorted(r.get("end", 0) for r in before) == [0] * 6 + [1, 2]
    final = load_latest_valid(chk)
    assert final is not None
    assert all(e.fully_finished for e in final.operators.values())
    LIFECYCLE.clear()

    def modified(job: Job) -> None:
        build(job, add_audit=True)

    report = RestoreReport(build_graph(modified), final)
    if report.errors:
        # Rejecting the modification outright (a vertex mixing finished and new operators) is a
        # correct answer too; it must name the operator.
        assert "join" in "; ".join(report.errors)
        return
    assert "join" in report.finished, "the report says the join is not run again"
    run_to_end(modified, chk, restored=final)
    assert [c for c in LIFECYCLE if c[2] in ("open", "finish")] == [], (
        "a fully finished operator was run again on restore"
    )
    after = read_committed(out)
    assert canonical(after) == canonical(before), "output of finished operators committed twice"
    assert audit.committed == []


class HoldsResource(MapFunction[Any, Any]):
    """Releases in close() what open() acquired: the usual shape of a rich function."""

    def open(self, ctx: RuntimeContext) -> None:
        self.resource: list[str] = ["acquired"]

    def map(self, value: Any) -> Any:
        return value

    def close(self) -> None:
        self.resource.clear()


def test_restoring_a_fully_finished_checkpoint_does_not_close_unopened_functions(
    tmp_path: Path,
) -> None:
    """Restoring the final checkpoint of a finished job runs nothing again; in particular a rich
    function that was never opened in this run must not be closed (close() would fail)."""
    out, chk = tmp_path / "out", tmp_path / "chk"

    def build(job: Job) -> None:
        numbers = job.from_source(CollectionSource(range(10)), name="numbers").uid("numbers")
        numbers.map(HoldsResource(), name="resource").uid("resource").sink_to(
            TwoPhaseCommitFileSink(out), name="out"
        ).uid("out")

    run_to_end(build, chk)
    final = load_latest_valid(chk)
    assert final is not None
    assert all(e.fully_finished for e in final.operators.values())
    run_to_end(build, chk, restored=final)
    assert sorted(read_committed(out)) == list(range(10))
