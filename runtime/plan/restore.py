"""Which state each new subtask restores from a completed checkpoint (also at a new parallelism).

- Keyed state and timers: every new subtask receives the key-group-organised snapshots of all old
  subtasks and keeps the key groups it owns.
- Operator list state: redistributed by its mode (even split or union) over the old subtasks that
  were still running (FLIP-147). Broadcast state: every new subtask gets a whole copy, new subtask
  *i* that of running old subtask *i* modulo their number (Flink's assignment; all copies are the
  same), at any parallelism.
- Operators that had fully finished: not run again. If every operator of a vertex finished, its
  subtasks start as *finished* (they only hand their state to ``initialize_state`` so that sinks can
  commit what was pending, then send ``EndOfData``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from state.operator import Redistribution, redistribute_operator_state
from state.snapshot import OperatorSnapshot, RestoredState

if TYPE_CHECKING:
    from runtime.plan.graph import JobGraph, OperatorNode
    from state.storage import CompletedCheckpoint, OperatorCheckpoint


def operator_state_for(entry: OperatorCheckpoint, new_parallelism: int) -> list[RestoredState]:
    """Per new subtask, its share of one operator's state (see :class:`RestoredState`)."""
    snapshots = dict(entry.subtask_states.snapshots())
    if entry.fully_finished:
        running = sorted(snapshots)
    else:
        running = [i for i in sorted(snapshots) if i not in entry.finished_subtasks]
    keyed = tuple(s.keyed for s in snapshots.values() if s.keyed is not None)
    timers = tuple(s.timers for s in snapshots.values() if s.timers is not None)
    operator_parts = [part for i in running if (part := snapshots[i].operator) is not None]
    if entry.fully_finished and new_parallelism == entry.parallelism:
        redistributed = [
            (snapshots[i].operator if i in snapshots else None) or {}
            for i in range(new_parallelism)
        ]
    else:
        redistributed = redistribute_operator_state(operator_parts, new_parallelism)
    return [
        RestoredState(keyed, timers, redistributed[index] or None)
        for index in range(new_parallelism)
    ]


def assign_restored_state(
    graph: JobGraph, checkpoint: CompletedCheckpoint | None
) -> dict[tuple[str, int], tuple[dict[str, RestoredState], bool]]:
    """(vertex id, subtask) → ({operator uid: its share}, whether the vertex had finished)."""
    result: dict[tuple[str, int], tuple[dict[str, RestoredState], bool]] = {}
    if checkpoint is None:
        return result
    for vertex in graph.vertices:
        per_subtask: list[dict[str, RestoredState]] = [{} for _ in range(vertex.parallelism)]
        entries = [checkpoint.operators.get(node.uid) for node in vertex.operators]
        finished = all(e is not None and e.fully_finished for e in entries)
        for node, entry in zip(vertex.operators, entries, strict=True):
            if entry is None:
                continue
            for index, restored in enumerate(operator_state_for(entry, vertex.parallelism)):
                if not restored.is_empty:
                    per_subtask[index][node.uid] = restored
        for index in range(vertex.parallelism):
            result[(vertex.id, index)] = (per_subtask[index], finished)
    return result


class RestoreMismatchError(RuntimeError):
    """A checkpoint or savepoint does not fit the job; the message names the operators."""


