"""The runtime's process setup (``runtime/process.py``): glibc keeps the heap a buffer of records
freed, so that the next buffer does not fault it back in page by page.

Each case runs in a fresh interpreter: the threshold is process-wide and set once."""

from __future__ import annotations

import json
import os
import platform
import subprocess

import pytest
from cli_helpers import run_python

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the trim threshold is glibc's"
)

# Runs a coroutine the way every runtime process does (run_job, the CLI, a TaskManager), then
# frees a buffer's worth of records (4,096 values of 1,000 bytes: malloc's heap, not pymalloc's)
# and reports how far the top of the heap moved.
PROBE = """
import asyncio, ctypes, json
from runtime.process import keep_freed_heap
from runtime.shell.runner import run_coroutine

async def job():
    await asyncio.sleep(0)

run_coroutine(job())
libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_long]
start = libc.sbrk(0)
records = [bytes(1000) for _ in range(4096)]
grown = libc.sbrk(0) - start
del records
kept = libc.sbrk(0) - start
print(json.dumps({"threshold": keep_freed_heap(), "grown": grown, "kept": kept}))
"""


def fresh_python(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter, with no allocator setting but ``env``'s."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environment.pop("PYFLOW_MALLOC_TRIM_THRESHOLD", None)
    environment.update(env)
    return run_python(script, environment)


def probe(**env: str) -> dict[str, int | None]:
    result: dict[str, int | None] = json.loads(fresh_python(PROBE, **env).stdout.splitlines()[-1])
    assert result["grown"], "the probe's records did not come from the heap"
    return result


def test_a_freed_buffer_of_records_stays_in_the_heap_for_the_next_one() -> None:
    result = probe()
    assert result["threshold"] == 32 << 20
    assert result["kept"] == result["grown"]


def test_a_threshold_of_zero_leaves_glibc_trimming_the_heap() -> None:
    result = probe(PYFLOW_MALLOC_TRIM_THRESHOLD="0")
    assert result["threshold"] is None
    assert result["kept"] < result["grown"]  # handed back: glibc's default trimming


def test_glibc_s_own_setting_wins() -> None:
    result = probe(MALLOC_TRIM_THRESHOLD_="4096")
    assert result["threshold"] is None
    assert result["kept"] < result["grown"]


def test_a_threshold_of_the_user_s_choice_is_used() -> None:
    result = probe(PYFLOW_MALLOC_TRIM_THRESHOLD=str(64 << 20))
    assert result["threshold"] == 64 << 20
    assert result["kept"] == result["grown"]


def test_a_threshold_that_is_not_a_byte_count_is_named_and_the_default_used() -> None:
    done = fresh_python(
        "import logging; logging.basicConfig();"
        "from runtime.process import keep_freed_heap; print(keep_freed_heap())",
        PYFLOW_MALLOC_TRIM_THRESHOLD="lots",
    )
    assert done.stdout.strip() == str(32 << 20)
    assert "$PYFLOW_MALLOC_TRIM_THRESHOLD='lots' is not a number of bytes" in done.stderr


SWITCH_PROBE = """
import asyncio, sys
from runtime.shell.runner import run_coroutine
{before}
async def job():
    await asyncio.sleep(0)

run_coroutine(job())
print(sys.getswitchinterval())
"""


@pytest.mark.parametrize(
    ("before", "expected"),
    [("", 0.0005), ("sys.setswitchinterval(0.002)", 0.002)],
    ids=["python-default", "set-by-the-process"],
)
def test_threads_serving_the_loop_get_the_gil_within_half_a_millisecond(
    before: str, expected: float
) -> None:
    """The runtime shortens Python's 5 ms switch interval (the checkpoint writer's thread waited
    seconds for the GIL under load), unless the process chose its own."""
    done = fresh_python(SWITCH_PROBE.format(before=before))
    assert float(done.stdout.split()[-1]) == expected
