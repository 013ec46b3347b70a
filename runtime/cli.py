"""``python -m runtime``: run jobs and talk to running ones.

Exit codes: 0 success; 1 the job failed; 2 bad usage or a bad job file; 130 cancelled by Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import traceback
from typing import Any

from actors.barriers import CheckpointingMode
from actors.operator import UserFunctionError
from runtime.api import JobDefinitionError
from runtime.coordinator import CheckpointConfig
from runtime.durations import parse_duration
from runtime.executor import ExecutionConfig, JobFailedError, JobMaster
from runtime.progress import ProgressReporter
from runtime.restart import parse_restart_strategy
from runtime.runner import JobFileError, build_graph, load_job_file, run_coroutine

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        msg = f"expected key=value, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return key.strip(), value


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"must be at least 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime", description="A stream-processing runtime for Python on asyncio."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job file (a Python file defining build(job))")
    run.add_argument("file", help="the job file")
    run.add_argument("-p", "--parallelism", type=_positive_int, default=1)
    run.add_argument(
        "--set",
        dest="params",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a job parameter, readable as job.params[KEY] (repeatable)",
    )
    run.add_argument("--checkpoint-interval", type=_duration, default=None, metavar="DURATION")
    run.add_argument(
        "--mode",
        choices=[m.value for m in CheckpointingMode],
        default="exactly-once",
        help="checkpointing mode (default exactly-once)",
    )
    run.add_argument("--checkpoint-timeout", type=_duration, default=600.0, metavar="DURATION")
    run.add_argument("--min-pause", type=_duration, default=0.0, metavar="DURATION")
    run.add_argument("--max-concurrent-checkpoints", type=_positive_int, default=1)
    run.add_argument("--tolerable-checkpoint-failures", type=int, default=0)
    run.add_argument(
        "--restart-strategy",
        default="none",
        help="none | fixed-delay[:ATTEMPTS[:DELAY]] | failure-rate[:MAX:INTERVAL[:DELAY]] | "
        "exponential-delay[:INITIAL[:MAX]] (default none)",
    )
    run.add_argument("--buffer-timeout", type=_duration, default=0.005, metavar="DURATION")
    run.add_argument("--no-progress", action="store_true", help="do not show progress")
    run.add_argument("--log-level", default="WARNING")

    broker = sub.add_parser("broker", help="start the local Kafka-protocol broker for the dev loop")
    broker.add_argument("--port", type=int, default=9092)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "broker":
        from runtime.devbroker import run_broker_forever

        return run_broker_forever(args.port)
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def _error(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def _run(args: Any) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        build = load_job_file(args.file)
    except JobFileError as exc:
        _error(str(exc))
        return EXIT_USAGE
    params = dict(args.params)
    try:
        restart = parse_restart_strategy(args.restart_strategy)
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    try:
        graph = build_graph(build, params, args.parallelism, name=_job_name(args.file))
    except JobDefinitionError as exc:
        _error(f"invalid job {args.file}: {exc}")
        return EXIT_USAGE
    except Exception:
        sys.stderr.write(traceback.format_exc())
        _error(f"build(job) in {args.file} raised; see the traceback above")
        return EXIT_FAILED
    config = ExecutionConfig(
        checkpoint=CheckpointConfig(
            interval_s=args.checkpoint_interval,
            mode=CheckpointingMode(args.mode),
            timeout_s=args.checkpoint_timeout,
            min_pause_s=args.min_pause,
            max_concurrent=args.max_concurrent_checkpoints,
            tolerable_failures=args.tolerable_checkpoint_failures,
        ),
        restart_strategy=restart,
        buffer_timeout_s=args.buffer_timeout,
    )
    master = JobMaster(graph, config)
    reporter = None if args.no_progress else ProgressReporter(master)
    try:
        result = run_coroutine(_supervise(master, reporter))
    except KeyboardInterrupt:
        _error("cancelled (Ctrl-C): every task was closed")
        return EXIT_INTERRUPTED
    except JobFailedError as exc:
        _report_failure(exc)
        return EXIT_FAILED
    if reporter is not None:
        reporter.summary(result)
    return EXIT_OK


async def _supervise(master: JobMaster, reporter: ProgressReporter | None) -> Any:
    if reporter is None:
        return await master.run()
    progress = asyncio.create_task(reporter.run())
    try:
        return await master.run()
    finally:
        progress.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await progress


def _report_failure(exc: JobFailedError) -> None:
    cause = exc.cause
    user_exc = cause.cause if isinstance(cause, UserFunctionError) else cause.__cause__ or cause
    sys.stderr.write("".join(traceback.format_exception(user_exc)))
    _error(f"job failed: {exc}")


def _job_name(path: str) -> str:
    from pathlib import Path

    return Path(path).stem
