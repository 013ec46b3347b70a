"""``python -m runtime``: run jobs and talk to running ones.

Exit codes: 0 success (also a stop with savepoint, on request or on SIGTERM); 1 the job failed;
2 bad usage or a bad job file; 130 cancelled by Ctrl-C or through the control endpoint; 143 ended
by SIGTERM without a savepoint (see ``runtime.shell.shutdown``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors.barriers import CheckpointingMode
from actors.infrastructure import InfrastructureError, infrastructure_cause
from actors.operator import NewerOutputPolicy, UserFunctionError
from actors.protocol import RemoteFailureCause
from runtime.api.durations import format_duration, parse_duration
from runtime.api.streams import JobDefinitionError
from runtime.cluster.deployment import taskmanager_deployment
from runtime.cluster.jobmanager import TaskManagerLostError, TaskManagerStartError
from runtime.cluster.placement import PLACEMENTS
from runtime.config import (
    DEFAULT_JOBMANAGER_HOST,
    DEFAULT_MAX_PARALLELISM,
    DEFAULT_PARALLELISM,
    DEFAULT_REST_HOST,
    DEFAULT_REST_PORT,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    CheckpointConfig,
    ExecutionConfig,
)
from runtime.master.alerts import HOOK_NAME, AlertHook, CheckpointFailureThreshold
from runtime.master.deployment import DeploymentError
from runtime.master.jobmaster import JobFailedError, JobMaster
from runtime.master.restart import RestartStrategy, default_restart_strategy, parse_restart_strategy
from runtime.plan.graph import JobGraph
from runtime.plan.restore import RestoreMismatchError, RestoreReport
from runtime.shell import registry
from runtime.shell.info import describe_job_graph
from runtime.shell.joblist import print_jobs
from runtime.shell.logfold import KAFKA_CLIENT_LOGGERS, fold_repeats
from runtime.shell.progress import ProgressReporter
from runtime.shell.queryable import add_state_command, state_command
from runtime.shell.rest import ControlClientError, ControlServer, call
from runtime.shell.runner import JobFileError, build_graph, load_job_file, run_coroutine
from runtime.shell.shutdown import EXIT_TERMINATED, GracefulShutdown
from runtime.testing import arm_from_params
from runtime.version import __version__
from state.keygroups import UPPER_BOUND_MAX_PARALLELISM
from state.refusal import restore_refusal
from state.storage import (
    METADATA,
    CheckpointDirectoryError,
    CheckpointKind,
    CheckpointStorage,
    CompletedCheckpoint,
    InvalidCheckpointError,
    SkippedSnapshot,
    SnapshotSearch,
    check_checkpoint_directory,
    find_latest_valid,
    find_newest_snapshot,
    find_snapshot_folders,
    list_checkpoint_folders,
    load_checkpoint,
    read_abandoned_marker,
    remove_incomplete_checkpoints,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_CHECKPOINT_DEFAULTS = CheckpointConfig()
_EXECUTION_DEFAULTS = ExecutionConfig()
"""The option defaults of ``run`` (and the defaults ``--help`` shows) come from these."""


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


def _failure_threshold(text: str) -> CheckpointFailureThreshold:
    try:
        return CheckpointFailureThreshold.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        msg = f"invalid log level {text!r}: use one of {', '.join(LOG_LEVELS)}"
        raise argparse.ArgumentTypeError(msg)
    return level


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        msg = f"expected HOST:PORT, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return host, int(port)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"must be at least 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _max_parallelism(text: str) -> int:
    value = int(text)
    if not 1 <= value <= UPPER_BOUND_MAX_PARALLELISM:
        msg = f"must be in 1..{UPPER_BOUND_MAX_PARALLELISM}, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _add_option(
    parser: argparse.ArgumentParser,
    *flags: str,
    default: Any,
    help: str,
    type: Callable[[str], Any] = str,
    metavar: str | None = None,
    choices: list[str] | None = None,
) -> None:
    """An option whose help ends with its default, shown as users write it (durations as 5s):
    the help cannot drift from the default the option really has."""
    shown = format_duration(default) if type is _duration else default
    parser.add_argument(
        *flags,
        type=type,
        default=default,
        metavar=metavar,
        choices=choices,
        help=f"{help} (default {shown})",
    )


def _add_max_parallelism_option(parser: argparse.ArgumentParser) -> None:
    _add_option(
        parser,
        "--max-parallelism",
        type=_max_parallelism,
        default=DEFAULT_MAX_PARALLELISM,
        metavar="N",
        help="key groups of keyed state and timers, for operators without set_max_parallelism(); "
        "the upper bound of rescaling, fixed for the life of the state",
    )


def _add_log_level_option(parser: argparse.ArgumentParser) -> None:
    _add_option(
        parser,
        "--log-level",
        type=_log_level,
        default="WARNING",
        metavar="LEVEL",
        help=f"least level of the log lines shown: {', '.join(LOG_LEVELS)}",
    )


def _add_params_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="params",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a job parameter, readable as job.params[KEY] (repeatable; default: none)",
    )


def _add_parallelism_option(parser: argparse.ArgumentParser) -> None:
    _add_option(
        parser,
        "-p",
        "--parallelism",
        type=_positive_int,
        default=DEFAULT_PARALLELISM,
        metavar="N",
        help="subtasks of each operator without set_parallelism()",
    )


def make_parser(prog: str = "python -m runtime") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="A stream-processing runtime for Python on asyncio."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job file (a Python file defining build(job))")
    run.add_argument("file", help="the job file")
    _add_parallelism_option(run)
    _add_max_parallelism_option(run)
    _add_params_option(run)
    run.add_argument(
        "--checkpoint-interval",
        type=_duration,
        default=_CHECKPOINT_DEFAULTS.interval_s,
        metavar="DURATION",
        help="periodic checkpoints this often, a duration such as 500ms, 5s, 1min (default: none, "
        "only final checkpoints and savepoints)",
    )
    _add_option(
        run,
        "--mode",
        choices=[m.value for m in CheckpointingMode],
        default=_CHECKPOINT_DEFAULTS.mode.value,
        help="checkpointing mode",
    )
    _add_option(
        run,
        "--checkpoint-timeout",
        type=_duration,
        default=_CHECKPOINT_DEFAULTS.timeout_s,
        metavar="DURATION",
        help="a checkpoint not completed within this time is aborted",
    )
    _add_option(
        run,
        "--min-pause",
        type=_duration,
        default=_CHECKPOINT_DEFAULTS.min_pause_s,
        metavar="DURATION",
        help="least time from the completion of one checkpoint to the trigger of the next",
    )
    _add_option(
        run,
        "--max-concurrent-checkpoints",
        type=_positive_int,
        default=_CHECKPOINT_DEFAULTS.max_concurrent,
        metavar="N",
        help="checkpoints in progress at once",
    )
    _add_option(
        run,
        "--tolerable-checkpoint-failures",
        type=int,
        default=_CHECKPOINT_DEFAULTS.tolerable_failures,
        metavar="N",
        help="consecutive failed checkpoints tolerated; one more fails the job over",
    )
    run.add_argument(
        "--alert-on-checkpoint-failures",
        type=_failure_threshold,
        default=_CHECKPOINT_DEFAULTS.alert_on_failures,
        metavar="N/WINDOW",
        help="when N checkpoints failed within WINDOW (e.g. 3/10min): log an ERROR, raise the "
        "alert of /status and pyflow_checkpoint_failure_alert, and call the job file's "
        f"{HOOK_NAME}(alert) if it defines one; the next completed checkpoint clears it "
        "(default: no alert)",
    )
    run.add_argument(
        "--restart-strategy",
        default=None,
        metavar="STRATEGY",
        help="none | fixed-delay[:ATTEMPTS[:DELAY]] | failure-rate[:MAX:INTERVAL[:DELAY]] | "
        "exponential-delay[:INITIAL[:MAX]] (default with a --checkpoint-interval: "
        f"{default_restart_strategy(True).describe()}; without: "
        f"{default_restart_strategy(False).describe()})",
    )
    run.add_argument(
        "--checkpoint-dir",
        default=None,
        metavar="DIR",
        help="where checkpoints are written (default: kept in memory only)",
    )
    _add_option(
        run,
        "--retained-checkpoints",
        type=_positive_int,
        default=_CHECKPOINT_DEFAULTS.retained,
        metavar="N",
        help="completed checkpoints kept",
    )
    _add_option(
        run,
        "--on-cancel",
        choices=["retain", "delete"],
        default="retain" if _CHECKPOINT_DEFAULTS.retain_on_cancel else "delete",
        help="keep or delete this run's checkpoints when the job is cancelled",
    )
    run.add_argument(
        "--restore",
        default=None,
        metavar="latest|PATH",
        help="restore from the latest valid checkpoint in --checkpoint-dir (none: start from the "
        "beginning, with a warning), from a checkpoint or savepoint folder, or from the newest "
        "valid one in a folder of them, as stop --dir writes (default: none, start from the "
        "beginning)",
    )
    run.add_argument(
        "--allow-non-restored-state",
        action="store_true",
        help="drop restored state that does not fit the job (operators no longer in it, states "
        "re-declared with another kind, keys of another type) instead of refusing it",
    )
    _add_option(
        run,
        "--on-newer-committed-output",
        choices=[p.value for p in NewerOutputPolicy],
        default=_EXECUTION_DEFAULTS.on_newer_committed_output.value,
        help="when restoring an older checkpoint than the newest completed one, what two-phase "
        "sinks do with output the newer ones committed: move it aside (Kafka cannot and fails), "
        "fail the restore, or keep it (duplicates)",
    )
    run.add_argument(
        "--allow-existing-output",
        action="store_true",
        help="let two-phase sinks that start without restored state write where committed "
        "output of an earlier run already is",
    )
    _add_option(
        run,
        "--rest-port",
        type=int,
        default=DEFAULT_REST_PORT,
        metavar="PORT",
        help="port of the control endpoint; 0: a free one, -1: none",
    )
    _add_option(
        run,
        "--rest-host",
        default=DEFAULT_REST_HOST,
        metavar="HOST",
        help="address the control endpoint listens on",
    )
    _add_option(
        run,
        "--shutdown-timeout",
        type=_duration,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        metavar="DURATION",
        help="on SIGTERM, how long the stop with savepoint or the cancel may take before the "
        "exit is forced; a second SIGTERM forces it at once",
    )
    _add_option(
        run,
        "--buffer-timeout",
        type=_duration,
        default=_EXECUTION_DEFAULTS.buffer_timeout_s,
        metavar="DURATION",
        help="how long a partly filled network buffer may wait before it is sent",
    )
    _add_option(
        run,
        "--auto-watermark-interval",
        type=_duration,
        default=_EXECUTION_DEFAULTS.auto_watermark_interval_s,
        metavar="DURATION",
        help="how often sources and timestamp assigners emit watermarks and notice idle "
        "inputs, besides after records; 0 turns it off",
    )
    _add_option(
        run,
        "--taskmanagers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run the subtasks on N TaskManager processes, this process being the JobManager "
        "(job master, checkpoint coordinator, control endpoint); 1: every subtask in this "
        "process",
    )
    _add_option(
        run,
        "--cluster",
        choices=list(PLACEMENTS),
        default="local",
        help="where the TaskManagers run: local, as child processes of this one; ray, as Ray "
        "actors on the cluster at RAY_ADDRESS, else on a local Ray instance (then even "
        "--taskmanagers 1 is one TaskManager actor, which runs every subtask)",
    )
    _add_option(
        run,
        "--jobmanager-host",
        default=DEFAULT_JOBMANAGER_HOST,
        metavar="HOST",
        help="the address this process listens on for its TaskManagers' control connections; "
        "on a Ray cluster of several machines, one of this machine's that the nodes reach",
    )
    run.add_argument(
        "--savepoint-dir",
        default=None,
        metavar="DIR",
        help="where savepoint and stop (given no --dir) and SIGTERM write savepoints, and what "
        "the control endpoint's relative savepoint targets are inside (default: "
        "<checkpoint-dir>/savepoints)",
    )
    run.add_argument(
        "--allow-savepoint-dir",
        dest="allowed_savepoint_dirs",
        action="append",
        default=[],
        metavar="DIR",
        help="let savepoint and stop --dir write below DIR too (repeatable); other directories "
        "outside the savepoint directory are refused (default: none)",
    )
    run.add_argument(
        "--watch",
        action="store_true",
        help="when the job file or a module it imports from its folder changes, stop the job "
        "with a savepoint and resume the new version from it (a version that does not import, "
        "build or restore is refused and the old one goes on running)",
    )
    run.add_argument("--no-progress", action="store_true", help="do not show progress")
    _add_log_level_option(run)

    savepoint = sub.add_parser("savepoint", help="take a savepoint of a running job")
    _add_control_target(savepoint, savepoint_dir=True)

    stop = sub.add_parser("stop", help="stop a running job with a savepoint")
    _add_control_target(stop, savepoint_dir=True)
    stop.add_argument(
        "--drain",
        action="store_true",
        help="end the input for good: fire timers, finish() everywhere, commit all",
    )

    cancel = sub.add_parser("cancel", help="cancel a running job")
    _add_control_target(cancel, savepoint_dir=False)

    jobs = sub.add_parser("list", help="list the jobs running on this machine")
    jobs.add_argument("--json", action="store_true", help="print them as a JSON array")

    checkpoints = sub.add_parser("checkpoints", help="list checkpoints and savepoints under DIR")
    checkpoints.add_argument("dir", help="a checkpoint directory, or a folder of savepoints")
    checkpoints.add_argument(
        "--against",
        metavar="FILE",
        help="dry run: how each snapshot would restore into this job file (default: none, only "
        "list them)",
    )
    _add_parallelism_option(checkpoints)
    _add_max_parallelism_option(checkpoints)
    _add_params_option(checkpoints)

    info = sub.add_parser(
        "info",
        help="print the job graph of a job file without running it: tasks (chains of operators), "
        "parallelism, uids, partitioners, side outputs",
    )
    info.add_argument("file", help="the job file")
    _add_parallelism_option(info)
    _add_max_parallelism_option(info)
    _add_params_option(info)

    add_state_command(sub)

    taskmanager = sub.add_parser(
        "taskmanager",
        help="run a TaskManager for the JobManager at HOST:PORT (run --taskmanagers starts them)",
    )
    taskmanager.add_argument(
        "--jobmanager",
        required=True,
        type=_host_port,
        metavar="HOST:PORT",
        help="the JobManager's control address",
    )
    taskmanager.add_argument("--id", required=True, help="the id the JobManager gave it")
    _add_option(
        taskmanager,
        "--slots",
        type=_positive_int,
        default=1,
        metavar="N",
        help="subtasks of each vertex it can run",
    )
    _add_log_level_option(taskmanager)

    broker = sub.add_parser("broker", help="start the local Kafka-protocol broker for the dev loop")
    _add_option(
        broker, "--port", type=int, default=9092, help="the port it listens on, on 127.0.0.1"
    )
    return parser


def console_main() -> None:
    """The ``pyflow`` console script: the same commands as ``python -m runtime``."""
    sys.exit(main(prog="pyflow"))


def main(argv: list[str] | None = None, prog: str = "python -m runtime") -> int:
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command in ("savepoint", "stop", "cancel"):
        return _control(args)
    if args.command == "list":
        return print_jobs(as_json=args.json)
    if args.command == "checkpoints":
        return _checkpoints(args)
    if args.command == "info":
        return _info(args)
    if args.command == "state":
        return state_command(args)
    if args.command == "taskmanager":
        return _taskmanager(args)
    if args.command == "broker":
        from connectors.kafka.broker import run_broker_forever

        code: int = run_broker_forever(args.port)
        return code
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def _error(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def _warning(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A Kafka client retrying against a broker that went away logs every attempt.
    fold_repeats(KAFKA_CLIENT_LOGGERS)


def _run(args: Any) -> int:
    _configure_logging(args.log_level)
    try:
        build = load_job_file(args.file)
    except JobFileError as exc:
        _error(str(exc))
        return EXIT_USAGE
    if args.checkpoint_dir:
        try:
            check_checkpoint_directory(args.checkpoint_dir)
        except CheckpointDirectoryError as exc:
            _error(f"--checkpoint-dir: {exc}")
            return EXIT_USAGE
    params = dict(args.params)
    try:
        restart, restart_line = _restart_strategy(args)
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    try:
        graph = build_graph(
            build, params, args.parallelism, args.max_parallelism, name=_job_name(args.file)
        )
    except JobDefinitionError as exc:
        _error(f"invalid job {args.file}: {exc}")
        return EXIT_USAGE
    except Exception:
        sys.stderr.write(traceback.format_exc())
        _error(f"build(job) in {args.file} raised; see the traceback above")
        return EXIT_FAILED
    config = execution_config(args, restart)
    config.checkpoint.on_failure_alert = _alert_hook(build, args)
    try:
        restored = _load_restore_point(args, graph)
    except (InvalidCheckpointError, RestoreMismatchError, ValueError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    try:
        arm_from_params(params)
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    if args.watch:
        from runtime.shell.watch import run_watching

        sys.stderr.write(restart_line)
        return run_watching(args, build, graph, restored, config)
    storage = CheckpointStorage(args.checkpoint_dir, graph.name)
    deployment = None
    if args.taskmanagers > 1 or args.cluster != "local":
        try:
            deployment = taskmanager_deployment(
                args.file,
                params,
                args.parallelism,
                args.max_parallelism,
                graph,
                config,
                args.taskmanagers,
                args.cluster,
                jobmanager_host=args.jobmanager_host,
                checkpoint_dir=args.checkpoint_dir,
            )
        except ValueError as exc:
            _error(str(exc))
            return EXIT_USAGE
    elif args.jobmanager_host != DEFAULT_JOBMANAGER_HOST:
        _error("--jobmanager-host needs TaskManagers (--taskmanagers N, or --cluster ray)")
        return EXIT_USAGE
    master = JobMaster(graph, config, storage=storage, restored=restored, deployment=deployment)
    reporter = None if args.no_progress else ProgressReporter(master)
    shutdown = GracefulShutdown(
        master,
        args.checkpoint_dir,
        args.checkpoint_interval,
        args.shutdown_timeout,
        savepoint_dir=_savepoint_dir(args),
    )
    sys.stderr.write(restart_line)
    try:
        outcome = run_coroutine(_supervise(master, reporter, args, shutdown))
    except KeyboardInterrupt:
        _error("cancelled (Ctrl-C): every task was closed")
        _cleanup_on_cancel(master, args)
        return EXIT_INTERRUPTED
    except (TaskManagerStartError, DeploymentError, InfrastructureError) as exc:
        _error(str(exc))
        return EXIT_FAILED
    except JobFailedError as exc:
        refusal = restore_refusal(exc.cause)
        if refusal is not None:
            _error(str(refusal))
            return EXIT_USAGE
        if not shutdown.requested:
            _report_failure(exc)
            return EXIT_FAILED
        if not shutdown.explains(exc):
            _report_failure(exc)
        _error(shutdown.final_line())
        return EXIT_TERMINATED
    finally:
        shutdown.finish()
    if outcome is None:
        if shutdown.requested:
            _error(shutdown.final_line())
            return EXIT_TERMINATED
        _error("cancelled through the control endpoint: every task was closed")
        _cleanup_on_cancel(master, args)
        return EXIT_INTERRUPTED
    if reporter is not None:
        reporter.summary(outcome)
    if outcome.stopped_with_savepoint:
        path = outcome.stopped_with_savepoint
        sys.stderr.write(f"stopped with savepoint {path}; resume with --restore {path}\n")
        if args.checkpoint_dir:
            _record_stop_savepoint(args.checkpoint_dir, path)
    return EXIT_OK


def _taskmanager(args: Any) -> int:
    from runtime.cluster.taskmanager import DEFAULT_EXIT_GRACE_S, EXIT_SHUT_DOWN, run_taskmanager

    _configure_logging(args.log_level)
    host, port = args.jobmanager
    outcome = run_coroutine(
        run_taskmanager(
            host,
            port,
            args.id,
            args.slots,
            parent_pid=os.getppid(),
            exit_grace_s=DEFAULT_EXIT_GRACE_S,
        )
    )
    if outcome.code != EXIT_SHUT_DOWN:
        # Its stderr may be a pipe to the JobManager that is gone.
        with contextlib.suppress(OSError):
            _error(f"TaskManager {args.id} {outcome.reason}")
    code: int = outcome.code
    return code


def execution_config(args: Any, restart: RestartStrategy) -> ExecutionConfig:
    """The job master's configuration from the parsed ``run`` options and the restart strategy
    (which the CLI derives from ``--restart-strategy`` and the checkpointing)."""
    return ExecutionConfig(
        checkpoint=CheckpointConfig(
            interval_s=args.checkpoint_interval,
            mode=CheckpointingMode(args.mode),
            timeout_s=args.checkpoint_timeout,
            min_pause_s=args.min_pause,
            max_concurrent=args.max_concurrent_checkpoints,
            tolerable_failures=args.tolerable_checkpoint_failures,
            retained=args.retained_checkpoints,
            retain_on_cancel=args.on_cancel == "retain",
            alert_on_failures=args.alert_on_checkpoint_failures,
        ),
        restart_strategy=restart,
        buffer_timeout_s=args.buffer_timeout,
        auto_watermark_interval_s=args.auto_watermark_interval,
        allow_non_restored_state=args.allow_non_restored_state,
        on_newer_committed_output=NewerOutputPolicy(args.on_newer_committed_output),
        allow_existing_output=args.allow_existing_output,
    )


def _alert_hook(build: Any, args: Any) -> AlertHook | None:
    """The job file's top-level ``on_checkpoint_failure_alert(alert)``, if it defines one."""
    hook = getattr(sys.modules.get(build.__module__), HOOK_NAME, None)
    if hook is None:
        return None
    if not callable(hook):
        _warning(f"{args.file}: {HOOK_NAME} is not a function; it is ignored")
        return None
    if args.alert_on_checkpoint_failures is None:
        _warning(
            f"{args.file} defines {HOOK_NAME}, which is called only with "
            "--alert-on-checkpoint-failures N/WINDOW"
        )
    hook_function: AlertHook = hook
    return hook_function


