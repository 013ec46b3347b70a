"""The web view: ``GET /plan`` from the job graph, and the page at ``GET /`` in a real headless
Chromium (the system's ``/usr/bin/chromium``, driven by Playwright) against a running job."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kafka_fixtures
import pytest
from cli_helpers import ROOT, get_json, run_command
from kafka_fixtures import WAIT_S, create_topics, produce, unique_name
from kafka_fixtures import wait_until as kafka_wait_until
from loop_helpers import (
    ControlledSource,
    HeldSink,
    running_job,
    start_job_on_master,
    take_checkpoint,
    word_count_job,
)

from connectors import CollectionSource, CollectSink
from connectors.kafka import KafkaSource
from runtime import OutputTag, ProcessFunction
from runtime.config import CheckpointConfig, ExecutionConfig
from runtime.master.alerts import CheckpointFailureThreshold
from runtime.master.coordinator import CheckpointFailedError
from runtime.plan.jobfile import build_graph
from runtime.shell.rest import ControlServer
from runtime.shell.web import PAGE_FILES, plan_json
from state.storage import CheckpointStorage

kafka_bootstrap = kafka_fixtures.kafka_bootstrap

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WEB_DIR = ROOT / "runtime" / "shell" / "web"
PAGE_TIMEOUT_MS = 20_000
REFRESH_MS = 200
"""The page's polling interval in the tests (a user's page polls every second)."""
COUNT_RECORDS_IN_IS = (
    "n => Number(document.querySelector('.operator[data-uid=\"word-counts\"]')"
    ".dataset.recordsIn) === n"
)
"""A page condition: the ``count`` operator's records in, as the graph shows them, are ``n``."""
LAG_SHOWN_PER_PARTITION_AND_ON_THE_VERTEX = """partitions => {
    const lags = [...document.querySelectorAll('#source-lag tbody td:nth-child(3)')]
        .map(cell => Number(cell.textContent.replace(/,/g, '')));
    if (lags.length !== partitions || !lags.every(lag => lag > 0)) return false;
    const total = lags.reduce((a, b) => a + b, 0).toLocaleString('en-US');
    return document.querySelector('.vertex[data-vertex-id="0"] .lag').textContent
        === `lag ${total} records`;
}"""
"""A page condition: each of ``partitions`` partitions lags, and the source vertex shows the sum
(checked in one go: a poll redraws both together)."""
DURATION = r"[\d,]+(\.\d)? m?s"


def test_plan_lists_vertices_with_their_chained_operators_and_the_edges_partitioners() -> None:
    graph = build_graph(word_count_job(ControlledSource("lines"), CollectSink()), {}, 1)
    assert plan_json(graph) == {
        "job": graph.name,
        "vertices": [
            {
                "id": 0,
                "name": "lines -> split words",
                "parallelism": 1,
                "operators": [
                    {"uid": graph.vertices[0].operators[0].uid, "name": "lines"},
                    {"uid": graph.vertices[0].operators[1].uid, "name": "split words"},
                ],
            },
            {
                "id": 1,
                "name": "count",
                "parallelism": 2,
                "operators": [{"uid": "word-counts", "name": "count"}],
            },
            {
                "id": 2,
                "name": "counts sink",
                "parallelism": 1,
                "operators": [{"uid": graph.vertices[2].operators[0].uid, "name": "counts sink"}],
            },
        ],
        "edges": [
            {"source": 0, "target": 1, "partitioner": "hash", "side_output": None},
            {"source": 1, "target": 2, "partitioner": "rebalance", "side_output": None},
        ],
    }


class _EvenOddSplit(ProcessFunction[int, int]):
    def process_element(self, value: int, ctx: Any, out: Any) -> None:
        if value % 2:
            ctx.output(ODD, value)
        else:
            out.collect(value)


ODD = OutputTag("odd")


