"""What a TaskManager needs to build the job graph itself, and how the JobManager checks it did.

A job graph holds user functions, which never cross a process boundary: every TaskManager imports
the job file and runs ``build(job)`` with the same arguments (:class:`JobSpec`), then answers with
the :class:`GraphFingerprint` of what it built. The JobManager compares that with the fingerprint
of its own graph (:meth:`GraphFingerprint.difference`), so a job file whose graph depends on the
process (its environment, the host, ``sys.argv``) is refused at start, not discovered as records
routed to the wrong subtask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from actors.barriers import CheckpointingMode
from actors.operator import NewerOutputPolicy
from actors.wire import wire_message
from runtime.config import DEFAULT_AUTO_WATERMARK_INTERVAL_S, CheckpointConfig, ExecutionConfig
from runtime.plan.graph import JobGraph
from runtime.plan.jobfile import build_graph, load_job_file

JOB_MANAGER_ONLY_FIELDS = frozenset({"restart_strategy", "clock"})
"""The :class:`ExecutionConfig` fields a TaskManager never gets: the restart strategy decides on
the JobManager only, and an injected clock is an in-process object (TaskManagers use the wall
clock)."""


@wire_message("cluster.checkpoint-config")
@dataclass(frozen=True)
class CheckpointConfigSpec:
    """:class:`~runtime.config.CheckpointConfig` as data (the mode by its value)."""

    interval_s: float | None
    mode: str
    timeout_s: float
    min_pause_s: float
    max_concurrent: int
    tolerable_failures: int
    retained: int
    retain_on_cancel: bool

    @classmethod
    def of(cls, config: CheckpointConfig) -> CheckpointConfigSpec:
        return cls(
            config.interval_s,
            config.mode.value,
            config.timeout_s,
            config.min_pause_s,
            config.max_concurrent,
            config.tolerable_failures,
            config.retained,
            config.retain_on_cancel,
        )

    def to_config(self) -> CheckpointConfig:
        return CheckpointConfig(
            interval_s=self.interval_s,
            mode=CheckpointingMode(self.mode),
            timeout_s=self.timeout_s,
            min_pause_s=self.min_pause_s,
            max_concurrent=self.max_concurrent,
            tolerable_failures=self.tolerable_failures,
            retained=self.retained,
            retain_on_cancel=self.retain_on_cancel,
        )


@wire_message("cluster.execution-config")
@dataclass(frozen=True)
class ExecutionConfigSpec:
    """The shippable part of an :class:`~runtime.config.ExecutionConfig` (all but
    :data:`JOB_MANAGER_ONLY_FIELDS`)."""

    checkpoint: CheckpointConfigSpec
    buffer_size: int
    buffer_timeout_s: float
    exclusive_credits: int
    floating_buffers: int
    allow_non_restored_state: bool
    on_newer_committed_output: str
    allow_existing_output: bool
    auto_watermark_interval_s: float = DEFAULT_AUTO_WATERMARK_INTERVAL_S

    @classmethod
    def of(cls, config: ExecutionConfig) -> ExecutionConfigSpec:
        return cls(
            CheckpointConfigSpec.of(config.checkpoint),
            config.buffer_size,
            config.buffer_timeout_s,
            config.exclusive_credits,
            config.floating_buffers,
            config.allow_non_restored_state,
            config.on_newer_committed_output.value,
            config.allow_existing_output,
            config.auto_watermark_interval_s,
        )

    def to_config(self) -> ExecutionConfig:
        """The configuration a TaskManager runs its tasks with: the JobManager's, with the default
        restart strategy (unused there) and the wall clock."""
        return ExecutionConfig(
            checkpoint=self.checkpoint.to_config(),
            buffer_size=self.buffer_size,
            buffer_timeout_s=self.buffer_timeout_s,
            exclusive_credits=self.exclusive_credits,
            floating_buffers=self.floating_buffers,
            allow_non_restored_state=self.allow_non_restored_state,
            on_newer_committed_output=NewerOutputPolicy(self.on_newer_committed_output),
            allow_existing_output=self.allow_existing_output,
            auto_watermark_interval_s=self.auto_watermark_interval_s,
        )


@wire_message("cluster.job-spec")
@dataclass(frozen=True)
class JobSpec:
    """The arguments of ``build(job)`` and the job's configuration, as the JobManager used them."""

    job_file: str
    """Absolute, so that a TaskManager started in another directory finds the same file."""
    params: dict[str, str]
    parallelism: int
    max_parallelism: int
    job_name: str
    config: ExecutionConfigSpec
    checkpoint_dir: str | None = None
    """Absolute; every TaskManager checks at its start that it can write there (the JobManager
    creates it before). None: checkpoints stay in the JobManager's memory."""

    @classmethod
    def create(
        cls,
        job_file: str | Path,
        params: dict[str, str],
        parallelism: int,
        max_parallelism: int,
        job_name: str,
        config: ExecutionConfig,
        *,
        checkpoint_dir: str | Path | None = None,
    ) -> JobSpec:
        return cls(
            str(Path(job_file).resolve()),
            dict(params),
            parallelism,
            max_parallelism,
            job_name,
            ExecutionConfigSpec.of(config),
            str(Path(checkpoint_dir).resolve()) if checkpoint_dir is not None else None,
        )

    def build_graph(self) -> JobGraph:
        """Import the job file and build its graph, as the JobManager did; raises what
        :func:`~runtime.plan.jobfile.load_job_file` and ``build(job)`` raise."""
        build = load_job_file(self.job_file)
        return build_graph(
            build, self.params, self.parallelism, self.max_parallelism, name=self.job_name
        )


