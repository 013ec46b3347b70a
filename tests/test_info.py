"""``python -m runtime info JOB.py``: the job graph without running the job."""

from __future__ import annotations

import textwrap
from pathlib import Path

from cli_helpers import run_cli, the_one_error


def test_info_prints_tasks_operators_uids_partitioners_and_side_outputs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("info", "examples/windowed_counts.py", "--set", f"output={out}", "-p", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == textwrap.dedent(
        """\
        job windowed_counts: 6 operators in 3 tasks, 2 edges between them

        task events: parallelism 2, max parallelism 128
          Source: File(events.jsonl)  uid events  (source)
          Timestamps/Watermarks       uid timestamps-watermarks  (generated uid, chained)
          purchases                   uid purchases  (generated uid, chained)
          -> purchases-per-window: hash

        task purchases-per-window: parallelism 2, max parallelism 128
          purchases per window  uid purchases-per-window
          committed windows     uid output  (sink, chained)
          <- events: hash
          -> late-output: forward, side output 'late-purchases' of 'purchases per window'

        task late-output: parallelism 2, max parallelism 128
          committed late purchases  uid late-output  (sink)
          <- purchases-per-window: forward, side output 'late-purchases' of 'purchases per window'
        """
    )
    assert not out.exists()  # nothing ran


JOB = """
    from connectors import CollectionSource
    from runtime import Job


    def build(job: Job) -> None:
        numbers = job.from_source(CollectionSource([1, 2, 3]), name="numbers").uid("numbers")
        doubled = numbers.map(lambda x: 2 * x, name="double").set_parallelism(3)
        doubled.rebalance().map(str, name="text").disable_chaining().print()
        numbers.broadcast().map(abs, name="magnitude").print()
"""


def test_info_shows_rebalance_broadcast_and_broken_chains(tmp_path: Path) -> None:
    job = tmp_path / "shapes.py"
    job.write_text(textwrap.dedent(JOB))
    proc = run_cli("info", str(job), "--max-parallelism", "64")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == textwrap.dedent(
        """\
        job shapes: 6 operators in 5 tasks, 4 edges between them

        task numbers: parallelism 1, max parallelism 64
          numbers  uid numbers  (source)
          -> double: rebalance
          -> magnitude: broadcast

        task double: parallelism 3, max parallelism 64
          double  uid double  (generated uid)
          <- numbers: rebalance
          -> text: rebalance

        task text: parallelism 1, max parallelism 64
          text  uid text  (generated uid, chaining disabled)
          <- double: rebalance
          -> sink-print: forward

        task sink-print: parallelism 1, max parallelism 64
          Sink: Print  uid sink-print  (generated uid, sink)
          <- text: forward

        task magnitude: parallelism 1, max parallelism 64
          magnitude    uid magnitude  (generated uid)
          Sink: Print  uid sink-print-2  (generated uid, sink, chained)
          <- numbers: broadcast
        """
    )


def test_info_of_a_job_missing_a_parameter_is_a_usage_error() -> None:
    proc = run_cli("info", "examples/file_etl.py")
    assert proc.returncode == 2, proc.stderr
    assert the_one_error(proc) == (
        "invalid job examples/file_etl.py: job parameter 'output' is required: pass --set "
        "output=..."
    )