def _restart_strategy(args: Any) -> tuple[RestartStrategy, str]:
    """The strategy asked for, or the default for the checkpointing; and the start-up line."""
    if args.restart_strategy is not None:
        strategy = parse_restart_strategy(args.restart_strategy)
        origin = ""
    else:
        checkpointing = args.checkpoint_interval is not None
        strategy = default_restart_strategy(checkpointing)
        origin = f" (default {'with' if checkpointing else 'without'} checkpointing)"
    return strategy, f"restart strategy: {strategy.describe()}{origin}\n"


def _load_restore_point(args: Any, graph: Any) -> Any:
    if args.restore is None:
        return None
    if args.restore == "latest":
        if not args.checkpoint_dir:
            msg = "--restore latest needs --checkpoint-dir"
            raise ValueError(msg)
        search = find_latest_valid(args.checkpoint_dir)
        restored = _newer_stop_savepoint(args.checkpoint_dir, search.checkpoint)
        if restored is None:
            # Starting fresh keeps kill-and-restart loops simple (the two-phase sinks refuse to
            # write over committed output); said loudly, since a typo in the directory lands here.
            _warning(
                f"--restore latest: no valid checkpoint in {args.checkpoint_dir} "
                f"({_describe_checkpoint_dir(Path(args.checkpoint_dir), search)}): "
                "starting from the beginning"
            )
            _warn_skipped(search.skipped)
            return None
        if search.skipped and restored is search.checkpoint:
            _warning(
                f"--restore latest: {len(search.skipped)} newer checkpoint folder(s) in "
                f"{args.checkpoint_dir} are {_skipped_as(search.skipped)}; falling back to "
                f"checkpoint {restored.checkpoint_id}"
            )
            _warn_skipped(search.skipped)
    else:
        restored = _load_restore_path(args.restore)
    report = RestoreReport(graph, restored)
    report.check(args.allow_non_restored_state)
    if args.restore == "latest":
        remove_incomplete_checkpoints(args.checkpoint_dir, restored.checkpoint_id)
    sys.stderr.write(
        f"restoring {restored.kind.value} {restored.checkpoint_id} from {restored.path}\n"
    )
    return restored


