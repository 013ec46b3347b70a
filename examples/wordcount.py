"""Word count: the running count of every word in a text file.

    python -m runtime run examples/wordcount.py
    python -m runtime run examples/wordcount.py --parallelism 4 --set output=/tmp/counts.jsonl

Params: ``input`` (default: the bundled ``data/words.txt``), ``output`` (a JSON-lines file;
default: stdout). Each line is ``{"word": ..., "count": ...}``, one per update; the last line of a
word carries its final count, at every parallelism.
"""

from __future__ import annotations

import re
from pathlib import Path

from connectors import FileSource, JsonLinesFileSink
from runtime import Job

BUNDLED_TEXT = Path(__file__).parent / "data" / "words.txt"
WORD = re.compile(r"[a-z']+")


def split_words(line: str) -> list[dict[str, object]]:
    return [{"word": w.strip("'"), "count": 1} for w in WORD.findall(line.lower()) if w.strip("'")]


def add_counts(a: dict[str, object], b: dict[str, object]) -> dict[str, object]:
    return {"word": a["word"], "count": a["count"] + b["count"]}  # type: ignore[operator]


def build(job: Job) -> None:
    lines = job.from_source(FileSource(job.params.get("input", str(BUNDLED_TEXT))))
    counts = (
        lines.flat_map(split_words, name="split words")
        .key_by(lambda record: record["word"])
        .reduce(add_counts, name="count")
        .uid("word-counts")
    )
    output = job.params.get("output")
    if output:
        counts.sink_to(JsonLinesFileSink(output), name="write counts").set_parallelism(1)
    else:
        counts.map(_to_json, name="to JSON").print()


def _to_json(record: dict[str, object]) -> str:
    import orjson

    return orjson.dumps(record).decode()
