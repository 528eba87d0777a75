"""relay/slim.py: the queue and event every connection holds behave as asyncio's do."""

from __future__ import annotations

import asyncio

import pytest

from relay.slim import SlimEvent, SlimQueue

pytestmark = pytest.mark.asyncio


async def cancel_while_waiting(wait) -> None:  # type: ignore[no-untyped-def]
    """Start ``wait()``, let it block, cancel it, and see the cancellation through."""
    waiter = asyncio.create_task(wait())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_queue_is_fifo_and_get_nowait_refuses_when_empty() -> None:
    q = SlimQueue()
    assert q.empty() and q.qsize() == 0
    with pytest.raises(asyncio.QueueEmpty):
        q.get_nowait()
    for item in ("a", "b", "c"):
        q.put_nowait(item)
    assert q.qsize() == 3 and not q.empty()
    assert q.get_nowait() == "a"
    assert [await q.get(), await q.get()] == ["b", "c"]
    assert q.empty()


async def test_get_waits_for_the_next_put() -> None:
    q = SlimQueue()
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    assert not getter.done()
    q.put_nowait({"type": "websocket.disconnect"})
    assert await asyncio.wait_for(getter, 1) == {"type": "websocket.disconnect"}


async def test_two_waiting_getters_each_get_one_item() -> None:
    q = SlimQueue()
    getters = [asyncio.create_task(q.get()) for _ in range(2)]
    await asyncio.sleep(0)
    q.put_nowait(1)
    q.put_nowait(2)
    assert sorted(await asyncio.wait_for(asyncio.gather(*getters), 1)) == [1, 2]


async def test_a_cancelled_get_loses_nothing() -> None:
    q = SlimQueue()
    await cancel_while_waiting(q.get)
    q.put_nowait("kept")
    assert q.get_nowait() == "kept"
    assert q._waiters in (None, [])  # no stale waiter left behind


async def test_event_set_wakes_every_waiter_and_clear_makes_them_wait_again() -> None:
    e = SlimEvent()
    assert not e.is_set()
    waiters = [asyncio.create_task(e.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    e.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, True, True]
    assert await e.wait() is True  # set: no wait at all
    e.clear()
    later = asyncio.create_task(e.wait())
    await asyncio.sleep(0)
    assert not later.done()
    e.set()
    assert await asyncio.wait_for(later, 1) is True


async def test_event_starts_set_when_asked_and_a_cancelled_wait_leaves_no_waiter() -> None:
    assert SlimEvent(True).is_set()
    e = SlimEvent()
    await cancel_while_waiting(e.wait)
    assert e._waiters in (None, [])
