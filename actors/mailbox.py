"""The actor mailbox: how anything outside an actor talks to it.

Threading model: any coroutine on the actor's event loop may ``put``; only the actor's own coroutine
takes. Lifecycle: ``OPEN`` (put and take) → ``QUIESCED`` (take only: the actor is draining what is
already there) → ``CLOSED`` (neither; ``close()`` returns the mail that was never taken).

The mailbox carries *control* mail (checkpoint triggers, completion notices, timers). Record data does
not go through it: it arrives through the actor's input gate, and both wake the same
:class:`Wakeup`. An actor serves all pending control mail before it takes the next data buffer,
which is what gives control mail priority without ever interrupting a buffer halfway.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import Any


class MailboxState(enum.Enum):
    OPEN = "open"
    QUIESCED = "quiesced"
    CLOSED = "closed"


class MailboxClosedError(RuntimeError):
    """Mail was put into a mailbox that no longer accepts it."""


class Wakeup:
    """A level-triggered signal an actor sleeps on until mail or input arrives.

    ``set()`` may be called any number of times; ``wait()`` returns at once if it was set since the
    last ``clear()``.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until set; ``False`` if ``timeout`` seconds passed first."""
        if self._event.is_set():
            return True
        if timeout is None:
            await self._event.wait()
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            return False
        return True


class Mailbox:
    """A FIFO of control mail for one actor."""

    def __init__(self, owner: str, wakeup: Wakeup | None = None) -> None:
        self.owner = owner
        self.wakeup = wakeup if wakeup is not None else Wakeup()
        self._queue: deque[Any] = deque()
        self._state = MailboxState.OPEN

    @property
    def state(self) -> MailboxState:
        return self._state

    def put(self, mail: Any) -> None:
        if self._state is not MailboxState.OPEN:
            msg = f"mailbox of {self.owner} is {self._state.value}; cannot accept {mail!r}"
            raise MailboxClosedError(msg)
        self._queue.append(mail)
        self.wakeup.set()

    def try_put(self, mail: Any) -> bool:
        """Put unless the mailbox stopped accepting mail; says whether it was put."""
        if self._state is not MailboxState.OPEN:
            return False
        self._queue.append(mail)
        self.wakeup.set()
        return True

    def has_mail(self) -> bool:
        return bool(self._queue)

    def take_nowait(self) -> Any | None:
        if self._state is MailboxState.CLOSED or not self._queue:
            return None
        return self._queue.popleft()

    def quiesce(self) -> None:
        if self._state is MailboxState.OPEN:
            self._state = MailboxState.QUIESCED

    def close(self) -> list[Any]:
        """Close for good and return the mail that was never taken."""
        self._state = MailboxState.CLOSED
        dropped = list(self._queue)
        self._queue.clear()
        return dropped

    def __len__(self) -> int:
        return len(self._queue)
