"""The control endpoint refuses what a careful operator would not allow (see
``runtime.shell.security``): no mutating request without the job's token, no body that is not
JSON, no foreign Host (DNS rebinding) or Origin (CSRF), no savepoint outside the savepoint
directory unless allowed at start, and a non-loopback bind warns and needs the token everywhere.
The CLI still works, with the token found in the registry, given with --token or in
$PYFLOW_TOKEN."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cli_helpers import control_request, post_json, run_cli
from loop_helpers import running_job, serving_control, wait_until

from connectors import CollectSink, GeneratorSource
from runtime.master.jobmaster import JobMaster
from runtime.shell.rest import ControlServer
from runtime.shell.security import TOKEN_ENV
from state.storage import load_checkpoint

JSON = {"Content-Type": "application/json"}


def build(job: Any) -> None:
    job.from_source(GeneratorSource(lambda i: i, rate=200)).uid("numbers").sink_to(CollectSink())


class Endpoint:
    """A running job's control endpoint, and whether a cancel reached the job."""

    def __init__(self, master: JobMaster, server: ControlServer, address: str) -> None:
        self.master, self.server, self.address = master, server, address
        self.cancels = 0

    def bearer(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.server.token}"}

    async def request(
        self, method: str, path: str, body: Any = None, **headers: str
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        return await asyncio.to_thread(
            control_request, self.address, method, path, data, dict(headers)
        )


@pytest_asyncio.fixture
async def endpoint(tmp_path: Path) -> AsyncIterator[Endpoint]:
    async with running_job(build) as (master, job):
        await wait_until(
            lambda: bool(master.tasks) and all(t.state.value == "running" for t in master.tasks),
            "every task to run",
            job,
        )
        holder: list[Endpoint] = []

        def cancel() -> None:
            holder[0].cancels += 1

        options = {
            "savepoint_dir": str(tmp_path / "savepoints"),
            "allowed_savepoint_dirs": (str(tmp_path / "allowed"),),
        }
        async with serving_control(master, cancel, **options) as (server, address):
            holder.append(Endpoint(master, server, address))
            yield holder[0]


def headers(*parts: dict[str, str]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for part in parts:
        merged.update(part)
    return merged


MUTATING = [("/savepoints", {"dir": "sp"}), ("/stop", {"dir": "sp"}), ("/cancel", {})]


@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "body"), MUTATING)
async def test_a_mutating_request_without_the_token_is_refused(
    endpoint: Endpoint, path: str, body: dict[str, Any], tmp_path: Path
) -> None:
    status, answer = await endpoint.request("POST", path, body, **JSON)
    assert status == 401, answer
    assert "needs the job's token" in answer["error"]
    status, answer = await endpoint.request(
        "POST", path, body, **headers(JSON, endpoint.bearer("not-the-token"))
    )
    assert status == 401, answer
    assert "wrong token" in answer["error"]
    assert endpoint.cancels == 0
    assert endpoint.master.status == "running"
    assert not (tmp_path / "savepoints").exists()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_a_body_that_is_not_json_is_refused(endpoint: Endpoint, content_type: str) -> None:
    status, answer = await endpoint.request(
        "POST", "/cancel", {}, **headers({"Content-Type": content_type}, endpoint.bearer())
    )
    assert status == 415, answer
    assert "application/json" in answer["error"]
    assert endpoint.cancels == 0


@pytest.mark.asyncio
async def test_a_foreign_host_is_refused(endpoint: Endpoint) -> None:
    port = endpoint.server.port
    for path in ("/status", "/checkpoints"):
        status, answer = await endpoint.request("GET", path, Host=f"rebound.example:{port}")
        assert status == 403, answer
        assert "Host header" in answer["error"]
    status, answer = await endpoint.request(
        "POST", "/cancel", {}, **headers(JSON, endpoint.bearer(), {"Host": "rebound.example"})
    )
    assert status == 403, answer
    assert endpoint.cancels == 0
    # Both names of the bound loopback address are served.
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        status, answer = await endpoint.request("GET", "/status", Host=host)
        assert status == 200, answer


