"""Which state each new subtask restores from a completed checkpoint (also at a new parallelism).

- Keyed state and timers: every new subtask receives the key-group-organised snapshots of all old
  subtasks and keeps the key groups it owns.
- Operator list state: redistributed by its mode (even split or union) over the old subtasks that
  were still running; broadcast state from one running old subtask (FLIP-147).
- Operators that had fully finished: not run again. If every operator of a vertex finished, its
  subtasks start as *finished* (they only hand their state to ``initialize_state`` so that sinks can
  commit what was pending, then send ``EndOfData``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from state.operator import redistribute_operator_state

if TYPE_CHECKING:
    from runtime.coordinator import CompletedCheckpoint, OperatorCheckpoint
    from runtime.graph import JobGraph


def operator_state_for(entry: OperatorCheckpoint, new_parallelism: int) -> list[dict[str, Any]]:
    """Per new subtask, the restored dict for one operator (``keyed``, ``timers``, ``operator``)."""
    states = entry.subtask_states
    if entry.fully_finished:
        running = sorted(states)
    else:
        running = [i for i in sorted(states) if i not in entry.finished_subtasks]
    keyed = [states[i]["keyed"] for i in sorted(states) if "keyed" in states[i]]
    timers = [states[i]["timers"] for i in sorted(states) if "timers" in states[i]]
    operator_parts = [states[i]["operator"] for i in running if "operator" in states[i]]
    if entry.fully_finished and new_parallelism == entry.parallelism:
        redistributed = [states.get(i, {}).get("operator", {}) for i in range(new_parallelism)]
    else:
        redistributed = redistribute_operator_state(operator_parts, new_parallelism)
    result: list[dict[str, Any]] = []
    for index in range(new_parallelism):
        restored: dict[str, Any] = {}
        if keyed:
            restored["keyed"] = keyed
        if timers:
            restored["timers"] = timers
        if redistributed[index]:
            restored["operator"] = redistributed[index]
        result.append(restored)
    return result


def assign_restored_state(
    graph: JobGraph, checkpoint: CompletedCheckpoint | None
) -> dict[tuple[str, int], tuple[dict[str, Any], bool]]:
    """(vertex id, subtask) → ({operator uid: restored dict}, whether the vertex had finished)."""
    result: dict[tuple[str, int], tuple[dict[str, Any], bool]] = {}
    if checkpoint is None:
        return result
    for vertex in graph.vertices:
        per_subtask: list[dict[str, Any]] = [{} for _ in range(vertex.parallelism)]
        entries = [checkpoint.operators.get(node.uid) for node in vertex.operators]
        finished = all(e is not None and e.fully_finished for e in entries)
        for node, entry in zip(vertex.operators, entries, strict=True):
            if entry is None:
                continue
            for index, restored in enumerate(operator_state_for(entry, vertex.parallelism)):
                if restored:
                    per_subtask[index][node.uid] = restored
        for index in range(vertex.parallelism):
            result[(vertex.id, index)] = (per_subtask[index], finished)
    return result
