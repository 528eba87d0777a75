"""Slim stand-ins for ``asyncio.Queue`` and ``asyncio.Event``, for objects every connection holds.

uvicorn's WebSocket protocol makes an ``asyncio.Queue`` (three deques and an
Event with a fourth) and an ``asyncio.Event`` (a fifth) per connection. An empty
deque allocates a 64-slot block, so these five came to about 3.7 KiB of an idle
connection's 20. These keep the same methods uvicorn and relay call, in a list
and a lazily made list of waiters. No I/O: tested directly (tests/test_slim.py).
"""

from __future__ import annotations

import asyncio
from typing import Any


class _Waiters:
    """Futures waiting for a change: made only when someone waits, all woken at once."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] | None = None

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


class SlimQueue(_Waiters):
    """``put_nowait``, ``get``, ``get_nowait``, ``empty`` and ``qsize`` of an unbounded FIFO."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        super().__init__()
        self._items: list[Any] = []

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        self._wake()

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.pop(0)  # a handful at most: connect, disconnect, frames before attach

    async def get(self) -> Any:
        while not self._items:
            await self._wait()
        return self._items.pop(0)


class SlimEvent(_Waiters):
    """``set``, ``clear``, ``is_set`` and ``wait`` of ``asyncio.Event``; ``value`` is
    ``is_set()`` as an attribute, for a check made per delivery."""

    __slots__ = ("value",)

    def __init__(self, value: bool = False) -> None:
        super().__init__()
        self.value = value

    def is_set(self) -> bool:
        return self.value

    def set(self) -> None:
        if not self.value:
            self.value = True
            self._wake()

    def clear(self) -> None:
        self.value = False

    async def wait(self) -> bool:
        if not self.value:
            await self._wait()
        return True
