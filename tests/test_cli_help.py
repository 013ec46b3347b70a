"""The CLI's help and its duration options: every option explains itself and shows its default as
users write it; a duration without a unit is refused with the accepted forms."""

from __future__ import annotations

import argparse

import pytest
from cli_helpers import run_cli, the_one_error

from runtime.api.durations import format_duration
from runtime.shell.cli import make_parser


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = make_parser()
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _options(command: str) -> list[argparse.Action]:
    return [
        action
        for action in _subcommands()[command]._actions
        if not isinstance(action, argparse._HelpAction)
    ]


COMMANDS = sorted(_subcommands())


def test_the_cli_has_its_commands() -> None:
    assert {"run", "savepoint", "stop", "cancel", "checkpoints", "taskmanager", "broker"} <= set(
        COMMANDS
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_shows_its_default(command: str) -> None:
    for action in _options(command):
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{command} {name} has no help"
        if action.required or not action.option_strings:
            continue
        default = action.default
        if default is None or default is False or default == []:
            # No value: the help says what happens without the option (or it is a flag).
            if not isinstance(action, argparse._StoreTrueAction):
                assert "default" in action.help, f"{command} {name}: {action.help!r}"
            continue
        shown = format_duration(default) if action.metavar == "DURATION" else str(default)
        assert f"(default {shown})" in action.help, f"{command} {name}: {action.help!r}"


def test_the_help_shows_durations_as_durations() -> None:
    proc = run_cli("run", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "(default 10min)" in text  # --checkpoint-timeout
    assert "(default 200ms)" in text  # --auto-watermark-interval
    assert "(default 30s)" in text  # --shutdown-timeout


@pytest.mark.parametrize(
    "option",
    ["--checkpoint-interval", "--checkpoint-timeout", "--min-pause", "--shutdown-timeout"],
)
def test_a_bare_number_for_a_duration_option_is_refused_with_the_accepted_forms(
    option: str,
) -> None:
    proc = run_cli("run", "examples/wordcount.py", option, "5", "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("python -m runtime run: error: argument " + option), error
    assert "invalid duration '5': a duration needs a unit, e.g. 5ms, 5s or 5min" in error
    assert "500ms, 5s, 1.5s, 1min, 2h" in error


def test_a_bare_number_in_the_restart_strategy_is_refused() -> None:
    proc = run_cli(
        "run", "examples/wordcount.py", "--restart-strategy", "fixed-delay:3:2", "--no-progress"
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "invalid duration '2': a duration needs a unit" in proc.stderr


def test_durations_with_units_and_a_bare_zero_are_accepted() -> None:
    proc = run_cli(
        "run",
        "examples/wordcount.py",
        "--checkpoint-interval",
        "100ms",
        "--min-pause",
        "0",
        "--auto-watermark-interval",
        "0",
        "--no-progress",
        "--rest-port",
        "-1",
    )
    assert proc.returncode == 0, proc.stderr


def test_a_bad_log_level_is_one_line_with_the_levels() -> None:
    proc = run_cli("run", "examples/wordcount.py", "--log-level", "LOUD")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error == (
        "python -m runtime run: error: argument --log-level: invalid log level 'LOUD': use one "
        "of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    )


def test_the_log_level_is_case_insensitive() -> None:
    proc = run_cli(
        "run", "examples/wordcount.py", "--log-level", "info", "--no-progress", "--rest-port", "-1"
    )
    assert proc.returncode == 0, proc.stderr


def test_a_bare_number_for_a_window_size_from_a_parameter_is_a_usage_error() -> None:
    """Job code's duration strings go through the same parser: ``--set window=10`` (seconds?
    milliseconds?) is refused as a bad job definition, in one line."""
    proc = run_cli(
        "run",
        "examples/windowed_counts.py",
        *("--set", "output=/nonexistent/never-written", "--set", "window=10", "--no-progress"),
    )
    assert proc.returncode == 2, proc.stderr
    assert the_one_error(proc) == (
        "invalid job examples/windowed_counts.py: window size: invalid duration '10': a duration "
        "needs a unit, e.g. 10ms, 10s or 10min (accepted forms: 500ms, 5s, 1.5s, 1min, 2h)"
    )
