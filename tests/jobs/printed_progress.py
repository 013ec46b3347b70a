"""A job for the progress display's terminal test (``tests/test_progress.py``): ``count`` records
``record 0000``, ``record 0001``, ... at ``rate`` per second through an operator with a name too
long for an 80-column table into ``.print()``; halfway through, the operator logs a WARNING
``halfway at record N``.

Params: ``count`` (default 120), ``rate`` (records per second, default 60).
"""

from __future__ import annotations

import logging

from connectors import GeneratorSource
from runtime import Job

log = logging.getLogger(__name__)

LONG_NAME = "format every record for the terminal, with a name longer than any column"


def build(job: Job) -> None:
    count = int(job.params.get("count", "120"))
    rate = float(job.params.get("rate", "60"))

    def label(i: int) -> str:
        if i == count // 2:
            log.warning("halfway at record %d", i)
        return f"record {i:04d}"

    job.from_source(GeneratorSource(lambda i: i, rate=rate, count=count)).map(
        label, name=LONG_NAME
    ).print()
