"""Who may talk to a job's control endpoint, and where it may write savepoints.

The endpoint is safe by default against the attacks a local HTTP server meets:

- **Tokens.** Each job generates a bearer token at start (:func:`generate_token`, from
  :mod:`secrets`) and keeps it in memory and in its owner-only registry entry
  (:mod:`runtime.shell.registry`), where the CLI finds it. Every request that changes something
  (any method but GET, HEAD and OPTIONS: ``POST /savepoints``, ``/stop``, ``/cancel``) must carry
  ``Authorization: Bearer <token>`` (401 otherwise). Read-only routes stay open on loopback.
- **Content-Type.** Such requests must send ``application/json`` (415 otherwise): a web page's
  form cannot, without a CORS preflight this endpoint never grants.
- **Host and Origin.** On a loopback address, the ``Host`` header must name the bound address
  (``127.0.0.1:PORT``, ``[::1]:PORT`` or ``localhost:PORT``), so a DNS-rebound name serves a
  page nothing (403); a foreign ``Origin`` is refused on every route (403), so another site's
  page can neither trigger nor read.
- **Non-loopback addresses** (``--rest-host 0.0.0.0``) log a warning and need the token on
  every route: the Host check means nothing there (other machines use names of their own), the
  token does. The traffic is plain HTTP: keep such an endpoint behind a firewall or a TLS proxy.
- **Savepoint targets** (:class:`SavepointTargets`): a relative ``dir`` is taken inside the
  job's savepoint directory; any path that ends up outside it (absolute, ``..``, a symlink) is
  refused (403) unless it lies in a directory the operator allowed at start
  (``--allow-savepoint-dir``), since the job would write there with its own privileges.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from aiohttp import web

log = logging.getLogger(__name__)

TOKEN_ENV = "PYFLOW_TOKEN"
READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def generate_token() -> str:
    """A fresh control token (256 random bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address to bind or a name) reaches only this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def format_address(host: str, port: int) -> str:
    """``HOST:PORT`` as a URL writes it (an IPv6 address in brackets)."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        version = 4
    return f"[{host}]:{port}" if version == 6 else f"{host}:{port}"


class ControlSecurity:
    """The token, Content-Type, Host and Origin rules of one control endpoint, applied by
    :attr:`middleware` (an aiohttp middleware). ``port`` is set once the server is bound."""

    def __init__(self, host: str, token: str) -> None:
        self.host = host
        self.token = token
        self.port = 0
        self.loopback = is_loopback(host)

    def warn_if_exposed(self) -> None:
        if not self.loopback:
            log.warning(
                "the control endpoint listens on %s, which other machines may reach: every "
                "request needs the job's token (in its registry entry; python -m runtime reads "
                "it), and the traffic is not encrypted, so keep it behind a firewall or a TLS "
                "proxy",
                format_address(self.host, self.port),
            )

    def allowed_hosts(self) -> set[str]:
        """The ``Host`` values that name this endpoint (loopback only)."""
        port = self.port
        names = {format_address(self.host.lower(), port), f"localhost:{port}"}
        if self.host.lower() == "localhost":
            names |= {f"127.0.0.1:{port}", f"[::1]:{port}"}
        return names

    def refusal(self, request: web.Request) -> web.Response | None:
        """The error answer for ``request``, or None if it may be served."""
        host = request.headers.get("Host", "").lower()
        if self.loopback and host not in self.allowed_hosts():
            expected = " or ".join(sorted(self.allowed_hosts()))
            return _error(403, f"the Host header {host or '(none)'!r} is not {expected}")
        origin = request.headers.get("Origin")
        if origin is not None and not self._own_origin(origin.lower(), host):
            return _error(403, f"requests from the origin {origin!r} are refused")
        mutating = request.method not in READ_ONLY_METHODS
        if mutating or not self.loopback:
            refused = self._token_refusal(request)
            if refused is not None:
                return refused
        if mutating and request.content_type != "application/json":
            return _error(415, f"the body must be application/json, not {request.content_type}")
        return None

    def _own_origin(self, origin: str, host: str) -> bool:
        hosts = self.allowed_hosts() if self.loopback else {host}
        return origin in {f"http://{name}" for name in hosts}

    def _token_refusal(self, request: web.Request) -> web.Response | None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        where = (
            "python -m runtime savepoint/stop/cancel read it from the job registry; elsewhere "
            f"pass --token or set ${TOKEN_ENV}"
        )
        if scheme.lower() != "bearer" or not given:
            response = _error(401, f"this request needs the job's token ({where})")
            response.headers["WWW-Authenticate"] = 'Bearer realm="pyflow"'
            return response
        if not secrets.compare_digest(given.strip().encode(), self.token.encode()):
            response = _error(401, f"wrong token for this job ({where})")
            response.headers["WWW-Authenticate"] = 'Bearer realm="pyflow", error="invalid_token"'
            return response
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        refused = self.refusal(request)
        if refused is not None:
            return refused
        return await handler(request)


class SavepointTargetRefused(ValueError):
    """A savepoint target outside the savepoint directory and the allowed ones."""


class SavepointTargets:
    """Where savepoints may go: ``savepoint_dir`` (relative targets are taken inside it) and the
    ``allowed`` directories, each with everything below it."""

    def __init__(self, savepoint_dir: str | None, allowed: Sequence[str] = ()) -> None:
        self.savepoint_dir = Path(os.path.realpath(savepoint_dir)) if savepoint_dir else None
        self.allowed = [Path(os.path.realpath(directory)) for directory in allowed]

    def resolve(self, target: str) -> str:
        """The real absolute folder for ``target``; raises :class:`SavepointTargetRefused`
        saying why and what to do."""
        path = Path(target)
        if not path.is_absolute():
            if self.savepoint_dir is None:
                msg = (
                    f"the savepoint target {target} is relative and the job has no savepoint "
                    "directory (run --savepoint-dir or --checkpoint-dir): give an absolute "
                    "directory allowed with --allow-savepoint-dir"
                )
                raise SavepointTargetRefused(msg)
            path = self.savepoint_dir / path
        real = Path(os.path.realpath(path))
        roots = [self.savepoint_dir, *self.allowed] if self.savepoint_dir else self.allowed
        if any(real.is_relative_to(root) for root in roots):
            return str(real)
        msg = f"the savepoint target {target} is outside {self._roots()}; {self._what_to_do(str(real))}"
        raise SavepointTargetRefused(msg)

    def _roots(self) -> str:
        named = (
            [f"the job's savepoint directory {self.savepoint_dir}"] if self.savepoint_dir else []
        )
        named += [f"{directory} (allowed)" for directory in self.allowed]
        return ", ".join(named) if named else "every directory the job may write savepoints to"

    def _what_to_do(self, real: str) -> str:
        inside = f"give a folder inside {self.savepoint_dir}, or " if self.savepoint_dir else ""
        return f"{inside}start the job with --allow-savepoint-dir {real} to allow it"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
