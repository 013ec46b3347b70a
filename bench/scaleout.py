"""Scale-out: the same jobs on one process and on TaskManager processes, measured in one run.

    python bench/scaleout.py [--records 1000000] [--events 300000] [--repeat 3] [--skip-kafka]

Two pipelines, each run with ``python -m runtime run ... --parallelism 2`` once with
``--taskmanagers 1`` (every subtask on the job process's event loop) and once with
``--taskmanagers 2`` (two TaskManager processes, records crossing them over TCP):

- **in-memory**: ``bench/jobs/scaleout_pipeline.py``: generate ``--records`` JSON events in the
  sources, parse, keep purchases, key by user, running total in keyed state, serialise, count.
- **Kafka ETL**: ``examples/kafka_etl.py`` reading ``--events`` events of a 4-partition topic on the
  local broker (bounded), at-least-once into an output topic; checkpoints every second.

For each run it prints the processing time: from the sinks' first write to their last (in memory:
the ``SPAN`` lines its sink subtasks print; Kafka ETL: the timestamps of the first and last output
record), so that starting processes and loading the job are not in it; input records per second of
that time; the job's duration from its summary line; the whole command's wall time; the CPU seconds
of the process tree (the job process and its TaskManagers, from ``RUSAGE_CHILDREN``; the broker is
not counted) and the peak resident memory of the process tree (sampled every 20 ms from /proc).
Each way runs ``--repeat`` times, alternating; the speed-up is the best processing time at 1
TaskManager over the best at 2 (this machine's speed varies by a third from one second to the next;
other load only ever adds time), with the ratio of each pair of runs to show the noise, against the
targets of a 2-core machine and against the machine's own ceiling (two CPU-bound Python processes
at once against one; 2.0 on two free cores): 1.7x in memory, 1.5x for Kafka ETL (the broker shares the cores). Each
run's records in/out are checked against the expected counts.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kafka_etl import (  # noqa: E402
    INPUT_TOPIC,
    PARTITIONS,
    create_topics,
    expected_totals,
    load,
    make_events,
    read_output,
)

from connectors.kafka.broker import LocalKafkaBroker  # noqa: E402
from runtime.shell.runner import run_coroutine  # noqa: E402

TARGETS = {"in-memory": 1.7, "Kafka ETL": 1.5}
_FINISHED = re.compile(r"job '.*' finished in ([0-9.]+)s")
_SPAN = re.compile(r"^SPAN (\d+) (\d+) (\d+)$", re.M)
_OPERATOR = re.compile(r"^\s+(.+): ([0-9,]+) in, ([0-9,]+) out \(parallelism \d+\)$", re.M)


@dataclass
class Run:
    pipeline: str
    taskmanagers: int
    processing_s: float
    duration_s: float
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    operators: dict[str, tuple[int, int]]


def _children(pid: int) -> list[int]:
    result = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            result.append(int(entry))
    return result


def _tree_rss(root: int) -> int:
    total, todo = 0, [root]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as statm:
                total += int(statm.read().split()[1]) * page
        except OSError:
            continue
        todo.extend(_children(pid))
    return total


def run_job_command(pipeline: str, taskmanagers: int, args: list[str]) -> Run:
    command = [sys.executable, "-m", "runtime", "run", *args, "--parallelism", "2"]
    command += ["--taskmanagers", str(taskmanagers), "--rest-port", "-1"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.02):
            peak = max(peak, _tree_rss(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        print(output[-3000:])
        msg = f"{pipeline} at {taskmanagers} TaskManager(s) exited {process.returncode}"
        raise SystemExit(msg)
    finished = _FINISHED.search(output)
    if finished is None:
        print(output[-3000:])
        raise SystemExit(f"{pipeline}: no summary line in the job's output")
    operators = {
        name.strip(): (int(records_in.replace(",", "")), int(records_out.replace(",", "")))
        for name, records_in, records_out in _OPERATOR.findall(output)
    }
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    spans = [(int(first), int(last)) for first, last, _ in _SPAN.findall(output)]
    processing = (max(s[1] for s in spans) - min(s[0] for s in spans)) / 1e9 if spans else 0.0
    duration = float(finished.group(1))
    return Run(pipeline, taskmanagers, processing, duration, wall, cpu, peak, operators)


_SPIN = "x = 0\nfor i in range(15_000_000):\n    x += i\n"


def machine_ceiling(repeat: int) -> float:
    """The speed-up this machine gives two CPU-bound Python processes at all: a plain loop run
    alone, then as two processes at once (best of ``repeat`` alternating rounds). Two virtual
    CPUs that share a physical core, or a busy host, show here as a ceiling below 2."""
    alone, together = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", _SPIN], check=True)
        alone.append(time.perf_counter() - started)
        started = time.perf_counter()
        pair = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(2)]
        for process in pair:
            process.wait()
        together.append(time.perf_counter() - started)
    return 2 * min(alone) / min(together)


def expected_in_memory(records: int, users: int) -> int:
    sys.path.insert(0, str(ROOT / "bench" / "jobs"))
    from scaleout_pipeline import make_event

    event = make_event(users)
    return sum(1 for i in range(records) if b'"kind":"purchase"' in event(i))


def report(runs: list[Run], inputs: dict[str, int], ceiling: float) -> bool:
    header = f"{'processing s':>14}{'records/s':>12}{'job s':>8}{'wall s':>8}{'CPU s':>8}"
    print(f"\n{'':<22}{header}{'peak MB':>9}")
    for run in runs:
        rate = inputs[run.pipeline] / run.processing_s
        label = f"{run.pipeline}, {run.taskmanagers} TM"
        print(
            f"{label:<22}{run.processing_s:>14.2f}{rate:>12,.0f}{run.duration_s:>8.2f}"
            f"{run.wall_s:>8.2f}{run.cpu_s:>8.2f}{run.peak_rss_bytes / 1e6:>9.0f}"
        )
    met = True
    print()
    for pipeline, target in TARGETS.items():
        one = [r.processing_s for r in runs if r.pipeline == pipeline and r.taskmanagers == 1]
        two = [r.processing_s for r in runs if r.pipeline == pipeline and r.taskmanagers == 2]
        if not one or not two:
            continue
        # Best against best: other load on the machine only ever adds time.
        speedup = min(one) / min(two)
        pairs = ", ".join(f"{a / b:.2f}" for a, b in zip(one, two, strict=True))
        verdict = "meets" if speedup >= target else "BELOW"
        met &= speedup >= target
        print(
            f"{pipeline}: speed-up {speedup:.2f}x with 2 TaskManagers (best/best; per pair "
            f"{pairs}): {verdict} {target}x; {speedup / ceiling:.0%} of the machine's ceiling"
        )
    print(
        f"machine ceiling: two CPU-bound Python processes at once run {ceiling:.2f}x as fast as "
        "one (2.00 on two free cores)"
    )
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each")
    parser.add_argument("--skip-kafka", action="store_true")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; in-memory: {args.records:,} records, {args.users:,} users")
    runs: list[Run] = []
    inputs = {"in-memory": args.records, "Kafka ETL": args.events}
    purchases = expected_in_memory(args.records, args.users)
    job = ["bench/jobs/scaleout_pipeline.py", "--set", f"records={args.records}"]
    job += ["--set", f"users={args.users}"]
    for taskmanagers in (1, 2) * args.repeat:
        run = run_job_command("in-memory", taskmanagers, job)
        counted = run.operators.get("count", (0, 0))[0]
        if counted != purchases:
            raise SystemExit(
                f"in-memory at {taskmanagers} TM: counted {counted}, expected {purchases}"
            )
        runs.append(run)
    if not args.skip_kafka:
        events = make_events(args.events, args.users)
        kafka_purchases, _ = expected_totals(events)
        with LocalKafkaBroker() as broker:
            bootstrap = broker.bootstrap_servers
            run_coroutine(create_topics(bootstrap, [INPUT_TOPIC], PARTITIONS))
            ends = run_coroutine(load(bootstrap, events))
            assert sum(ends.values()) == args.events, ends
            del events
            for attempt, taskmanagers in enumerate((1, 2) * args.repeat):
                output = f"scaleout-out-{attempt}"
                run_coroutine(create_topics(bootstrap, [output], PARTITIONS))
                kafka_job = ["examples/kafka_etl.py", "--set", f"bootstrap={bootstrap}"]
                kafka_job += ["--set", f"input_topic={INPUT_TOPIC}", "--set", "bounded=true"]
                kafka_job += ["--set", f"output_topic={output}", "--checkpoint-interval", "1s"]
                run = run_job_command("Kafka ETL", taskmanagers, kafka_job)
                received = run.operators.get("Sink: Kafka totals", (0, 0))[0]
                if received != kafka_purchases:
                    msg = (
                        f"Kafka ETL at {taskmanagers} TM: the sink received {received}, expected "
                        f"{kafka_purchases}"
                    )
                    raise SystemExit(msg)
                # A Tansu 0.6 fetch can stall a consumer before the end: read again before calling
                # records missing.
                written = run_coroutine(read_output(bootstrap, output, "read_uncommitted"))
                for _ in range(2):
                    if written.count == kafka_purchases:
                        break
                    written = run_coroutine(read_output(bootstrap, output, "read_uncommitted"))
                if written.count != kafka_purchases:
                    msg = (
                        f"Kafka ETL at {taskmanagers} TM: the output topic holds {written.count} "
                        f"records after three reads, the sink received {kafka_purchases}"
                    )
                    raise SystemExit(msg)
                run.processing_s = (written.last_timestamp_ms - written.first_timestamp_ms) / 1e3
                runs.append(run)
    ceiling = machine_ceiling(args.repeat)
    if not report(runs, inputs, ceiling):
        sys.exit(1)


if __name__ == "__main__":
    main()