def test_plan_shows_a_side_output_as_an_edge_of_its_own() -> None:
    def build(job: Any) -> None:
        numbers = job.from_source(CollectionSource([1, 2, 3]), name="numbers").process(
            _EvenOddSplit(), name="split"
        )
        numbers.broadcast().sink_to(CollectSink(), name="evens")
        numbers.get_side_output(ODD).sink_to(CollectSink(), name="odds")

    plan = plan_json(build_graph(build, {}, 1))
    names = {v["id"]: v["name"] for v in plan["vertices"]}
    edges = {
        (names[e["source"]], names[e["target"]], e["partitioner"], e["side_output"])
        for e in plan["edges"]
    }
    assert edges == {
        ("numbers -> split", "evens", "broadcast", None),
        ("numbers -> split", "odds", "forward", "odd"),
    }, plan


@contextlib.asynccontextmanager
async def control_endpoint(master: Any) -> AsyncIterator[str]:
    server = ControlServer(master, lambda: None, port=0)
    address = await server.start()
    try:
        yield address
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_plan_and_page_files_are_served_on_the_control_endpoint() -> None:
    source = ControlledSource("lines")
    master, job = await start_job_on_master(
        word_count_job(source, CollectSink()), ExecutionConfig(), name="served"
    )
    try:
        async with control_endpoint(master) as address:
            plan = await asyncio.to_thread(get_json, address, "/plan")
            assert plan == plan_json(master.graph)
            # /status numbers the vertices as /plan does.
            vertex_of = {op["uid"]: v["id"] for v in plan["vertices"] for op in v["operators"]}
            status = await asyncio.to_thread(get_json, address, "/status")
            assert {op["uid"]: op["vertex"] for op in status["operators"]} == vertex_of
            for route, (file_name, content_type) in PAGE_FILES.items():
                headers, body = await asyncio.to_thread(_get, address, route)
                assert headers["Content-Type"].startswith(content_type), (route, headers)
                assert "default-src 'self'" in headers["Content-Security-Policy"]
                assert body == (WEB_DIR / file_name).read_bytes(), route
    finally:
        source.end()
        await job


def _get(address: str, path: str) -> tuple[dict[str, str], bytes]:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as response:
        return dict(response.headers), response.read()


def test_the_page_needs_nothing_from_another_origin() -> None:
    """The machine running a job may have no internet: no CDN, no remote font or script."""
    for file_name, _ in PAGE_FILES.values():
        text = (WEB_DIR / file_name).read_text()
        addresses = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"'<>)]*", text))
        assert addresses <= {"http://www.w3.org/2000/svg"}, (file_name, addresses)
        assert "@import" not in text, file_name


def test_the_page_files_are_installed_with_the_package(tmp_path: Path) -> None:
    """setuptools' build_py (what a wheel or an install copies) takes the page's files along."""
    built = run_command(
        [
            sys.executable,
            "-c",
            "from setuptools import setup; setup()",
            "-q",
            "build_py",
            "--build-lib",
            str(tmp_path),
        ]
    )
    assert built.returncode == 0, built.stderr
    installed = tmp_path / "runtime" / "shell" / "web"
    for file_name, _ in PAGE_FILES.values():
        assert (installed / file_name).read_bytes() == (WEB_DIR / file_name).read_bytes()


