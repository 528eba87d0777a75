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


def _wake_all(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


class SlimQueue:
    """``put_nowait``, ``get``, ``get_nowait``, ``empty`` and ``qsize`` of an unbounded FIFO."""

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiters: list[asyncio.Future[None]] | None = None

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiters = self._waiters
        if waiters:
            self._waiters = None
            _wake_all(waiters)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.pop(0)  # a handful at most: connect, disconnect, frames before attach

    async def get(self) -> Any:
        while not self._items:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if self._waiters is not None and waiter in self._waiters:
                    self._waiters.remove(waiter)
        return self._items.pop(0)


class SlimEvent:
    """``set``, ``clear``, ``is_set`` and ``wait`` of ``asyncio.Event``."""

    __slots__ = ("_value", "_waiters")

    def __init__(self, value: bool = False) -> None:
        self._value = value
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if self._value:
            return
        self._value = True
        waiters = self._waiters
        if waiters:
            self._waiters = None
            _wake_all(waiters)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
