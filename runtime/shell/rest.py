"""The control endpoint of a running job: HTTP + JSON on localhost, served by aiohttp.

Routes:

- ``GET /status``: job status, attempt, tasks and their states (and the TaskManager each runs in,
  ``null`` when every subtask runs in the job's process), the TaskManagers (id, pid, host, slots,
  state, subtasks; none without ``--taskmanagers``), records in/out per operator, each operator's
  current output watermark and whether it is idle (``watermark``, ``idle``; per subtask in
  ``subtasks``; watermarks in ms, ``null`` before the first), and per source task the lag of each
  split (Kafka: records behind each partition's high watermark). From the job's metrics snapshot
  (``runtime.master.metrics``): uptime, restarts, checkpoint counts and the last one's duration and
  size, the checkpoint failure alert; per operator and subtask rates, busy/idle/backpressured ms
  per second, input watermarks, queues and credit.
- ``GET /metrics``: the same figures in the Prometheus text format (``runtime.shell.metrics_http``).
- ``GET /checkpoints``: counts, the latest completed checkpoint, and the history (id, kind,
  status, trigger time, duration, alignment and snapshot time per task, state size, failure).
- ``POST /savepoints`` with ``{"dir": DIR}``: take a savepoint into DIR; answers with its path.
- ``POST /stop`` with ``{"dir": DIR, "drain": bool}``: stop with a savepoint; answers with its path.
- ``POST /cancel``: cancel the job (``close()`` runs, ``finish()`` does not).
- ``GET /plan`` and the web view at ``GET /`` (:mod:`runtime.shell.web`).
- ``GET /state/{uid}?key=K``: the key's state as of the latest completed checkpoint
  (:mod:`runtime.shell.queryable`).

It binds to 127.0.0.1 unless told otherwise. POST routes need the job's token, JSON bodies, and
savepoint targets inside the job's savepoint directory; see :mod:`runtime.shell.security`.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from runtime.config import DEFAULT_REST_HOST, DEFAULT_REST_PORT
from runtime.master.coordinator import CheckpointFailedError, CheckpointStatus
from runtime.shell import registry
from runtime.shell.metrics_http import MetricsEndpoint
from runtime.shell.queryable import add_state_routes
from runtime.shell.security import (
    TOKEN_ENV,
    ControlSecurity,
    SavepointTargetRefused,
    SavepointTargets,
    format_address,
    generate_token,
)
from runtime.shell.web import add_web_routes
from state.storage import CheckpointKind, CompletedCheckpoint


class ControlServer:
    """The control endpoint of ``master``. ``token`` (a fresh one if not given) guards it;
    savepoint targets must lie in ``savepoint_dir`` or in one of ``allowed_savepoint_dirs``."""

    def __init__(
        self,
        master: Any,
        cancel: Callable[[], None],
        host: str = DEFAULT_REST_HOST,
        port: int = DEFAULT_REST_PORT,
        token: str | None = None,
        savepoint_dir: str | None = None,
        allowed_savepoint_dirs: tuple[str, ...] = (),
    ) -> None:
        self.master = master
        self._cancel = cancel
        self.host = host
        self.port = port
        self.token = token or generate_token()
        self.security = ControlSecurity(host, self.token)
        self.savepoint_targets = SavepointTargets(savepoint_dir, allowed_savepoint_dirs)
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Start serving; returns ``host:port`` (the real port when 0 was asked for)."""
        app = web.Application(middlewares=[self.security.middleware])
        app.router.add_get("/status", self._status)
        app.router.add_get("/checkpoints", self._checkpoints)
        app.router.add_get("/metrics", MetricsEndpoint(self.master).handle)
        app.router.add_post("/savepoints", self._savepoint)
        app.router.add_post("/stop", self._stop)
        app.router.add_post("/cancel", self._cancel_job)
        add_web_routes(app, self.master.graph)
        add_state_routes(app, self.master)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server: Any = site._server
        self.port = self.security.port = server.sockets[0].getsockname()[1]
        self.security.warn_if_exposed()
        return format_address(self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _status(self, request: web.Request) -> web.Response:
        master = self.master
        return web.json_response(
            {
                **master.metrics_snapshot().status_json(),
                "tasks": [
                    {
                        "name": t.name,
                        "state": t.state.value,
                        "taskmanager": master.deployment.taskmanager_of(t.task_id),
                    }
                    for t in master.handles
                ],
                "taskmanagers": master.deployment.taskmanagers(),
            }
        )

    async def _checkpoints(self, request: web.Request) -> web.Response:
        coordinator = self.master.coordinator
        history = [s.to_json() for s in coordinator.history]
        counts = {
            status.value: sum(1 for s in coordinator.history if s.status is status)
            for status in CheckpointStatus
        }
        latest = coordinator.latest_completed
        return web.json_response(
            {
                "counts": counts,
                "latest_completed": None
                if latest is None
                else {
                    "id": latest.checkpoint_id,
                    "path": latest.path,
                    "state_size": latest.state_size,
                },
                "history": history,
            }
        )

    async def _answer_with_savepoint(
        self,
        request: web.Request,
        take: Callable[[str, dict[str, Any]], Awaitable[CompletedCheckpoint]],
    ) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = {}
        target = body.get("dir")
        if not target or not isinstance(target, str):
            return web.json_response({"error": 'the request needs {"dir": DIR}'}, status=400)
        try:
            target = self.savepoint_targets.resolve(target)
        except SavepointTargetRefused as exc:
            return web.json_response({"error": str(exc)}, status=403)
        try:
            checkpoint = await take(target, body)
        except CheckpointFailedError as exc:
            return web.json_response({"error": str(exc)}, status=500)
        return web.json_response({"id": checkpoint.checkpoint_id, "path": checkpoint.path})

    async def _savepoint(self, request: web.Request) -> web.Response:
        coordinator = self.master.coordinator
        return await self._answer_with_savepoint(
            request, lambda target, _: coordinator.request_trigger(CheckpointKind.SAVEPOINT, target)
        )

    async def _stop(self, request: web.Request) -> web.Response:
        return await self._answer_with_savepoint(
            request,
            lambda target, body: self.master.stop_with_savepoint(target, bool(body.get("drain"))),
        )

    async def _cancel_job(self, request: web.Request) -> web.Response:
        asyncio.get_running_loop().call_soon(self._cancel)
        return web.json_response({"status": "cancelling"})


class ControlClientError(RuntimeError):
    pass


def call(
    address: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    timeout: float = 600.0,
    token: str | None = None,
) -> Any:
    """A blocking JSON request to a job's control endpoint, for the CLI. The bearer token is
    ``token``, else the one of the job registered at ``address``, else ``$PYFLOW_TOKEN``."""
    url = f"http://{address}{path}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    token = token or control_token(address)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", "")
        except (ValueError, AttributeError):
            detail = ""
        msg = f"{method} {url} failed: HTTP {exc.code} {detail}".strip()
        raise ControlClientError(msg) from None
    except (urllib.error.URLError, OSError) as exc:
        msg = f"cannot reach the job at {address}: {exc}; is it running with that --rest-port?"
        raise ControlClientError(msg) from None


def control_token(address: str) -> str | None:
    """The token of the job whose control endpoint is ``address``: from its registry entry, else
    ``$PYFLOW_TOKEN`` (a job of another user or machine)."""
    job = registry.find_by_address(address)
    return job.token if job is not None else os.environ.get(TOKEN_ENV) or None
