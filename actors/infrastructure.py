"""Trouble a job meets outside its code: a missing input file, no broker, a missing topic.

It lives in the data plane's bottom layer because connectors raise it (in sources' split
discovery on the job master, in readers and writers in the tasks), task failures carry it across
processes (``actors.protocol``), and the CLI recognises it.
"""

from __future__ import annotations

from state.refusal import find_cause


class InfrastructureError(RuntimeError):
    """A problem outside the job's code that the user fixes outside it: an input file that is
    missing or not UTF-8, no Kafka broker at the bootstrap address, a topic that does not exist.

    The message is one line that names what and where (file and line, address, topic, the
    operator when the raiser knows it) and says what to do. The CLI prints it as its one
    ``error:`` line, without a traceback, and exits 1. A task failing on one goes through the
    restart strategy like any other failure (a broker may come back)."""


def infrastructure_cause(failure: BaseException) -> InfrastructureError | None:
    """The :class:`InfrastructureError` that caused ``failure`` (itself or along its causes)."""
    return find_cause(failure, InfrastructureError)
