"""From the job's transformations to a :class:`JobGraph` of chained vertices and edges.

1. Parallelism: an operator's own, else the job's default.
2. Virtual nodes (``partition``, ``union``, ``side_output``) become edge properties: each
   physical operator gets a list of input edges (upstream operator, partitioner, input index,
   side output tag).
3. Chaining: an operator joins its upstream's vertex when it has exactly one input edge, that
   edge is forward (no explicit partitioning) with equal parallelism, reads the main output (side
   outputs always cross a channel), and neither side disabled chaining. An edge without explicit partitioning between different parallelisms is a rebalance.
4. A vertex is the chain of operators run by one task; its id is its head operator's uid.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actors.partitioner import (
    ForwardPartitioner,
    KeyGroupPartitioner,
    Partitioner,
    RebalancePartitioner,
)
from runtime.api.streams import (
    VIRTUAL_KINDS,
    Job,
    JobDefinitionError,
    Transformation,
    default_uids,
)


@dataclass(eq=False)
class OperatorNode:
    transformation: Transformation
    uid: str
    parallelism: int
    max_parallelism: int

    @property
    def name(self) -> str:
        return self.transformation.name


@dataclass(eq=False)
class InputEdge:
    source: OperatorNode
    target: OperatorNode
    partitioner_factory: Callable[[], Partitioner]
    explicit: bool
    input_index: int
    side_output: str | None = None
    """The tag of the source's side output this edge carries; None for its main output."""

    @property
    def partitioner_name(self) -> str:
        return self.partitioner_factory().name


@dataclass(eq=False)
class JobVertex:
    id: str
    operators: list[OperatorNode]
    """Head first, then the chained operators in topological order."""
    parallelism: int
    max_parallelism: int
    chained: dict[int, list[OperatorNode]] = field(default_factory=dict)
    """Chained consumers of each operator (by transformation id)."""

    @property
    def head(self) -> OperatorNode:
        return self.operators[0]

    @property
    def name(self) -> str:
        return " -> ".join(op.name for op in self.operators)

    @property
    def is_source(self) -> bool:
        return self.head.transformation.kind == "source"


@dataclass(eq=False)
class JobEdge:
    source_vertex: JobVertex
    source_operator: OperatorNode
    target_vertex: JobVertex
    partitioner_factory: Callable[[], Partitioner]
    input_index: int
    side_output: str | None = None
    """The tag of the source operator's side output this edge carries; None for its main output."""

    @property
    def pointwise(self) -> bool:
        return self.partitioner_factory().pointwise


@dataclass
class JobGraph:
    name: str
    vertices: list[JobVertex]
    edges: list[JobEdge]
    operators: dict[str, OperatorNode]
    params: dict[str, str]

    def inputs_of(self, vertex: JobVertex) -> list[JobEdge]:
        return [e for e in self.edges if e.target_vertex is vertex]

    def outputs_of(self, vertex: JobVertex) -> list[JobEdge]:
        return [e for e in self.edges if e.source_vertex is vertex]

    def describe(self) -> str:
        lines = []
        for v in self.vertices:
            ins = ", ".join(
                f"{e.source_vertex.id} ({e.partitioner_factory().name}"
                + (f", side output {e.side_output})" if e.side_output else ")")
                for e in self.inputs_of(v)
            )
            lines.append(f"{v.name} [parallelism {v.parallelism}]" + (f" <- {ins}" if ins else ""))
        return "\n".join(lines)