def _describe_checkpoint_dir(directory: Path, search: SnapshotSearch) -> str:
    if not directory.exists():
        return "the directory does not exist; check --checkpoint-dir"
    if not directory.is_dir():
        return "it is not a directory; check --checkpoint-dir"
    if not search.skipped:
        return "the directory exists and holds no chk-* folders"
    if all(entry.abandoned is None for entry in search.skipped):
        return f"the directory exists; none of its {len(search.skipped)} chk-* folders is valid"
    return (
        f"the directory exists; its {len(search.skipped)} chk-* folder(s) are "
        f"{_skipped_as(search.skipped)}"
    )


def _skipped_as(skipped: list[SkippedSnapshot]) -> str:
    """``not valid``, ``abandoned``, or ``abandoned or not valid``: why the folders were skipped."""
    kinds = {entry.abandoned is not None for entry in skipped}
    if kinds == {True}:
        return "abandoned (a restore of an older checkpoint left them)"
    return "abandoned or not valid" if kinds == {True, False} else "not valid"


def _warn_skipped(skipped: list[SkippedSnapshot]) -> None:
    for entry in skipped:
        if entry.abandoned is not None:
            _warning(f"  skipped {entry.folder.name}: {entry.reason}")
            continue
        state = "damaged" if entry.completed else "incomplete"
        _warning(f"  skipped {state} {entry.folder.name}: {entry.reason}")


