"""Load a job file and run it: the programmatic entry point behind ``python -m runtime run``.

``run_job(build, ...)`` runs a ``build(job)`` function; ``load_job_file(path)`` imports a job file
and returns its ``build`` (both from :mod:`runtime.plan.jobfile`, where TaskManagers find them
too). Both raise :class:`JobFileError` with a message that says what to fix.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

from runtime.config import DEFAULT_PARALLELISM, ExecutionConfig
from runtime.master.jobmaster import JobMaster, JobResult
from runtime.plan.jobfile import BuildFunction as BuildFunction
from runtime.plan.jobfile import JobFileError as JobFileError
from runtime.plan.jobfile import build_graph as build_graph
from runtime.plan.jobfile import load_job_file as load_job_file
from runtime.plan.limits import RunLimits
from runtime.process import run_on_new_loop
from state.keygroups import DEFAULT_MAX_PARALLELISM


async def run_job_async(
    build: BuildFunction,
    params: dict[str, str] | None = None,
    parallelism: int = DEFAULT_PARALLELISM,
    config: ExecutionConfig | None = None,
    name: str = "job",
    max_parallelism: int = DEFAULT_MAX_PARALLELISM,
    *,
    max_records: int | None = None,
    timeout: int | str | None = None,
    **master_kw: Any,
) -> JobResult:
    """:func:`run_job` on the running event loop (``master_kw`` go to the
    :class:`~runtime.master.jobmaster.JobMaster`)."""
    limits = RunLimits.from_arguments(max_records, timeout)
    graph = build_graph(build, params, parallelism, max_parallelism, name=name)
    master = JobMaster(graph, config, limits=limits, **master_kw)
    return await master.run()


def run_job(
    build: BuildFunction,
    params: dict[str, str] | None = None,
    parallelism: int = DEFAULT_PARALLELISM,
    config: ExecutionConfig | None = None,
    name: str = "job",
    max_parallelism: int = DEFAULT_MAX_PARALLELISM,
    *,
    max_records: int | None = None,
    timeout: int | str | None = None,
) -> JobResult:
    """Run a job to its end on a fresh event loop (uvloop when installed).

    A job over an unbounded source (a live Kafka topic) runs until a limit ends it:

    - ``max_records=N``: once the sinks received N records, exactly N in total over all sinks
      and subtasks (records still on their way then are not written);
    - ``timeout``: after this long (int milliseconds, or a duration such as ``"10s"``), on the
      job's clock (``config.clock``), from the start of the run;

    whichever comes first. The job then ends as a bounded job does (FLIP-147 drain: the sources
    end, event-time timers fire, ``finish()`` runs everywhere, and a final checkpoint, kept in
    memory without a checkpoint directory, commits what the sinks received), and
    ``JobResult.stopped_by`` says which limit it was. A job that ends by itself first returns
    as usual (``stopped_by`` None). Raises ValueError for a count that is not a positive int or
    a timeout that is not a positive duration::

        sink = CollectSink()
        result = run_job(build, max_records=10)  # build() ends in .sink_to(sink)
        sink.committed  # the 10 records, committed by the final checkpoint
    """
    limits = RunLimits.from_arguments(max_records, timeout)  # refused before a loop starts
    result: JobResult = run_coroutine(
        run_job_async(
            build,
            params,
            parallelism,
            config,
            name,
            max_parallelism,
            max_records=limits.max_records,
            timeout=limits.timeout_ms,
        )
    )
    return result


def run_coroutine(coro: Any) -> Any:
    """Run ``coro`` to completion on uvloop (or asyncio's loop when uvloop is missing).

    Called where an event loop already runs in this thread (a Jupyter notebook, IPython),
    ``coro`` runs on a loop of its own in a worker thread while this call blocks, since loops do
    not nest; an interrupt (Ctrl-C, the notebook's stop button) cancels it there and is raised
    once it ended."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run_on_new_loop(coro)
    return _run_in_worker_thread(coro)


def _run_in_worker_thread(coro: Any) -> Any:
    outcome: concurrent.futures.Future[Any] = concurrent.futures.Future()
    running: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]] = []
    started = threading.Event()

    async def main() -> Any:
        task = asyncio.current_task()
        assert task is not None
        running.append((asyncio.get_running_loop(), task))
        started.set()
        return await coro

    def work() -> None:
        try:
            outcome.set_result(run_on_new_loop(main()))
        except BaseException as exc:
            # Everything, cancellation included, is the caller's to see, in its own thread.
            outcome.set_exception(exc)
        finally:
            started.set()

    worker = threading.Thread(target=work, name="run_job", daemon=True)
    worker.start()
    try:
        return outcome.result()
    except BaseException:
        if not outcome.done():
            started.wait()
            if running:
                loop, task = running[0]
                loop.call_soon_threadsafe(task.cancel)
        raise
    finally:
        # The outcome is set a moment before the worker thread ends: join it, so
        # that no thread of this call outlives it.
        worker.join()