def build_job_graph(job: Job) -> JobGraph:
    if not job.transformations:
        msg = "build(job) defined no operators: add a source with job.from_source(...)"
        raise JobDefinitionError(msg)
    if not job.sinks():
        msg = "the job has no sink: end the dataflow with sink_to(...) or print()"
        raise JobDefinitionError(msg)
    uids = default_uids(job)
    nodes: dict[int, OperatorNode] = {}
    for t in job.transformations:
        if t.kind in VIRTUAL_KINDS:
            continue
        nodes[t.id] = OperatorNode(
            t,
            uids[t.id],
            t.parallelism or job.parallelism,
            t.max_parallelism or job.max_parallelism,
        )
        if nodes[t.id].parallelism > nodes[t.id].max_parallelism:
            msg = (
                f"operator {t.name!r}: parallelism {nodes[t.id].parallelism} exceeds its max "
                f"parallelism {nodes[t.id].max_parallelism}; lower the parallelism or raise the "
                "max parallelism (set_max_parallelism() on the operator, --max-parallelism for "
                "the job)"
            )
            raise JobDefinitionError(msg)

    # Step 2: resolve virtual nodes into input edges.
    def physical_inputs(
        t: Transformation, partition: Transformation | None
    ) -> list[tuple[Transformation, Transformation | None, str | None]]:
        """(upstream operator, partition node, side output tag) of each physical input."""
        if t.kind == "partition":
            return physical_inputs(t.inputs[0], t)
        if t.kind == "union":
            result = []
            for upstream in t.inputs:
                result.extend(physical_inputs(upstream, partition))
            return result
        if t.kind == "side_output":
            return [(t.inputs[0], partition, t.side_output_tag)]
        return [(t, partition, None)]

    edges_in: dict[int, list[InputEdge]] = {}
    for t in job.transformations:
        if t.id not in nodes:
            continue
        target = nodes[t.id]
        inputs: list[InputEdge] = []
        for position, upstream in enumerate(t.inputs):
            input_index = position if t.two_input else 0
            for source_t, partition, side_output in physical_inputs(upstream, None):
                source = nodes[source_t.id]
                explicit = partition is not None
                partitioner = None if partition is None else _partitioner_into(partition, target)
                if partitioner is None:
                    partitioner = (
                        ForwardPartitioner
                        if source.parallelism == target.parallelism
                        else RebalancePartitioner
                    )
                elif partitioner().pointwise and source.parallelism != target.parallelism:
                    msg = (
                        f"forward() from {source.name!r} (parallelism {source.parallelism}) to "
                        f"{target.name!r} (parallelism {target.parallelism}) needs equal "
                        "parallelism; use rebalance()"
                    )
                    raise JobDefinitionError(msg)
                inputs.append(
                    InputEdge(source, target, partitioner, explicit, input_index, side_output)
                )
        edges_in[t.id] = inputs

    # Step 3: chaining.
    chained_to: dict[int, int] = {}  # transformation id -> upstream transformation id
    for tid, inputs in edges_in.items():
        if len(inputs) != 1 or inputs[0].side_output is not None:
            continue
        edge = inputs[0]
        t = nodes[tid].transformation
        s = edge.source.transformation
        if (
            edge.partitioner_factory is ForwardPartitioner
            and not edge.explicit
            and edge.source.parallelism == nodes[tid].parallelism
            and t.chaining
            and s.chaining
            and t.kind != "source"
        ):
            chained_to[tid] = s.id
        elif (
            edge.partitioner_factory is ForwardPartitioner
            and edge.explicit
            and t.chaining
            and s.chaining
        ):
            chained_to[tid] = s.id

    def head_of(tid: int) -> int:
        while tid in chained_to:
            tid = chained_to[tid]
        return tid

    vertices: dict[int, JobVertex] = {}
    for t in job.transformations:
        if t.id not in nodes:
            continue
        head = head_of(t.id)
        node = nodes[t.id]
        if head not in vertices:
            head_node = nodes[head]
            vertices[head] = JobVertex(
                head_node.uid, [], head_node.parallelism, head_node.max_parallelism
            )
        vertex = vertices[head]
        vertex.operators.append(node)
        if t.id in chained_to:
            vertex.chained.setdefault(chained_to[t.id], []).append(node)
    vertex_of = {tid: vertices[head_of(tid)] for tid in nodes}

    edges: list[JobEdge] = []
    for tid, inputs in edges_in.items():
        if tid in chained_to:
            continue
        target_vertex = vertex_of[tid]
        # Distinct upstream vertices are distinct logical inputs of a two-input head; a union
        # into one operator is a single input.
        for edge in inputs:
            edges.append(
                JobEdge(
                    vertex_of[edge.source.transformation.id],
                    edge.source,
                    target_vertex,
                    edge.partitioner_factory,
                    edge.input_index,
                    edge.side_output,
                )
            )
    ordered = [vertices[h] for h in sorted(vertices)]
    _check_acyclic_order(ordered, edges)
    return JobGraph(
        job.name,
        ordered,
        edges,
        {n.uid: n for n in nodes.values()},
        dict(job.params),
    )


def _partitioner_into(partition: Transformation, target: OperatorNode) -> Callable[[], Partitioner]:
    """The partitioner factory of a ``partition`` node on an edge into ``target``.

    ``key_by`` routes by key group, and the key groups are those of the operator that keeps the
    keyed state and timers: its max parallelism, not the job's (a different one would send keys
    to subtasks that do not hold their state).
    """
    if partition.key_selector is not None:
        return functools.partial(
            KeyGroupPartitioner, partition.key_selector, target.max_parallelism
        )
    assert partition.partitioner_factory is not None
    return partition.partitioner_factory


def _check_acyclic_order(vertices: list[JobVertex], edges: list[JobEdge]) -> None:
    # Transformations are created in dependency order, so heads sorted by id are topological.
    position = {id(v): i for i, v in enumerate(vertices)}
    for edge in edges:
        if position[id(edge.source_vertex)] >= position[id(edge.target_vertex)]:
            msg = f"edge {edge.source_vertex.name} -> {edge.target_vertex.name} is not forward"
            raise JobDefinitionError(msg)


def operator_chain_description(vertex: JobVertex) -> list[dict[str, Any]]:
    return [
        {"uid": op.uid, "name": op.name, "parallelism": op.parallelism} for op in vertex.operators
    ]