def _load_restore_path(text: str) -> CompletedCheckpoint:
    """``--restore PATH``: a checkpoint or savepoint folder, or a folder of them (as ``stop --dir``
    writes), of which the newest valid one is restored."""
    path = Path(text)
    if not path.exists():
        msg = f"--restore {text}: no such checkpoint or savepoint folder"
        raise ValueError(msg)
    if path.name == METADATA and path.is_file():
        path = path.parent  # the metadata file names its folder, as Flink accepts
    if not path.is_dir() or (path / METADATA).exists():
        restored = load_checkpoint(path)
        marker = read_abandoned_marker(path)
        if marker is not None:
            _warning(
                f"--restore {text}: checkpoint {restored.checkpoint_id} was abandoned: "
                f"{marker.description}; restoring it as asked returns to the run that restore "
                "left (two-phase file sinks refuse it while its output is moved aside)"
            )
        return restored
    search = find_newest_snapshot(path)
    if search.checkpoint is None:
        if not search.skipped:
            msg = (
                f"--restore {text}: neither a checkpoint or savepoint folder (no {METADATA}) "
                "nor a folder of them"
            )
            raise InvalidCheckpointError(msg)
        reasons = "".join(f"\n  {entry.folder.name}: {entry.reason}" for entry in search.skipped)
        msg = f"--restore {text}: none of its {len(search.skipped)} snapshot folders is valid:"
        raise InvalidCheckpointError(msg + reasons)
    chosen = Path(search.checkpoint.path or text).name
    sys.stderr.write(
        f"--restore {text}: restoring the newest valid snapshot in it, {chosen} "
        "(by checkpoint id, then time)\n"
    )
    if search.skipped:
        _warning(f"--restore {text}: {len(search.skipped)} snapshot folder(s) are not valid")
        _warn_skipped(search.skipped)
    return search.checkpoint


