"""The user docs: the API reference builds with the command ``docs/README.md`` gives, and the
docs point only to files a user has (every relative link and repository path exists, every
``#anchor`` names a heading of its page)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import ROOT

DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md", ROOT / "CHANGELOG.md"]
REPOSITORY_PATH = re.compile(
    r"(?:runtime|actors|state|connectors|tests|examples|bench|docs)/[\w./-]*"
)

GENERATED = "docs/api/"
"""Where the API reference is generated to: named by the docs, not in the repository."""


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def heading_anchors(page: Path) -> set[str]:
    """The ``#anchors`` a Markdown renderer gives the page's headings (GitHub's rule)."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", _without_code_blocks(page.read_text()), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def documented_pdoc_command() -> list[str]:
    text = (ROOT / "docs" / "README.md").read_text()
    [line] = [line for line in text.splitlines() if line.startswith("python -m pdoc ")]
    return shlex.split(line)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_docs_point_only_to_files_a_user_has(page: Path) -> None:
    text = page.read_text()
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.is_relative_to(ROOT) or not linked.exists():
            problems.append(f"link to a missing file: {target}")
        elif anchor and anchor not in heading_anchors(linked):
            problems.append(f"link to a missing heading: {target}")
    for quoted in re.findall(r"`([^`\s]+)`", _without_code_blocks(text)):
        if quoted.startswith("../"):
            where = (page.parent / quoted).resolve()
            if not where.is_relative_to(ROOT) or not where.exists():
                problems.append(f"path outside what users have: {quoted}")
        elif (
            REPOSITORY_PATH.fullmatch(quoted)
            and not quoted.startswith(GENERATED)
            and not (ROOT / quoted).exists()
        ):
            problems.append(f"missing file: {quoted}")
    assert not problems, problems


@pytest.mark.slow
def test_the_api_reference_builds_with_the_documented_command(tmp_path: Path) -> None:
    command = documented_pdoc_command()
    assert command[:3] == ["python", "-m", "pdoc"] and command[-2] == "-o", command
    out = tmp_path / "api"
    built = subprocess.run(
        [sys.executable, *command[1:-1], str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    assert "Warn" not in built.stderr and "Error" not in built.stderr, built.stderr
    pages = {
        "runtime.html": "WatermarkStrategy",
        "runtime/testing.html": "ManualClock",
        "connectors.html": "TwoPhaseCommitFileSink",
        "connectors/kafka.html": "KafkaSource",
        "state.html": "ValueStateDescriptor",
        "actors/task.html": "StreamTask",
    }
    for page, name in pages.items():
        assert name in (out / page).read_text(), page
    assert (out / "index.html").exists()