@contextlib.asynccontextmanager
async def chromium_page() -> AsyncIterator[tuple[Any, list[str]]]:
    """A page in the system's headless Chromium, driven by Playwright, and the errors its script
    raised or its console logged so far; fails (never skips) when either is missing, since CI
    installs both."""
    try:
        from playwright.async_api import async_playwright
    except ImportError as exc:
        pytest.fail(f"the playwright package is missing ({exc}): pip install -e '.[dev]'")
    async with async_playwright() as playwright:
        try:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as exc:
            pytest.fail(
                f"cannot launch headless Chromium at {CHROMIUM} with Playwright ({exc}); "
                "install the system package (apt-get install chromium, as .ci/run does)"
            )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on(
                "console",
                lambda message: errors.append(message.text) if message.type == "error" else None,
            )
            yield page, errors
        finally:
            await browser.close()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_the_page_renders_the_running_job_live_in_a_real_browser(tmp_path: Path) -> None:
    source = ControlledSource("lines")
    sink = HeldSink()
    alerting = CheckpointConfig(
        tolerable_failures=10, alert_on_failures=CheckpointFailureThreshold(1, 600.0)
    )
    master, job = await start_job_on_master(
        word_count_job(source, sink),
        # Few buffers in flight, so that a few thousand lines fill the channels behind the held
        # sink and the source turns red too.
        ExecutionConfig(checkpoint=alerting, exclusive_credits=2, floating_buffers=8),
        name="web-view",
        storage=CheckpointStorage(tmp_path / "chk", "web-view"),
    )
    plan = plan_json(master.graph)
    try:
        async with chromium_page() as (page, errors):
            endpoint = control_endpoint(master)
            address = await endpoint.__aenter__()
            await page.goto(f"http://{address}/?refresh={REFRESH_MS}")

            # The graph: every vertex with its chained operators, parallelism and edges.
            await page.wait_for_selector('#connection[data-state="live"]')
            names = await page.locator(".vertex .operator-name").all_text_contents()
            assert names == [op["name"] for v in plan["vertices"] for op in v["operators"]]
            assert await page.locator(".vertex").count() == 3
            parallelism = await page.locator(".vertex .parallelism").all_text_contents()
            assert parallelism == ["parallelism 1", "parallelism 2", "parallelism 1"]
            labels = await page.locator(".edges .edge-label").all_text_contents()
            assert labels == ["hash", "rebalance"]
            assert await page.text_content("#job-name") == "web-view"
            assert await page.text_content("#job-status") == "running"

            # Live counts: the page follows the records as they arrive.
            source.push("to be or not to be")
            await page.wait_for_function(COUNT_RECORDS_IN_IS, arg=6)
            source.push("that is the question", "whether tis nobler")
            await page.wait_for_function(COUNT_RECORDS_IN_IS, arg=13)
            counts = await page.text_content('.operator[data-uid="word-counts"] .operator-counts')
            assert counts is not None and counts.startswith("in 13"), counts
            row = page.locator('#operators tr[data-uid="word-counts"]')
            assert (await row.locator("td").nth(3).text_content()) == "13"
            await page.click("#subtasks-section summary")
            subtasks = page.locator('#subtasks tr[data-uid="word-counts"]')
            assert await subtasks.count() == 2
            per_subtask = [
                await r.locator("td").nth(3).text_content() for r in await subtasks.all()
            ]
            assert sum(int(n or "") for n in per_subtask) == 13, per_subtask

            # The checkpoint history: a completed checkpoint with its duration and size.
            checkpoint = await take_checkpoint(master)
            history_row = page.locator(
                f'tr.checkpoint-row[data-checkpoint-id="{checkpoint.checkpoint_id}"]'
                '[data-status="completed"]'
            )
            await history_row.wait_for()
            duration = await history_row.locator("td.duration").text_content()
            assert re.fullmatch(DURATION, duration or ""), duration
            size = await history_row.locator("td.size").text_content()
            assert size is not None and size.endswith("B") and size != "0 B", size
            alignment = await history_row.locator("td.alignment").text_content()
            assert re.fullmatch(DURATION, alignment or ""), alignment
            snapshot = await history_row.locator("td.snapshot").text_content()
            assert re.fullmatch(DURATION, snapshot or ""), snapshot

            # A failed checkpoint raises the alert: a banner, and a failed row saying why; the
            # next completed checkpoint clears it.
            sink.fail_snapshots = True
            with pytest.raises(CheckpointFailedError, match="held sink fails"):
                await take_checkpoint(master)
            sink.fail_snapshots = False
            banner = page.locator("#alert")
            await banner.wait_for(state="visible")
            assert "web-view" in (await banner.text_content() or "")
            failed = page.locator('tr.checkpoint-row[data-status="failed"] td.failure')
            assert "held sink fails" in (await failed.text_content() or "")
            await take_checkpoint(master)
            await banner.wait_for(state="hidden")

            # Colours: while nothing holds the job back, every vertex is green.
            for vertex_id in range(3):
                await page.wait_for_selector(f'.vertex[data-vertex-id="{vertex_id}"].bp-ok')

            # The sink stops taking records: the vertex feeding it waits for credit and turns
            # red, and so does the source once its own output fills; the sink itself is busy.
            sink.release.clear()
            source.push(*["to be or not to be"] * 3000)
            await page.wait_for_selector('.vertex[data-vertex-id="1"].bp-high')
            await page.wait_for_selector('.vertex[data-vertex-id="0"].bp-high')
            held = page.locator('.vertex[data-vertex-id="1"] .backpressure')
            shown = re.fullmatch(r"backpressured ([\d,]+) ms/s", await held.text_content() or "")
            assert shown is not None and int(shown.group(1).replace(",", "")) >= 500, shown
            assert await page.get_attribute('.vertex[data-vertex-id="2"]', "data-backpressure") == (
                "ok"
            )
            for vertex in await page.locator(".vertex").all():
                level = await vertex.get_attribute("data-backpressure")
                colour = await vertex.evaluate("box => getComputedStyle(box).borderLeftColor")
                swatch = await page.evaluate(
                    "level => getComputedStyle(document.querySelector('.swatch.bp-' + level))"
                    ".backgroundColor",
                    level,
                )
                assert colour == swatch, (level, colour, swatch)
            levels = await page.evaluate("[99, 100, 499, 500, null].map(backpressureLevel)")
            assert levels == ["ok", "warn", "warn", "high", "unknown"]

            screenshot = tmp_path / "web-view.png"
            await page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert screenshot.stat().st_size > 10_000

            assert errors == []  # no script error, no refused (CSP) or missing resource

            # The job ends and its endpoint goes away: the page says so instead of going stale.
            sink.release.set()
            source.end()
            await job
            await endpoint.__aexit__(None, None, None)
            await page.wait_for_selector('#connection[data-state="lost"]')
            assert "job ended" in (await page.text_content("#connection") or "")
    finally:
        if not job.done():
            job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job