class RestoreReport:
    """How a checkpoint maps onto a job: which operators restore, start empty, or are dropped."""

    def __init__(self, graph: JobGraph, checkpoint: CompletedCheckpoint) -> None:
        job_uids = list(graph.operators)
        self.restored = [uid for uid in job_uids if uid in checkpoint.operators]
        self.empty = [uid for uid in job_uids if uid not in checkpoint.operators]
        self.dropped = [
            uid
            for uid, entry in checkpoint.operators.items()
            if uid not in graph.operators and entry.subtask_states
        ]
        self.finished = [uid for uid in self.restored if checkpoint.operators[uid].fully_finished]
        self.errors: list[str] = []
        self.broadcast: dict[str, list[str]] = {}
        """Per restored operator, the broadcast states that every new subtask restores whole."""
        for uid in self.restored:
            entry = checkpoint.operators[uid]
            node = graph.operators[uid]
            snapshots = [snapshot for _, snapshot in entry.subtask_states.snapshots()]
            self._check_broadcast_state(uid, node, snapshots)
            keyed_parts = [
                part
                for part, present in (
                    ("keyed", any(s.keyed is not None for s in snapshots)),
                    ("timers", any(s.timers is not None for s in snapshots)),
                )
                if present
            ]
            if keyed_parts and entry.max_parallelism != node.max_parallelism:
                what = " and ".join(
                    "keyed state" if p == "keyed" else "timers" for p in keyed_parts
                )
                self.errors.append(
                    f"operator {node.name!r} (uid {uid}) has {what} for max parallelism "
                    f"{entry.max_parallelism}, but the job now uses max parallelism "
                    f"{node.max_parallelism}; keyed state and timers cannot move to another "
                    f"number of key groups: run with max parallelism {entry.max_parallelism} for "
                    f"this operator (set_max_parallelism({entry.max_parallelism}) on it, or "
                    f"--max-parallelism {entry.max_parallelism} when it sets none)"
                )
        # A task runs its chain as a whole: it cannot skip some operators and run others.
        for vertex in graph.vertices:
            uids = [node.uid for node in vertex.operators]
            done = [u for u in uids if u in self.finished]
            if done and len(done) != len(uids):
                running = ", ".join(
                    f"{graph.operators[u].name!r} (uid {u})" for u in uids if u not in done
                )
                finished = ", ".join(f"{graph.operators[u].name!r} (uid {u})" for u in done)
                self.errors.append(
                    f"task {vertex.name!r} chains the finished operator(s) {finished} with the "
                    f"unfinished or new operator(s) {running}; a finished operator is not run "
                    "again, so give the new operators their own task (disable_chaining()) or "
                    "restore without the finished checkpoint"
                )
        # FLIP-147: a fully finished operator may only have fully finished predecessors.
        upstream: dict[str, set[str]] = {uid: set() for uid in graph.operators}
        for vertex in graph.vertices:
            for node in vertex.operators:
                for chained in vertex.chained.get(node.transformation.id, []):
                    upstream[chained.uid].add(node.uid)
        for edge in graph.edges:
            upstream[edge.target_vertex.head.uid].add(edge.source_operator.uid)
        for uid in self.finished:
            bad = sorted(
                u
                for u in upstream[uid]
                if u not in checkpoint.operators or not checkpoint.operators[u].fully_finished
            )
            if bad:
                names = ", ".join(f"{graph.operators[u].name!r} (uid {u})" for u in bad)
                self.errors.append(
                    f"operator {graph.operators[uid].name!r} (uid {uid}) had finished in the "
                    f"checkpoint, but now has the unfinished or new upstream operator(s) {names}; "
                    "operators cannot be added in front of a finished operator"
                )

    def _check_broadcast_state(
        self, uid: str, node: OperatorNode, snapshots: list[OperatorSnapshot]
    ) -> None:
        """Operator state the checkpoint holds under the name of a broadcast state the job
        declares must be broadcast state too (list state cannot become it)."""
        modes: dict[str, str] = {}
        for snapshot in snapshots:
            for name, part in (snapshot.operator or {}).items():
                modes.setdefault(name, part.get("mode", ""))
        restored = [n for n, m in modes.items() if m == Redistribution.BROADCAST.value]
        if restored:
            self.broadcast[uid] = sorted(restored)
        for name in node.transformation.broadcast_state:
            mode = modes.get(name)
            if mode is not None and mode != Redistribution.BROADCAST.value:
                self.errors.append(
                    f"operator {node.name!r} (uid {uid}) declares broadcast state {name!r}, but "
                    f"the checkpoint holds {mode} list state of that name; give the broadcast "
                    "state another name, or the operator another uid() and pass "
                    "--allow-non-restored-state to drop the old state"
                )

    def check(self, allow_non_restored_state: bool) -> None:
        problems = list(self.errors)
        if self.dropped and not allow_non_restored_state:
            problems.append(
                "the checkpoint has state for operators that are not in the job: "
                + ", ".join(self.dropped)
                + " (give them the same uid() as before, or pass --allow-non-restored-state to "
                "drop that state)"
            )
        if problems:
            raise RestoreMismatchError("; ".join(problems))

    def describe(self, graph: JobGraph) -> str:
        def names(uids: list[str]) -> str:
            if not uids:
                return "none"
            return ", ".join(
                f"{graph.operators[u].name} ({u})" if u in graph.operators else u for u in uids
            )

        lines = [
            f"restores state: {names(self.restored)}",
            f"starts empty:   {names(self.empty)}",
            f"state dropped:  {names(self.dropped)}",
        ]
        if self.finished:
            lines.append(f"finished (not run again): {names(self.finished)}")
        for uid, states in self.broadcast.items():
            lines.append(
                f"broadcast state of {names([uid])}, whole in every subtask: {', '.join(states)}"
            )
        lines.extend(f"error: {e}" for e in self.errors)
        return "\n".join(lines)
