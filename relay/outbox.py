"""One client's bounded outgoing buffer: batching, coalescing, dropping. No sockets.

The policy at each limit, stated once (see also docs/design.md, Slow readers):

* Below ``soft_bytes`` everything queued is kept and goes out in as few frames
  as the socket allows: :meth:`Outbox.take` returns all of it as one frame (up
  to ``max_frame_bytes``), and when only one room batch is pending it returns
  that batch's bytes object itself, shared with every other member.
* Past ``soft_bytes`` only the newest STATE per (actor, key) is kept.
* Past ``hard_bytes`` the oldest EVENTs (and DIRECTs) are dropped until the
  buffer is back under the limit; the next frame starts with DROPPED(count).
* JOIN, LEAVE, ERROR, WELCOME and the newest STATEs are never dropped. If they
  alone pass ``hard_bytes``, or the buffer has stayed congested (it passed
  ``hard_bytes`` and has not drained below ``soft_bytes`` since) for longer than
  the slow-client timeout, :attr:`Outbox.must_close` is set and the owner closes
  the client with 4008.

So the memory a client pins here is at most ``hard_bytes`` plus one message.

``size`` and ``backlog_size`` count the bytes queued in the buffer and in the
backlog; as every message is at least one byte, both are 0 exactly when nothing
is queued (a cheaper test than ``len()`` for the node's per-recipient fast path).

A resume's replay (:meth:`Outbox.catch_up`) is the exception: what the client
missed can be far more than ``hard_bytes``, and coalescing or dropping it would
defeat the replay. It waits in a separate backlog, bounded by its own limit,
and moves into the buffer only as the socket drains it (below ``soft_bytes``).
Room messages that arrive meanwhile queue behind it, in order; if the backlog
passes its limit, the client cannot catch up and ``must_close`` is set.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from relay import protocol
from relay.protocol import MsgType
from relay.room import Entry


@dataclass(slots=True)
class Batch:
    """Bytes queued for one or more clients; ``entries`` is None for control messages."""

    wire: bytes
    entries: list[Entry] | None


_EMPTY: deque[Batch] = deque(maxlen=0)  # shared and always empty: appending to it is a no-op


class Outbox:
    __slots__ = (
        "soft_bytes", "hard_bytes", "max_frame_bytes", "size", "dropped_total",
        "coalesced_total", "congested_since", "must_close", "_items", "_dropped_unreported",
        "_coalesce_above", "_backlog", "backlog_size", "_backlog_limit",
    )

    def __init__(self, *, soft_bytes: int, hard_bytes: int, max_frame_bytes: int) -> None:
        self.soft_bytes = soft_bytes
        self.hard_bytes = hard_bytes
        self.max_frame_bytes = max_frame_bytes
        self.size = 0
        self.dropped_total = 0
        self.coalesced_total = 0
        self.congested_since: float | None = None
        self.must_close = False
        self._items: deque[Batch] = _EMPTY  # a deque only while something is queued
        self._dropped_unreported = 0
        self._coalesce_above = soft_bytes
        self._backlog: deque[Batch] = _EMPTY  # a resume's replay still to send, then what followed it
        self.backlog_size = 0
        self._backlog_limit = 0

    def __len__(self) -> int:
        return len(self._items) + len(self._backlog)

    def catch_up(self, entries: list[Entry], limit: int) -> None:
        """Queue a resume's replay after what is queued, sent as fast as the socket drains.

        Until it is all out, room messages pushed go behind it; ``limit`` bounds the
        bytes waiting so (past it, ``must_close``).
        """
        backlog: deque[Batch] = deque()
        chunk: list[Entry] = []
        size = 0
        for entry in entries:  # frames of up to max_frame_bytes
            if chunk and size + len(entry.wire) > self.max_frame_bytes:
                backlog.append(Batch(b"".join(e.wire for e in chunk), chunk))
                chunk, size = [], 0
            chunk.append(entry)
            size += len(entry.wire)
        if chunk:
            backlog.append(Batch(b"".join(e.wire for e in chunk), chunk))
        if backlog:
            self._backlog = backlog
            self.backlog_size = sum(len(b.wire) for b in backlog)
            self._backlog_limit = limit

    def push(self, batch: Batch, now: float) -> None:
        if self._backlog and batch.entries is not None:  # still catching up: in order, behind it
            self._backlog.append(batch)
            self.backlog_size += len(batch.wire)
            if self.backlog_size > self._backlog_limit:
                self.must_close = True
            return
        if self._items is _EMPTY:
            self._items = deque()
        self._items.append(batch)
        self.size += len(batch.wire)
        if self.size > self.soft_bytes:
            self._relieve(now)

    def push_control(self, wire: bytes, now: float) -> None:
        self.push(Batch(wire, None), now)

    def overdue(self, now: float, timeout_s: float) -> bool:
        return self.congested_since is not None and now - self.congested_since > timeout_s

    def take(self) -> bytes | None:
        """Everything pending (up to ``max_frame_bytes``) as one frame, or None."""
        if self._backlog and self.size < self.soft_bytes:
            self._refill()
        items = self._items
        if not items and not self._dropped_unreported:
            return None
        first = items[0] if items else None
        if (
            first is not None
            and len(items) == 1
            and not self._dropped_unreported
            and len(first.wire) <= self.max_frame_bytes
        ):
            # Micro-optimisation for the common case: hand over the shared bytes object.
            self._items = _EMPTY  # an idle connection holds no deque (about 0.7 KiB)
            self.size = 0
            self._drained()
            return first.wire
        parts: list[bytes] = []
        budget = self.max_frame_bytes
        if self._dropped_unreported:
            notice = protocol.dropped(self._dropped_unreported)
            parts.append(notice)
            budget -= len(notice)
            self._dropped_unreported = 0
        taken = 0
        while items:
            item = items[0]
            if len(item.wire) > budget:
                if taken or (parts and len(item.wire) <= self.max_frame_bytes):
                    break  # the rest goes in the next frame (after a DROPPED notice alone)
                if item.entries is not None and len(item.entries) > 1:
                    self._explode_first()
                    continue
            items.popleft()
            self.size -= len(item.wire)
            parts.append(item.wire)
            budget -= len(item.wire)
            taken += 1
        if self.size <= self.soft_bytes:
            self._drained()
        return b"".join(parts)

    def _refill(self) -> None:
        """Move the backlog's next frames into the buffer, no more than the frame that
        :meth:`take` makes next carries: a replay never waits in the buffer, where a
        burst of room messages could coalesce or drop it."""
        backlog = self._backlog
        if self._items is _EMPTY:
            self._items = deque()
        room = min(self.soft_bytes, self.max_frame_bytes)
        while backlog and (self.size == 0 or self.size + len(backlog[0].wire) <= room):
            batch = backlog.popleft()
            self._items.append(batch)
            self.size += len(batch.wire)
            self.backlog_size -= len(batch.wire)
        if not backlog:
            self._backlog = _EMPTY

    def _drained(self) -> None:
        self.congested_since = None
        self._coalesce_above = self.soft_bytes

    def _explode_first(self) -> None:
        batch = self._items.popleft()
        assert batch.entries is not None
        self._items.extendleft(Batch(e.wire, [e]) for e in reversed(batch.entries))

    def _explode_all(self) -> None:
        exploded: deque[Batch] = deque()
        for batch in self._items:
            if batch.entries is None or len(batch.entries) == 1:
                exploded.append(batch)
            else:
                exploded.extend(Batch(e.wire, [e]) for e in batch.entries)
        self._items = exploded

    def _relieve(self, now: float) -> None:
        # Coalescing walks the whole buffer, so do it again only after the buffer
        # has grown by a step: amortised cost stays constant per message.
        if self.size > self._coalesce_above or self.size > self.hard_bytes:
            self._explode_all()
            self._coalesce()
            self._coalesce_above = self.size + max((self.hard_bytes - self.soft_bytes) // 4, 1)
        if self.size > self.hard_bytes:
            if self.congested_since is None:
                self.congested_since = now
            self._drop_events()
            if self.size > self.hard_bytes:
                self.must_close = True

    def _coalesce(self) -> None:
        seen: set[tuple[int, str | int | None]] = set()
        kept: deque[Batch] = deque()
        removed = 0
        for batch in reversed(self._items):
            entries = batch.entries
            if entries and entries[0].kind is MsgType.STATE and entries[0].key is not None:
                entry = entries[0]  # (a replayed STATE has no key: the history keeps only its bytes)
                slot = (entry.actor, entry.key)
                if slot in seen:
                    removed += 1
                    self.size -= len(batch.wire)
                    continue
                seen.add(slot)
            kept.appendleft(batch)
        self._items = kept
        self.coalesced_total += removed

    def _drop_events(self) -> None:
        # Drop to a little under the limit so that a steady stream does not pay
        # for a full pass over the buffer on every message.
        target = self.hard_bytes - (self.hard_bytes - self.soft_bytes) // 4
        self._explode_all()
        kept: deque[Batch] = deque()
        dropped = 0
        for batch in self._items:
            if self.size > target and batch.entries and batch.entries[0].droppable:
                self.size -= len(batch.wire)
                dropped += 1
                continue
            kept.append(batch)
        self._items = kept
        self.dropped_total += dropped
        self._dropped_unreported += dropped
