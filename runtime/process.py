"""What every process of the runtime sets up before its event loop runs: glibc's heap trimming
raised, a shorter GIL switch interval, then uvloop (asyncio's loop when uvloop is missing).

**The heap trimming.** The runtime moves records a buffer at a time, so it frees them a buffer at a
time: a thousand parsed dicts or serialised values at once, at the top of the heap. glibc then
hands that memory back to the kernel whenever more than ``M_TRIM_THRESHOLD`` (128 KiB by default)
lies free at the top, and the next buffer takes it back, page fault by page fault. Measured: one
million ``orjson.dumps`` results freed 1,024 at a time took 1,969 ms with the default threshold and
91 ms with 32 MiB; the in-memory benchmark's pipeline ran a quarter faster. A loop that frees each
record before making the next never meets this, which is why a hand-written loop did not.

So the runtime keeps up to :data:`~runtime.config.DEFAULT_MALLOC_TRIM_THRESHOLD_BYTES` of freed
heap for reuse: the process's resident memory may stay that much above what it uses. It is
process-wide and stays set after a job ends (``run_job`` in a notebook keeps it too). A threshold
the user set with glibc's own ``MALLOC_TRIM_THRESHOLD_`` environment variable wins, and
``PYFLOW_MALLOC_TRIM_THRESHOLD=0`` leaves glibc's default alone. Other C libraries (musl, macOS)
are left as they are.

**The switch interval.** The event loop's thread runs Python without pause while a job is busy, and
the threads that serve it (aiofiles' worker writing a checkpoint's files, a TaskManager's control
link) need the GIL back after each system call: Python hands it over only after the waiting
thread asked for ``sys.getswitchinterval()``, 5 ms by default, and then not always at once.
Measured in ``bench/checkpoints.py`` at 640,000 records/s: writing a 2.6 MB checkpoint took its
worker thread 3.2-3.9 s with 5 ms, about 40 ms with 0.5 ms, so that checkpoints complete every
second again. The runtime sets :data:`~runtime.config.DEFAULT_THREAD_SWITCH_INTERVAL_S` unless the
process already changed Python's default.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Any

from runtime.config import DEFAULT_MALLOC_TRIM_THRESHOLD_BYTES, DEFAULT_THREAD_SWITCH_INTERVAL_S

log = logging.getLogger(__name__)

TRIM_THRESHOLD_ENV = "PYFLOW_MALLOC_TRIM_THRESHOLD"
"""Bytes of freed heap glibc keeps before trimming; 0 keeps glibc's default."""

GLIBC_TRIM_THRESHOLD_ENV = "MALLOC_TRIM_THRESHOLD_"
"""glibc's own setting: when present, glibc already applied it and the runtime leaves it."""

_M_TRIM_THRESHOLD = -1
"""``mallopt``'s parameter number for the trim threshold (glibc's ``malloc.h``)."""

_applied_threshold: int | None = None


def trim_threshold_bytes() -> int:
    """The threshold the runtime sets: ``$PYFLOW_MALLOC_TRIM_THRESHOLD`` or the default; 0 for
    none. A value that is not a byte count below 2 GiB is named in a warning and the default
    used."""
    text = os.environ.get(TRIM_THRESHOLD_ENV, "").strip()
    if not text:
        return DEFAULT_MALLOC_TRIM_THRESHOLD_BYTES
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 1 << 31:
        log.warning(
            "$%s=%r is not a number of bytes below 2 GiB (0 keeps glibc's default); using %d",
            TRIM_THRESHOLD_ENV,
            text,
            DEFAULT_MALLOC_TRIM_THRESHOLD_BYTES,
        )
        return DEFAULT_MALLOC_TRIM_THRESHOLD_BYTES
    return value


def keep_freed_heap() -> int | None:
    """Raise glibc's trim threshold for this process (see the module docstring), once.

    Returns the threshold in force from now on, None where the runtime set none: not glibc, the
    user's ``MALLOC_TRIM_THRESHOLD_`` in charge, or ``$PYFLOW_MALLOC_TRIM_THRESHOLD=0``."""
    global _applied_threshold
    if _applied_threshold is not None:
        return _applied_threshold
    threshold = trim_threshold_bytes()
    if threshold == 0 or GLIBC_TRIM_THRESHOLD_ENV in os.environ:
        return None
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return None
    if not mallopt(_M_TRIM_THRESHOLD, threshold):
        log.warning(
            "glibc refused a heap trim threshold of %d bytes; keeping its default", threshold
        )
        return None
    _applied_threshold = threshold
    return threshold


def _glibc_mallopt() -> Any:
    """glibc's ``mallopt``, or None under another C library."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        # Present in glibc only; musl has neither.
        libc.gnu_get_libc_version  # noqa: B018
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


PYTHON_DEFAULT_SWITCH_INTERVAL_S = 0.005


def hand_over_the_gil_sooner() -> float:
    """Set the runtime's GIL switch interval (see the module docstring) unless this process
    already set its own; returns the interval in force."""
    if sys.getswitchinterval() == PYTHON_DEFAULT_SWITCH_INTERVAL_S:
        sys.setswitchinterval(DEFAULT_THREAD_SWITCH_INTERVAL_S)
    return sys.getswitchinterval()


def run_on_new_loop(coro: Any) -> Any:
    """Run ``coro`` to its end on a new event loop in this thread, uvloop when installed, after
    :func:`keep_freed_heap` and :func:`hand_over_the_gil_sooner`."""
    keep_freed_heap()
    hand_over_the_gil_sooner()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
