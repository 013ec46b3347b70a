"""Load a job file and run it: the programmatic entry point behind ``python -m runtime run``.

``run_job(build, ...)`` runs a ``build(job)`` function; ``load_job_file(path)`` imports a job file
and returns its ``build`` (both from :mod:`runtime.plan.jobfile`, where TaskManagers find them
too). Both raise :class:`JobFileError` with a message that says what to fix.
"""

from __future__ import annotations

import asyncio
from typing import Any

from runtime.config import DEFAULT_PARALLELISM, ExecutionConfig
from runtime.master.jobmaster import JobMaster, JobResult
from runtime.plan.jobfile import BuildFunction as BuildFunction
from runtime.plan.jobfile import JobFileError as JobFileError
from runtime.plan.jobfile import build_graph as build_graph
from runtime.plan.jobfile import load_job_file as load_job_file
from state.keygroups import DEFAULT_MAX_PARALLELISM


async def run_job_async(
    build: BuildFunction,
    params: dict[str, str] | None = None,
    parallelism: int = DEFAULT_PARALLELISM,
    config: ExecutionConfig | None = None,
    name: str = "job",
    max_parallelism: int = DEFAULT_MAX_PARALLELISM,
    **master_kw: Any,
) -> JobResult:
    graph = build_graph(build, params, parallelism, max_parallelism, name=name)
    master = JobMaster(graph, config, **master_kw)
    return await master.run()


def run_job(
    build: BuildFunction,
    params: dict[str, str] | None = None,
    parallelism: int = DEFAULT_PARALLELISM,
    config: ExecutionConfig | None = None,
    name: str = "job",
    max_parallelism: int = DEFAULT_MAX_PARALLELISM,
) -> JobResult:
    """Run a job to its end on a fresh event loop (uvloop when installed)."""
    result: JobResult = run_coroutine(
        run_job_async(build, params, parallelism, config, name, max_parallelism)
    )
    return result


def run_coroutine(coro: Any) -> Any:
    """Run ``coro`` to completion on uvloop (or asyncio's loop when uvloop is missing)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