@pytest.mark.slow
@pytest.mark.asyncio
async def test_the_page_shows_the_kafka_lag_of_each_partition(kafka_bootstrap: str) -> None:
    topic = unique_name("web-lag")
    await create_topics(kafka_bootstrap, topic, partitions=2)
    count = 20_000
    await produce(
        kafka_bootstrap,
        topic,
        [{"value": b"%d" % i, "partition": i % 2} for i in range(count)],
        linger_ms=20,
    )
    sink = HeldSink(held=True)

    def build(job: Any) -> None:
        source = job.from_source(KafkaSource(kafka_bootstrap, topic, bounded=True), name="events")
        source.rebalance().sink_to(sink, name="held")

    async with running_job(build, config=ExecutionConfig(buffer_size=256)) as (master, job):
        await kafka_wait_until(lambda: sink.entered.is_set(), "the first write", job)
        async with control_endpoint(master) as address, chromium_page() as (page, errors):
            await page.goto(f"http://{address}/?refresh={REFRESH_MS}")
            # The sink holds every record: the source stops reading, far behind the end. The
            # source vertex shows the sum of its partitions' lag in the table.
            await page.wait_for_function(LAG_SHOWN_PER_PARTITION_AND_ON_THE_VERTEX, arg=2)
            rows = await page.locator("#source-lag tbody tr").all()
            partitions = [await row.locator("td").nth(1).text_content() for row in rows]
            assert sorted(partitions) == [f"{topic}[0]", f"{topic}[1]"]
            lags = [await row.locator("td").nth(2).text_content() or "" for row in rows]
            assert sum(int(lag.replace(",", "")) for lag in lags) <= count, lags
            assert errors == []
        sink.release.set()
        await asyncio.wait_for(job, WAIT_S)