STOP_SAVEPOINT_FILE = "stopped-with-savepoint"
"""In the checkpoint directory: the path of the savepoint the job last stopped with."""


def _record_stop_savepoint(checkpoint_dir: str, path: str) -> None:
    """A stop with savepoint commits output beyond the latest checkpoint: ``--restore latest``
    (a restart loop after SIGTERM) must resume from it, or it would replay what it committed."""
    (Path(checkpoint_dir) / STOP_SAVEPOINT_FILE).write_text(str(Path(path).resolve()) + "\n")


def _newer_stop_savepoint(
    checkpoint_dir: str, latest: CompletedCheckpoint | None
) -> CompletedCheckpoint | None:
    """The savepoint the job last stopped with if it is newer than ``latest``, else ``latest``."""
    record = Path(checkpoint_dir) / STOP_SAVEPOINT_FILE
    if not record.exists():
        return latest
    folder = record.read_text().strip()
    try:
        stopped = load_checkpoint(folder)
    except InvalidCheckpointError as exc:
        _warning(
            f"--restore latest: the job last stopped with savepoint {folder}, which cannot be "
            f"restored ({exc}); restoring the latest checkpoint instead"
        )
        return latest
    if latest is not None and latest.checkpoint_id > stopped.checkpoint_id:
        return latest
    sys.stderr.write(
        f"--restore latest: the job last stopped with savepoint {stopped.checkpoint_id} "
        f"({folder}), newer than every checkpoint in {checkpoint_dir}\n"
    )
    return stopped


