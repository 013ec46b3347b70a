"""The progress display: the job master's counts once a job ended (what the display's last frame
and the summary read)."""

from __future__ import annotations

import asyncio

from connectors import CollectionSource, CollectSink
from runtime import Job
from runtime.master.jobmaster import JobMaster
from runtime.plan.jobfile import build_graph

RECORDS = 50


def _counted_job(job: Job) -> None:
    job.from_source(CollectionSource(list(range(RECORDS)))).map(
        lambda n: n * 2, name="double"
    ).sink_to(CollectSink())


def test_counts_after_the_job_ended_equal_the_result() -> None:
    """Once a job ended, its live counters are already in the totals: the counts read with the
    live ones (the display's last frame, ``/status``) are the result's, not twice them."""
    master = JobMaster(build_graph(_counted_job, None, 1))
    result = asyncio.run(master.run())
    counts = {s.uid: (s.records_in, s.records_out) for s in result.operators}
    assert counts[next(s.uid for s in result.operators if s.name == "double")] == (
        RECORDS,
        RECORDS,
    )
    after = {s.uid: (s.records_in, s.records_out) for s in master.operator_summaries(True)}
    assert after == counts