@pytest.mark.asyncio
async def test_a_foreign_origin_is_refused(endpoint: Endpoint) -> None:
    status, answer = await endpoint.request("GET", "/status", Origin="https://evil.example")
    assert status == 403, answer
    assert "origin" in answer["error"]
    status, answer = await endpoint.request(
        "POST", "/cancel", {}, **headers(JSON, endpoint.bearer(), {"Origin": "null"})
    )
    assert status == 403, answer
    assert endpoint.cancels == 0
    # The endpoint's own page (same origin) may ask.
    own = {"Origin": f"http://{endpoint.address}"}
    status, answer = await endpoint.request("GET", "/status", **own)
    assert status == 200, answer
    status, answer = await endpoint.request(
        "POST", "/cancel", {}, **headers(JSON, endpoint.bearer(), own)
    )
    assert status == 200, answer
    assert endpoint.cancels == 1


@pytest.mark.asyncio
async def test_read_only_routes_stay_open_on_loopback(endpoint: Endpoint) -> None:
    for path in ("/status", "/checkpoints"):
        status, answer = await endpoint.request("GET", path)
        assert status == 200, answer


@pytest.mark.asyncio
async def test_savepoints_go_only_into_the_savepoint_dir_or_an_allowed_one(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    savepoints, allowed, outside = tmp_path / "savepoints", tmp_path / "allowed", tmp_path / "out"
    savepoints.mkdir()
    (savepoints / "link").symlink_to(outside, target_is_directory=True)
    refused = [str(outside), "../out", f"{savepoints}/../out", "link/sp", "/etc/cron.d"]
    for target in refused:
        status, answer = await asyncio.to_thread(
            post_json, endpoint.address, "/savepoints", {"dir": target}, endpoint.server.token
        )
        assert status == 403, (target, answer)
        assert f"the savepoint target {target} is outside" in answer["error"]
        assert "--allow-savepoint-dir" in answer["error"]
    assert not outside.exists()

    for target, parent in [
        ("nightly", savepoints / "nightly"),
        (str(allowed / "x"), allowed / "x"),
    ]:
        status, answer = await asyncio.to_thread(
            post_json, endpoint.address, "/savepoints", {"dir": target}, endpoint.server.token
        )
        assert status == 200, (target, answer)
        assert Path(answer["path"]).parent == parent
        assert load_checkpoint(answer["path"]).checkpoint_id == answer["id"]


@pytest.mark.asyncio
async def test_a_non_loopback_bind_warns_and_needs_the_token_on_every_route(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_job(build) as (master, _):
        with caplog.at_level(logging.WARNING, logger="runtime.shell.security"):
            async with serving_control(master, host="0.0.0.0") as (server, _):
                address = f"127.0.0.1:{server.port}"
                [warning] = [r for r in caplog.records if r.name == "runtime.shell.security"]
                assert warning.levelno == logging.WARNING
                assert f"0.0.0.0:{server.port}" in warning.getMessage()
                assert "every request needs the job's token" in warning.getMessage()
                for path in ("/status", "/checkpoints"):
                    status, answer = await asyncio.to_thread(control_request, address, "GET", path)
                    assert status == 401, answer
                bearer = {"Authorization": f"Bearer {server.token}"}
                status, answer = await asyncio.to_thread(
                    control_request, address, "GET", "/status", None, bearer
                )
                assert status == 200, answer
                assert answer["job"] == master.graph.name


@pytest.mark.asyncio
async def test_the_cli_sends_the_token_given_on_the_command_line_or_in_the_environment(
    endpoint: Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job the registry does not list (a remote one, say) needs --token or $PYFLOW_TOKEN."""
    target = str(tmp_path / "savepoints")
    args = ("savepoint", "--address", endpoint.address, "--dir", target)
    without = await asyncio.to_thread(run_cli, *args)
    assert without.returncode == 1
    assert "HTTP 401" in without.stderr and "--token" in without.stderr
    given = await asyncio.to_thread(run_cli, *args, "--token", endpoint.server.token)
    assert given.returncode == 0, given.stderr
    assert f"written to {target}/savepoint-" in given.stdout
    monkeypatch.setenv(TOKEN_ENV, endpoint.server.token)
    cancel = await asyncio.to_thread(run_cli, "cancel", "--address", endpoint.address)
    assert cancel.returncode == 0, cancel.stderr
    assert endpoint.cancels == 1
