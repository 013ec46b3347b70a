"""``python -m runtime info JOB.py``: the job graph of a job file, without running it.

Each task (a vertex: a chain of operators that run in one task, records passed by function
call) with its parallelism and max parallelism, its operators with their uids (the names state is
restored by; ``generated uid`` when derived from the operator's name because the job sets no
``uid()``), and the edges between tasks with their partitioners and side outputs. The graph is
the one ``run`` builds with the same ``--set``, ``-p`` and ``--max-parallelism``.
"""

from __future__ import annotations

from runtime.plan.graph import JobEdge, JobGraph, JobVertex


def _edge_text(edge: JobEdge, other: JobVertex) -> str:
    text = f"{other.id}: {edge.partitioner_factory().name}"
    if edge.side_output is not None:
        text += f", side output {edge.side_output!r} of {edge.source_operator.name!r}"
    elif edge.source_operator is not edge.source_vertex.operators[-1]:
        text += f", from {edge.source_operator.name!r}"
    return text


def _vertex_lines(graph: JobGraph, vertex: JobVertex) -> list[str]:
    lines = [
        f"task {vertex.id}: parallelism {vertex.parallelism}, "
        f"max parallelism {vertex.max_parallelism}"
    ]
    width = max(len(op.name) for op in vertex.operators)
    for index, op in enumerate(vertex.operators):
        notes = []
        if op.transformation.uid is None:
            notes.append("generated uid")
        if op.transformation.kind in ("source", "sink"):
            notes.append(op.transformation.kind)
        if index > 0:
            notes.append("chained")
        if not op.transformation.chaining:
            notes.append("chaining disabled")
        described = f"  ({', '.join(notes)})" if notes else ""
        lines.append(f"  {op.name.ljust(width)}  uid {op.uid}{described}")
    lines.extend(f"  <- {_edge_text(edge, edge.source_vertex)}" for edge in graph.inputs_of(vertex))
    lines.extend(
        f"  -> {_edge_text(edge, edge.target_vertex)}" for edge in graph.outputs_of(vertex)
    )
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def describe_job_graph(graph: JobGraph) -> str:
    """The job graph as ``info`` prints it: a header, then one block per task."""
    operators = sum(len(v.operators) for v in graph.vertices)
    lines = [
        f"job {graph.name}: {_count(operators, 'operator')} in "
        f"{_count(len(graph.vertices), 'task')}, {_count(len(graph.edges), 'edge')} between them"
    ]
    for vertex in graph.vertices:
        lines.append("")
        lines.extend(_vertex_lines(graph, vertex))
    return "\n".join(lines)
