"""The web view of a running job: ``GET /plan`` (its job graph as JSON) and the page at ``GET /``.

The page is three static files of this package (``index.html``, ``app.js``, ``style.css``), served
as they are: no build step, nothing fetched from elsewhere (the Content-Security-Policy allows
this origin only). Its script polls the read-only routes ``/plan``, ``/status`` and
``/checkpoints`` every second (``/?refresh=MS`` for another interval) and draws what they say; it
computes no metric of its own.

``GET /plan`` is static for the job's lifetime::

    {"job": name,
     "vertices": [{"id": int, "name": str, "parallelism": int,
                   "operators": [{"uid": str, "name": str}]}],
     "edges": [{"source": vertex id, "target": vertex id,
                "partitioner": "forward" | "hash" | "rebalance" | "broadcast" | ...,
                "side_output": str | null}]}

A vertex id is the vertex's position in the job graph's topological order (a chain of operators
run by one task); its operators are listed head first, in chain order.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from aiohttp import web

from runtime.plan.graph import JobGraph

PAGE_FILES = {
    "/": ("index.html", "text/html"),
    "/app.js": ("app.js", "text/javascript"),
    "/style.css": ("style.css", "text/css"),
}
"""Route -> (file of this package, content type) of the page."""

_PAGE_HEADERS = {
    # Everything the page needs comes from this origin: no CDN, no inline script.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


def plan_json(graph: JobGraph) -> dict[str, Any]:
    """The job graph as ``GET /plan`` answers it (see the module docstring)."""
    vertex_ids = {id(vertex): index for index, vertex in enumerate(graph.vertices)}
    return {
        "job": graph.name,
        "vertices": [
            {
                "id": vertex_ids[id(vertex)],
                "name": vertex.name,
                "parallelism": vertex.parallelism,
                "operators": [{"uid": op.uid, "name": op.name} for op in vertex.operators],
            }
            for vertex in graph.vertices
        ],
        "edges": [
            {
                "source": vertex_ids[id(edge.source_vertex)],
                "target": vertex_ids[id(edge.target_vertex)],
                "partitioner": edge.partitioner_factory().name,
                "side_output": edge.side_output,
            }
            for edge in graph.edges
        ],
    }


def add_web_routes(app: web.Application, graph: JobGraph) -> None:
    """Serve the page and ``/plan`` of the job ``graph`` on the control endpoint ``app``."""
    plan = plan_json(graph)

    async def serve_plan(request: web.Request) -> web.Response:
        return web.json_response(plan)

    app.router.add_get("/plan", serve_plan)
    for route, (file_name, content_type) in PAGE_FILES.items():
        app.router.add_get(route, _page_file_handler(file_name, content_type))


def _page_file_handler(file_name: str, content_type: str) -> Any:
    body = resources.files(__package__).joinpath(file_name).read_bytes()

    async def serve(request: web.Request) -> web.Response:
        return web.Response(
            body=body, content_type=content_type, charset="utf-8", headers=_PAGE_HEADERS
        )

    return serve
