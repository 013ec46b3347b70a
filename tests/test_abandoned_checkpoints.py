"""Checkpoint storage rule 6: a restore from an older checkpoint abandons the newer completed ones
of the directory. Abandoned folders are skipped by the searches for the newest checkpoint (with
the reason), never deleted as garbage, and still count as completed (their side effects were
committed). The end-to-end paths (the CLI, the two-phase file sink's manifest) are in
``test_issue8_qa.py``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson

from state.storage import (
    ABANDONED,
    CheckpointKind,
    CheckpointStorage,
    CompletedCheckpoint,
    completed_checkpoint_ids_after,
    find_latest_valid,
    find_newest_snapshot,
    mark_abandoned,
    read_abandoned_marker,
    remove_incomplete_checkpoints,
)


def write_checkpoints(chk: Path, *ids: int) -> dict[int, CompletedCheckpoint]:
    """Completed (empty) checkpoints ``chk/chk-<id>``, written through the storage."""
    storage = CheckpointStorage(chk, "job")
    written = {}
    for checkpoint_id in ids:
        checkpoint = CompletedCheckpoint(
            checkpoint_id, CheckpointKind.CHECKPOINT, int(time.time() * 1000), {}
        )
        asyncio.run(storage.write(checkpoint))
        written[checkpoint_id] = checkpoint
    return written


def test_restore_latest_skips_abandoned_checkpoints_naming_the_restore(tmp_path: Path) -> None:
    chk = tmp_path / "chk"
    written = write_checkpoints(chk, 3, 4, 5)
    assert mark_abandoned(chk, [4, 5], written[3]) == [4, 5]

    search = find_latest_valid(chk)
    assert search.checkpoint is not None and search.checkpoint.checkpoint_id == 3
    assert [s.folder.name for s in search.skipped] == ["chk-5", "chk-4"]
    for skipped in search.skipped:
        assert skipped.abandoned is not None and skipped.completed
        checkpoint_id = skipped.folder.name[4:]
        assert skipped.reason.startswith(
            f"checkpoint {checkpoint_id} abandoned: a later run restored checkpoint 3 on "
        ), skipped.reason
        assert str(chk / "chk-3") in skipped.reason
    # A folder of snapshots (--restore DIR) skips them the same way.
    newest = find_newest_snapshot(chk)
    assert newest.checkpoint is not None and newest.checkpoint.checkpoint_id == 3


def test_abandoned_checkpoints_are_kept_and_still_count_as_completed(tmp_path: Path) -> None:
    chk = tmp_path / "chk"
    written = write_checkpoints(chk, 3, 4, 5)
    mark_abandoned(chk, [4, 5], written[3])
    assert remove_incomplete_checkpoints(chk, below_id=10) == []
    assert all((chk / f"chk-{c}").is_dir() for c in (3, 4, 5))
    # Their side effects were committed: a restore from 3 or older replays them.
    assert completed_checkpoint_ids_after(chk, 3) == [4, 5]


def test_a_marker_is_written_once_and_only_into_completed_checkpoints(tmp_path: Path) -> None:
    chk = tmp_path / "chk"
    written = write_checkpoints(chk, 2, 3, 4)
    (chk / "chk-9").mkdir()  # never completed: no _metadata
    assert mark_abandoned(chk, [3, 4, 9], written[2]) == [3, 4]
    first = (chk / "chk-4" / ABANDONED).read_bytes()
    assert mark_abandoned(chk, [4], written[3]) == []  # the restore that first left it stays
    assert (chk / "chk-4" / ABANDONED).read_bytes() == first
    assert not (chk / "chk-9" / ABANDONED).exists()
    assert not list(chk.glob(f"chk-*/.{ABANDONED}.tmp"))
    marker = read_abandoned_marker(chk / "chk-4")
    assert marker is not None
    assert (marker.restored_kind, marker.restored_checkpoint) == ("checkpoint", 2)
    assert orjson.loads(first)["restored_path"] == str(chk / "chk-2")


def test_a_damaged_marker_still_marks_the_checkpoint_abandoned(tmp_path: Path) -> None:
    chk = tmp_path / "chk"
    write_checkpoints(chk, 1, 2)
    (chk / "chk-2" / ABANDONED).write_text('{"restored_kind": ')
    search = find_latest_valid(chk)
    assert search.checkpoint is not None and search.checkpoint.checkpoint_id == 1
    [skipped] = search.skipped
    assert skipped.abandoned is not None
    assert f"its {ABANDONED} is damaged" in skipped.reason, skipped.reason