def _cleanup_on_cancel(master: JobMaster, args: Any) -> None:
    if args.checkpoint_dir and args.on_cancel == "delete":
        import shutil

        for checkpoint in master.coordinator.completed:
            if checkpoint.path and checkpoint.kind is CheckpointKind.CHECKPOINT:
                shutil.rmtree(checkpoint.path, ignore_errors=True)


async def _supervise(
    master: JobMaster, reporter: ProgressReporter | None, args: Any, shutdown: GracefulShutdown
) -> Any:
    """Run the job with its progress reporter, control endpoint and SIGTERM handler; None if
    cancelled by request or by SIGTERM."""
    job = asyncio.create_task(master.run())
    shutdown.install(job)
    cancel_requested = False

    def cancel() -> None:
        nonlocal cancel_requested
        cancel_requested = True
        job.cancel()

    server = None
    address = None
    if args.rest_port >= 0:
        server = ControlServer(
            master,
            cancel,
            args.rest_host,
            args.rest_port,
            savepoint_dir=_savepoint_dir(args),
            allowed_savepoint_dirs=tuple(map(os.path.abspath, args.allowed_savepoint_dirs)),
        )
        address = await server.start()
        sys.stderr.write(f"control endpoint: http://{address}\n")
        sys.stderr.flush()
        if args.checkpoint_dir:
            _write_address_file(args.checkpoint_dir, address)
    _register(master, args, address, server)
    progress = asyncio.create_task(reporter.run()) if reporter is not None else None
    try:
        return await job
    except asyncio.CancelledError:
        if (cancel_requested or shutdown.requested) and job.cancelled():
            return None
        raise
    finally:
        shutdown.uninstall()
        if progress is not None:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
        if server is not None:
            await server.stop()
        registry.unregister(os.getpid())


