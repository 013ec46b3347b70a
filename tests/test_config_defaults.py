"""``python -m runtime run`` takes its defaults from ``runtime.config``, and ``--help`` shows them:
a default changed there reaches the CLI, the API and the help text alike."""

from __future__ import annotations

import dataclasses
import re

import pytest

from runtime import config
from runtime.api.durations import format_duration
from runtime.config import CheckpointConfig, ExecutionConfig
from runtime.master.restart import default_restart_strategy
from runtime.shell import cli

DERIVED_BY_THE_CLI = {"restart_strategy"}
"""ExecutionConfig fields the CLI computes from other options rather than defaulting."""


def test_run_without_options_configures_the_job_as_execution_config_defaults() -> None:
    args = cli.make_parser().parse_args(["run", "job.py"])
    configured = cli.execution_config(args, default_restart_strategy(args.checkpoint_interval))
    defaults = ExecutionConfig()
    for field in dataclasses.fields(ExecutionConfig):
        if field.name in DERIVED_BY_THE_CLI:
            continue
        value, default = getattr(configured, field.name), getattr(defaults, field.name)
        if field.name == "clock":  # a fresh clock per config: the same kind is the same default
            assert type(value) is type(default)
        else:
            assert value == default, field.name
    # Without checkpointing the derived strategy is the dataclass's default strategy too.
    assert type(configured.restart_strategy) is type(defaults.restart_strategy)


def test_run_options_outside_execution_config_default_to_the_config_constants() -> None:
    args = cli.make_parser().parse_args(["run", "job.py"])
    assert args.parallelism == config.DEFAULT_PARALLELISM
    assert args.max_parallelism == config.DEFAULT_MAX_PARALLELISM
    assert args.shutdown_timeout == config.DEFAULT_SHUTDOWN_TIMEOUT_S
    assert args.rest_port == config.DEFAULT_REST_PORT
    assert args.rest_host == config.DEFAULT_REST_HOST


def _help_by_option(text: str) -> dict[str, str]:
    """``--option`` -> its help text, from argparse output printed one option per line or two."""
    helps: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("  -"):
            invocation, _, help_text = line.strip().partition("  ")
            current = [word for word in invocation.split() if word.startswith("--")][-1]
            helps[current] = help_text.strip()
        elif current is not None and line.startswith("   "):
            helps[current] = f"{helps[current]} {line.strip()}".strip()
    return {option.rstrip(","): text for option, text in helps.items()}


def test_run_help_shows_the_defaults_of_the_config_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per help text
    with pytest.raises(SystemExit):
        cli.make_parser().parse_args(["run", "--help"])
    helps = _help_by_option(capsys.readouterr().out)
    checkpoint, execution = CheckpointConfig(), ExecutionConfig()
    expected = {
        "--parallelism": str(config.DEFAULT_PARALLELISM),
        "--max-parallelism": str(config.DEFAULT_MAX_PARALLELISM),
        "--mode": checkpoint.mode.value,
        "--checkpoint-timeout": format_duration(checkpoint.timeout_s),
        "--min-pause": format_duration(checkpoint.min_pause_s),
        "--max-concurrent-checkpoints": str(checkpoint.max_concurrent),
        "--tolerable-checkpoint-failures": str(checkpoint.tolerable_failures),
        "--retained-checkpoints": str(checkpoint.retained),
        "--on-cancel": "retain" if checkpoint.retain_on_cancel else "delete",
        "--on-newer-committed-output": execution.on_newer_committed_output.value,
        "--rest-port": str(config.DEFAULT_REST_PORT),
        "--rest-host": config.DEFAULT_REST_HOST,
        "--shutdown-timeout": format_duration(config.DEFAULT_SHUTDOWN_TIMEOUT_S),
        "--buffer-timeout": format_duration(execution.buffer_timeout_s),
        "--auto-watermark-interval": format_duration(execution.auto_watermark_interval_s),
    }
    for option, default in expected.items():
        assert re.search(rf"\bdefault {re.escape(default)}\b", helps[option]), (option, helps)
    assert default_restart_strategy(True).describe() in helps["--restart-strategy"]


def test_auto_watermark_interval_takes_a_duration_and_zero_turns_it_off() -> None:
    parser = cli.make_parser()
    for text, seconds in (("50ms", 0.05), ("1s", 1.0), ("0", 0.0)):
        args = parser.parse_args(["run", "job.py", "--auto-watermark-interval", text])
        configured = cli.execution_config(args, default_restart_strategy(False))
        assert configured.auto_watermark_interval_s == seconds
