"""Issue 8 as its users meet it: gaps found by running the CLI by hand after the fixes.

- A process function that collects what an ``async def`` function returns (``out.collect(
  fetch(value))``, a forgotten ``await``) emitted coroutine objects as records and the job exited
  0, although a process function that *returns* one fails its task.
- ``python -m runtime checkpoints`` reported a missing metadata field as
  ``checkpoint_id: expected a value, got 'nothing'``, as if the field held the string "nothing".
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from cli_helpers import run_cli

COLLECTS_A_COROUTINE = textwrap.dedent(
    """\
    from connectors import CollectionSource
    from runtime import KeyedProcessFunction

    END_OF_INPUT = 1 << 62


    async def enrich(value):
        return value


    class Enrich(KeyedProcessFunction):
        def __init__(self, in_timer):
            self.in_timer = in_timer

        def process_element(self, value, ctx, out):
            if self.in_timer:
                ctx.timer_service().register_event_time_timer(END_OF_INPUT)
            else:
                out.collect(enrich(value))

        def on_timer(self, timestamp, ctx, out):
            out.collect(enrich(ctx.current_key))


    def build(job):
        in_timer = job.params.get_bool("in_timer", False)
        (
            job.from_source(CollectionSource([1, 2, 3]))
            .key_by(lambda v: v)
            .process(Enrich(in_timer), name="enrich")
            .print()
        )
    """
)


@pytest.mark.parametrize("in_timer", [False, True], ids=["process_element", "on_timer"])
def test_a_process_function_that_collects_a_coroutine_fails_naming_the_operator(
    tmp_path: Path, in_timer: bool
) -> None:
    job = tmp_path / "collects_coroutine.py"
    job.write_text(COLLECTS_A_COROUTINE)
    proc = run_cli(
        "run", str(job), "--set", f"in_timer={str(in_timer).lower()}", "--no-progress",
        "--rest-port", "-1",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "coroutine object" not in proc.stdout, proc.stdout
    assert "operator 'enrich' (subtask 1/1)" in proc.stderr, proc.stderr
    method = "on_timer()" if in_timer else "process_element()"
    assert f"{method} of the process function collected a coroutine" in proc.stderr, proc.stderr
    assert "map_async" in proc.stderr
    assert "was never awaited" not in proc.stderr, proc.stderr


def test_a_missing_metadata_field_is_reported_as_missing(tmp_path: Path) -> None:
    folder = tmp_path / "chk" / "chk-1"
    folder.mkdir(parents=True)
    (folder / "_metadata").write_text(json.dumps({"format": 1}))
    listing = run_cli("checkpoints", str(tmp_path / "chk"))
    assert listing.returncode == 0, listing.stderr
    assert "INVALID" in listing.stdout, listing.stdout
    assert "checkpoint_id: expected a value, but the field is missing" in listing.stdout
    assert "'nothing'" not in listing.stdout, listing.stdout