def _savepoint_dir(args: Any) -> str | None:
    """``--savepoint-dir``, else ``<checkpoint-dir>/savepoints``, as an absolute path (relative
    ones are relative to where ``run`` was started); None without either."""
    if args.savepoint_dir:
        return os.path.abspath(str(args.savepoint_dir))
    if args.checkpoint_dir:
        return os.path.join(os.path.abspath(args.checkpoint_dir), "savepoints")
    return None


def _register(
    master: JobMaster, args: Any, address: str | None, server: ControlServer | None
) -> None:
    """Enter the job in the registry (``python -m runtime list``); a job that cannot be entered
    still runs, said once."""
    entry = registry.new_entry(
        master.graph.name,
        address,
        server.token if server is not None else "",
        os.path.abspath(args.checkpoint_dir) if args.checkpoint_dir else None,
        _savepoint_dir(args),
    )
    try:
        registry.register(entry)
    except (registry.RegistryError, OSError) as exc:
        _warning(f"the job is not listed by python -m runtime list: {exc}")


def _write_address_file(checkpoint_dir: str, address: str) -> None:
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    (Path(checkpoint_dir) / "rest-address").write_text(address + "\n")


def _add_control_target(parser: argparse.ArgumentParser, savepoint_dir: bool) -> None:
    """The options that say which job ``savepoint``, ``stop`` and ``cancel`` talk to."""
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "job",
        nargs="?",
        metavar="JOB",
        help="the job's name or pid, as python -m runtime list shows",
    )
    target.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="the job's control endpoint, instead of JOB (default: JOB's, from the registry)",
    )
    if savepoint_dir:
        parser.add_argument(
            "--dir",
            help="directory to write the savepoint into, relative to the current directory "
            "(default: the job's savepoint directory, --savepoint-dir of run)",
        )
    parser.add_argument(
        "--token",
        help="the job's control token (default: from the job registry, else $PYFLOW_TOKEN)",
    )


