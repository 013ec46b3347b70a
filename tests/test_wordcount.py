"""Word count gives the counts of collections.Counter at every parallelism."""

from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "wordcount.py"
TEXT = ROOT / "examples" / "data" / "words.txt"


def expected_counts(path: Path) -> dict[str, int]:
    word = re.compile(r"[a-z']+")
    return dict(
        collections.Counter(
            w.strip("'")
            for line in path.read_text().splitlines()
            for w in word.findall(line.lower())
            if w.strip("'")
        )
    )


def final_counts(output: Path) -> dict[str, int]:
    final: dict[str, int] = {}
    for line in output.read_bytes().splitlines():
        record = orjson.loads(line)
        final[record["word"]] = record["count"]
    return final


@pytest.mark.parametrize("parallelism", [1, 2, 4])
def test_wordcount_matches_counter(tmp_path: Path, parallelism: int) -> None:
    output = tmp_path / "counts.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime",
            "run",
            str(EXAMPLE),
            "--parallelism",
            str(parallelism),
            "--set",
            f"output={output}",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert final_counts(output) == expected_counts(TEXT)
