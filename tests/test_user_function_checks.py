"""User functions that the runtime cannot call synchronously are refused.

``async def`` functions (and async generators, callables with an async ``__call__``, partials of
them, rich functions with async hooks) are refused when the job is built, naming the method and
the function. A synchronous function that returns an awaitable fails its task at run time, naming
the operator and subtask, and the returned coroutines are closed (no "never awaited" warning).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run_cli

from connectors import CollectionSource, CollectSink
from runtime import (
    Collector,
    ExecutionConfig,
    JobDefinitionError,
    JobFailedError,
    KeyedCoProcessFunction,
    KeyedProcessContext,
    KeyedProcessFunction,
    MapFunction,
    RuntimeContext,
)
from runtime.master.jobmaster import JobMaster
from runtime.master.restart import NoRestart
from runtime.shell.runner import build_graph

WAIT_S = 10.0
THIS_FILE = Path(__file__).name


async def fetch(value: Any) -> Any:
    return value


async def fetch_pair(a: Any, b: Any) -> Any:
    return a


async def stream_words(line: str) -> AsyncIterator[str]:
    for word in line.split():
        yield word


class AsyncCallable:
    async def __call__(self, value: Any) -> Any:
        return value


class AsyncMap(MapFunction[Any, Any]):
    async def map(self, value: Any) -> Any:  # type: ignore[override]
        return value


class AsyncOpen(MapFunction[Any, Any]):
    async def open(self, ctx: RuntimeContext) -> None:  # type: ignore[override]
        pass

    def map(self, value: Any) -> Any:
        return value


class AsyncProcess(KeyedProcessFunction[Any, Any, Any]):
    async def process_element(  # type: ignore[override]
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        out.collect(value)


class AsyncTimer(KeyedProcessFunction[Any, Any, Any]):
    def process_element(
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        out.collect(value)

    async def on_timer(  # type: ignore[override]
        self, timestamp: int, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        pass


class AsyncSecondInput(KeyedCoProcessFunction[Any, Any, Any]):
    def process_element1(
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        out.collect(value)

    async def process_element2(  # type: ignore[override]
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        out.collect(value)


def _line_of(obj: Any) -> str:
    return f"{THIS_FILE}:{inspect.getsourcelines(obj)[1]}"


def _source(job: Any) -> Any:
    return job.from_source(CollectionSource(["a b", "c d"]))


BUILD_CASES: list[tuple[str, Callable[[Any], Any], str, str]] = [
    ("map", lambda job: _source(job).map(fetch), "map()", "fetch"),
    ("filter", lambda job: _source(job).filter(fetch), "filter()", "fetch"),
    ("flat_map-async-generator", lambda job: _source(job).flat_map(stream_words), "flat_map()",
     "stream_words"),
    ("key_by", lambda job: _source(job).key_by(fetch), "key_by()", "fetch"),
    ("map_batches", lambda job: _source(job).map_batches(fetch), "map_batches()", "fetch"),
    ("flat_map_batches", lambda job: _source(job).flat_map_batches(fetch), "flat_map_batches()",
     "fetch"),
    ("connected-key_by",
     lambda job: _source(job).connect(_source(job)).key_by(lambda v: v, fetch), "key_by()",
     "fetch"),
    ("reduce", lambda job: _source(job).key_by(lambda v: v).reduce(fetch_pair), "reduce()",
     "fetch_pair"),
    ("timestamps", lambda job: _source(job).assign_timestamps_and_watermarks(fetch),
     "assign_timestamps_and_watermarks()", "fetch"),
    ("async-__call__", lambda job: _source(job).map(AsyncCallable()), "map()",
     "AsyncCallable.__call__"),
    ("partial", lambda job: _source(job).map(functools.partial(fetch_pair, b=1)), "map()",
     "fetch_pair"),
    ("rich-map", lambda job: _source(job).map(AsyncMap()), "map()", "AsyncMap.map"),
    ("rich-open", lambda job: _source(job).map(AsyncOpen()), "map()", "AsyncOpen.open"),
    ("process_element", lambda job: _source(job).key_by(lambda v: v).process(AsyncProcess()),
     "process()", "AsyncProcess.process_element"),
    ("on_timer", lambda job: _source(job).key_by(lambda v: v).process(AsyncTimer()),
     "process()", "AsyncTimer.on_timer"),
    ("co-process_element2",
     lambda job: _source(job).connect(_source(job)).key_by(lambda v: v, lambda v: v)
     .process(AsyncSecondInput()), "process()", "AsyncSecondInput.process_element2"),
]  # fmt: skip

_DEFINITIONS = {
    "fetch": fetch,
    "fetch_pair": fetch_pair,
    "stream_words": stream_words,
    "AsyncCallable.__call__": AsyncCallable.__call__,
    "AsyncMap.map": AsyncMap.map,
    "AsyncOpen.open": AsyncOpen.open,
    "AsyncProcess.process_element": AsyncProcess.process_element,
    "AsyncTimer.on_timer": AsyncTimer.on_timer,
    "AsyncSecondInput.process_element2": AsyncSecondInput.process_element2,
}


@pytest.mark.parametrize(("build", "method", "function"), [c[1:] for c in BUILD_CASES],
                         ids=[c[0] for c in BUILD_CASES])  # fmt: skip
def test_async_user_functions_are_refused_when_the_job_is_built(
    build: Callable[[Any], Any], method: str, function: str
) -> None:
    with pytest.raises(JobDefinitionError) as info:
        build_graph(build, {}, 1)
    message = str(info.value)
    assert method in message
    assert function in message
    assert _line_of(_DEFINITIONS[function]) in message  # file:line of the definition
    assert "use stream.map_async(fn) or flat_map_async(fn)" in message
    assert "synchronous" in message


def test_synchronous_functions_generators_and_rich_functions_are_accepted() -> None:
    def words(line: str) -> Any:
        yield from line.split()

    class Upper(MapFunction[str, str]):
        def map(self, value: str) -> str:
            return value.upper()

    class Forward(KeyedProcessFunction[Any, Any, Any]):
        def process_element(
            self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
        ) -> None:
            out.collect(value)

    class Lookup:
        """A plain callable; its own async close() is never called by the runtime."""

        def __call__(self, value: str) -> str:
            return value

        async def close(self) -> None:
            pass

    def build(job: Any) -> None:
        (
            _source(job)
            .map(Upper())
            .map(Lookup())
            .flat_map(words)
            .filter(functools.partial(str.__ne__, "X"))
            .key_by(str.lower)
            .process(Forward())
            .sink_to(CollectSink())
        )

    build_graph(build, {}, 1)


# ------------------------------------------------------------------------------------------------
# run time: a synchronous function that returns an awaitable


CREATED: list[Any] = []


def _coroutine(value: Any) -> Any:
    """A synchronous call that returns a coroutine object (remembered, to check it was closed)."""
    coro = fetch(value)
    CREATED.append(coro)
    return coro


class ReturnsCoroutine(KeyedProcessFunction[Any, Any, Any]):
    def process_element(
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> Any:
        return _coroutine(value)


RUN_CASES: list[tuple[str, Callable[[Any], Any], str]] = [
    ("map", lambda s: s.map(_coroutine, name="fetcher"), "fetcher"),
    ("filter", lambda s: s.filter(_coroutine, name="fetcher"), "fetcher"),
    ("flat_map", lambda s: s.flat_map(_coroutine, name="fetcher"), "fetcher"),
    ("map_batches", lambda s: s.map_batches(lambda vs: [_coroutine(v) for v in vs],
                                            name="fetcher"), "fetcher"),
    ("flat_map_batches", lambda s: s.flat_map_batches(_coroutine, name="fetcher"), "fetcher"),
    ("timestamps", lambda s: s.assign_timestamps_and_watermarks(_coroutine, name="fetcher"),
     "fetcher"),
    # The partitioner runs the key selector, in the task of the operator before key_by().
    ("key_by", lambda s: s.key_by(_coroutine).map(lambda v: v), "Source: Collection"),
    ("reduce", lambda s: s.key_by(lambda v: v).reduce(lambda a, b: _coroutine(a), name="fetcher"),
     "fetcher"),
    ("process", lambda s: s.key_by(lambda v: v).process(ReturnsCoroutine(), name="fetcher"),
     "fetcher"),
]  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize(("shape", "operator"), [c[1:] for c in RUN_CASES],
                         ids=[c[0] for c in RUN_CASES])  # fmt: skip
async def test_a_function_returning_an_awaitable_fails_the_task_and_closes_it(
    shape: Callable[[Any], Any], operator: str
) -> None:
    CREATED.clear()
    sink = CollectSink()

    def build(job: Any) -> None:
        shape(job.from_source(CollectionSource(["a", "b", "a", "c"]))).sink_to(sink)

    graph = build_graph(build, {}, 1)
    with pytest.raises(JobFailedError) as info:
        await asyncio.wait_for(
            JobMaster(graph, ExecutionConfig(restart_strategy=NoRestart())).run(), WAIT_S
        )
    message = str(info.value)
    assert operator in message
    assert "1/1" in message  # the subtask
    assert "coroutine" in message
    assert "map_async" in message
    assert CREATED, "the function was called"
    assert all(inspect.getcoroutinestate(c) == inspect.CORO_CLOSED for c in CREATED)
    assert not any(inspect.iscoroutine(record) for record in sink.results)


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_refuses_an_async_map_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    job = tmp_path / "async_job.py"
    job.write_text(
        textwrap.dedent(
            """\
            from connectors import CollectionSource


            async def enrich(value):
                return value


            def build(job):
                job.from_source(CollectionSource([1, 2, 3])).map(enrich).print()
            """
        )
    )
    proc = run_cli("run", str(job))
    assert proc.returncode == 2, proc.stderr
    assert "invalid job" in proc.stderr
    assert "map()" in proc.stderr
    assert "enrich (async_job.py:4)" in proc.stderr
    assert "map_async" in proc.stderr
    assert "Traceback" not in proc.stderr