@wire_message("cluster.vertex-fingerprint")
@dataclass(frozen=True)
class VertexFingerprint:
    id: str
    name: str
    parallelism: int
    max_parallelism: int
    operator_uids: tuple[str, ...]


@wire_message("cluster.edge-fingerprint")
@dataclass(frozen=True)
class EdgeFingerprint:
    source_vertex: str
    source_operator_uid: str
    target_vertex: str
    partitioner: str
    input_index: int
    side_output: str | None = None

    def describe(self) -> str:
        side = f", side output {self.side_output}" if self.side_output else ""
        return (
            f"{self.source_operator_uid} -> {self.target_vertex} "
            f"({self.partitioner}, input {self.input_index}{side})"
        )


@wire_message("cluster.graph-fingerprint")
@dataclass(frozen=True)
class GraphFingerprint:
    """What deployment relies on two graphs sharing: vertices (ids, names, parallelism, max
    parallelism, chained operator uids) and the edges between them."""

    vertices: tuple[VertexFingerprint, ...]
    edges: tuple[EdgeFingerprint, ...]

    @classmethod
    def of(cls, graph: JobGraph) -> GraphFingerprint:
        return cls(
            tuple(
                VertexFingerprint(
                    v.id,
                    v.name,
                    v.parallelism,
                    v.max_parallelism,
                    tuple(op.uid for op in v.operators),
                )
                for v in graph.vertices
            ),
            tuple(
                EdgeFingerprint(
                    e.source_vertex.id,
                    e.source_operator.uid,
                    e.target_vertex.id,
                    e.partitioner_factory().name,
                    e.input_index,
                    e.side_output,
                )
                for e in graph.edges
            ),
        )

    def difference(self, other: GraphFingerprint, other_side: str) -> str | None:
        """``None`` when equal, else what differs, saying what this graph has and what
        ``other_side`` (for instance "TaskManager tm-2") has instead."""
        differences: list[str] = []
        mine = {v.id: v for v in self.vertices}
        theirs = {v.id: v for v in other.vertices}
        for vertex_id in mine.keys() - theirs.keys():
            differences.append(f"{other_side} has no vertex {mine[vertex_id].name!r}")
        for vertex_id in theirs.keys() - mine.keys():
            differences.append(f"{other_side} has an extra vertex {theirs[vertex_id].name!r}")
        for vertex_id in mine.keys() & theirs.keys():
            here, there = mine[vertex_id], theirs[vertex_id]
            for field in ("name", "parallelism", "max_parallelism", "operator_uids"):
                if getattr(here, field) != getattr(there, field):
                    differences.append(
                        f"vertex {here.name!r}: {field.replace('_', ' ')} "
                        f"{getattr(here, field)!r} here, {getattr(there, field)!r} in {other_side}"
                    )
        if not differences and set(self.edges) != set(other.edges):
            missing = [e.describe() for e in self.edges if e not in other.edges]
            extra = [e.describe() for e in other.edges if e not in self.edges]
            differences.append(
                f"the edges differ: {other_side} lacks {missing or 'none'} and has {extra or 'none'}"
            )
        if not differences:
            return None
        differences.sort()
        return "; ".join(differences)
