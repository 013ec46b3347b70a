"""A job file and its graph: import the file, run its ``build(job)``, get the :class:`JobGraph`.

Here, below the master, the cluster and the shell, because each process builds the graph itself:
``python -m runtime run`` and every TaskManager. :func:`load_job_file` and :func:`build_graph`
raise :class:`JobFileError` (or :class:`~runtime.api.streams.JobDefinitionError`) with a message
that says what to fix.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.api.streams import Job
from runtime.config import DEFAULT_PARALLELISM
from runtime.plan.graph import JobGraph, build_job_graph
from runtime.plan.shadowing import describe_shadowing, shadowing_modules
from state.keygroups import DEFAULT_MAX_PARALLELISM

BuildFunction = Callable[[Job], Any]


class JobFileError(RuntimeError):
    """The job file is missing, cannot be imported, defines no ``build(job)``, or sits next to a
    module that takes the name of one of the runtime's packages."""


def load_job_file(path: str | Path) -> BuildFunction:
    file = Path(path)
    if not file.exists():
        msg = f"job file {str(file)!r} not found"
        raise JobFileError(msg)
    if not file.is_file():
        msg = f"job file {str(file)!r} is not a file"
        raise JobFileError(msg)
    shadowing = shadowing_modules(file.resolve().parent)
    if shadowing:
        msg = "; ".join(describe_shadowing(path, name) for path, name in shadowing)
        raise JobFileError(msg)
    module_name = f"_job_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        msg = f"job file {str(file)!r} cannot be imported as Python"
        raise JobFileError(msg)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    # The job's own directory first, so a job can import its helper modules.
    sys.path.insert(0, str(file.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        detail = "".join(traceback.format_exception(exc, limit=-3))
        msg = f"job file {str(file)!r} cannot be imported: {type(exc).__name__}: {exc}\n{detail}"
        raise JobFileError(msg) from exc
    finally:
        sys.path.remove(str(file.resolve().parent))
    build = getattr(module, "build", None)
    if build is None or not callable(build):
        msg = f"job file {str(file)!r} defines no build(job) function"
        raise JobFileError(msg)
    return build  # type: ignore[no-any-return]


def build_graph(
    build: BuildFunction,
    params: dict[str, str] | None = None,
    parallelism: int = DEFAULT_PARALLELISM,
    max_parallelism: int = DEFAULT_MAX_PARALLELISM,
    name: str = "job",
) -> JobGraph:
    job = Job(params=params, parallelism=parallelism, max_parallelism=max_parallelism, name=name)
    build(job)
    return build_job_graph(job)