def _control_target(args: Any) -> tuple[str, str | None, str | None]:
    """The control address, token and savepoint directory that ``args`` name, from the
    registry; raises :class:`registry.JobLookupError` when they cannot be found."""
    job: registry.JobEntry | None
    if args.job is not None:
        job = registry.resolve_job(args.job)
        if job.address is None:
            msg = f"job {job.name} (pid {job.pid}) runs without a control endpoint (--rest-port -1)"
            raise registry.JobLookupError(msg)
        address = job.address
    else:
        address = args.address
        job = registry.find_by_address(address)
    token = args.token or (job.token if job is not None else None)
    if getattr(args, "dir", None):
        return address, token, os.path.abspath(args.dir)
    savepoint_dir = job.savepoint_dir if job is not None else None
    if args.command != "cancel" and savepoint_dir is None:
        known = "has no savepoint directory" if job else "is not in this machine's job registry"
        msg = f"the job at {address} {known}: give --dir"
        raise registry.JobLookupError(msg)
    return address, token, savepoint_dir


def _control(args: Any) -> int:
    try:
        address, token, target = _control_target(args)
    except registry.JobLookupError as exc:
        _error(str(exc))
        return EXIT_USAGE
    try:
        if args.command == "savepoint":
            answer = call(address, "POST", "/savepoints", {"dir": target}, token=token)
            print(f"savepoint {answer['id']} written to {answer['path']}")
        elif args.command == "stop":
            body = {"dir": target, "drain": args.drain}
            answer = call(address, "POST", "/stop", body, token=token)
            print(f"stopped with savepoint {answer['id']} at {answer['path']}")
        else:
            call(address, "POST", "/cancel", token=token)
            print("cancel requested")
    except ControlClientError as exc:
        _error(str(exc))
        return EXIT_FAILED
    return EXIT_OK


def _checkpoints(args: Any) -> int:
    base = Path(args.dir)
    if not base.exists():
        _error(f"{args.dir} does not exist")
        return EXIT_USAGE
    graph: JobGraph | None = None
    if args.against:
        built = _job_file_graph(args.against, args)
        if isinstance(built, int):
            return built
        graph = built
    folders = sorted(set(find_snapshot_folders(base)) | set(list_checkpoint_folders(base)))
    if not folders:
        print(f"no checkpoints or savepoints under {base}")
        return EXIT_OK
    for folder in folders:
        try:
            checkpoint = load_checkpoint(folder)
        except InvalidCheckpointError as exc:
            print(f"{folder}: INVALID ({exc})")
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(checkpoint.timestamp_ms / 1000))
        marker = read_abandoned_marker(folder)
        status = "valid" if marker is None else f"valid, ABANDONED ({marker.description})"
        ops = ", ".join(
            f"{uid}{' (finished)' if e.fully_finished else ''}"
            for uid, e in checkpoint.operators.items()
        )
        print(
            f"{folder}: {checkpoint.kind.value} {checkpoint.checkpoint_id}, {when}, "
            f"{checkpoint.state_size:,} bytes, {status}; operators: {ops}"
        )
        if graph is not None:
            report = RestoreReport(graph, checkpoint)
            for line in report.describe(graph).splitlines():
                print(f"    {line}")
    return EXIT_OK


def _job_file_graph(file: str, args: Any) -> JobGraph | int:
    """The graph of job ``file`` with the ``--set``, ``-p`` and ``--max-parallelism`` of
    ``args``, or the exit code after its error line (2 for a bad job file or job definition)."""
    try:
        return build_graph(
            load_job_file(file),
            dict(args.params),
            args.parallelism,
            args.max_parallelism,
            name=_job_name(file),
        )
    except JobFileError as exc:
        _error(str(exc))
    except JobDefinitionError as exc:
        _error(f"invalid job {file}: {exc}")
    except Exception:
        sys.stderr.write(traceback.format_exc())
        _error(f"build(job) in {file} raised; see the traceback above")
        return EXIT_FAILED
    return EXIT_USAGE


def _info(args: Any) -> int:
    graph = _job_file_graph(args.file, args)
    if isinstance(graph, int):
        return graph
    print(describe_job_graph(graph))
    return EXIT_OK


def _report_failure(exc: JobFailedError) -> None:
    cause = exc.cause
    if isinstance(cause, TaskManagerLostError):
        # Infrastructure, not code: the line says which TaskManager and how it ended.
        _error(f"job failed: {exc}")
        return
    infrastructure = infrastructure_cause(cause)
    if infrastructure is not None:
        _error(str(infrastructure))
        return
    user_exc = cause.cause if isinstance(cause, UserFunctionError) else cause.__cause__ or cause
    if isinstance(user_exc, RemoteFailureCause):
        # Raised in a TaskManager: its traceback there, as it would print here.
        sys.stderr.write(user_exc.remote_traceback)
    else:
        sys.stderr.write("".join(traceback.format_exception(user_exc)))
    _error(f"job failed: {exc}")


def _job_name(path: str) -> str:
    return Path(path).stem
