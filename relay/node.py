"""This process's share of the rooms: local seats, their outboxes, and delivery.

The node sits between connections and the backplane. Moves go in through
:meth:`Node.submit`, collected per room for one event-loop iteration and then
published as one batch; the room order comes back through :meth:`Node.deliver`
(the same path for the memory and the Redis backplane), where each batch is
encoded once and the same bytes are queued for every member that should get all
of it. Nothing here awaits a client's socket: it only fills outboxes and wakes
each connection's writer.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import Any

import msgpack

from relay import protocol
from relay.backplane.base import Backplane, Joined
from relay.config import Settings
from relay.frames import binary_frame
from relay.metrics import Stats
from relay.outbox import Batch, Outbox
from relay.protocol import DIRECT, EVENT, JOIN, LEAVE, STATE, CloseCode, ErrorCode
from relay.room import Entry, Member, RoomState, snapshot_cost
from relay.rules.base import load, parse_rules_setting
from relay.rules.guard import GuardedRules, RulesFailures

log = logging.getLogger("relay.node")
_DROPPED_HEAD = protocol.dropped(0)[:2]  # how a DROPPED message starts; no DIRECT's wire does


@dataclass(eq=False, slots=True)
class Seat:
    """One local connection's place in a room."""

    room: LocalRoom
    player: str
    meta: dict[str, Any]
    echo: bool
    outbox: Outbox
    wake: Callable[[], None]
    close: Callable[[int, str, bool], None]  # (code, reason, flush first)
    actor: int = 0
    after_offset: int = 0  # the offset of this seat's WELCOME: it gets what follows
    early: list[list[Entry]] | None = field(default_factory=list)  # batches seen while joining
    left: bool = False
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    resume_token: str = ""  # ``<actor>.<secret>``, set once seated
    last_seq: int | None = None  # the highest seq accepted from this seat, across connections
    held: asyncio.TimerHandle | None = None  # set while the seat waits for its player to resume
    held_code: int = 0
    hold_over: bool = False  # the hold ran out: its LEAVE is on the way, and a resume is a fresh join
    held_directs: list[bytes] | None = None  # made when a DIRECT arrives for a held seat
    held_directs_lost: int = 0  # DIRECTs for the held seat past max_held_directs: told with DROPPED
    # Taken over from another node, which keeps and passes on the DIRECTs published before
    # the takeover: this node takes DIRECTs only once the takeover shows in the room's stream.
    arriving: bool = False
    arrive_after: int = 0  # the takeover's offset: a room entry past it comes after its notice
    owner: object = None  # the connection serving this seat now
    # Writes an already framed message now if the socket can take it (the fast path).
    send_framed: Callable[[bytes], bool] | None = None
    # Given by the connection whose break left the seat held: gives back what that
    # connection counted against the server's limits, when the hold ends.
    release: Callable[[], None] | None = None

    def unplug(self) -> None:
        """No connection serves this seat any more (it is held, or gone)."""
        self.wake = self.close = _nothing  # type: ignore[assignment]
        self.send_framed = None


@dataclass(slots=True)
class _Resume:
    """A resume token's parts, and where the player's view of the room ends."""

    actor: int
    secret: str
    offset: int | None
    epoch: str | None


@dataclass(eq=False, slots=True)
class LocalRoom:
    name: str
    state: RoomState | None = None  # mirror of the room, kept current by deliveries
    seats: dict[int, Seat] = field(default_factory=dict)
    joining: list[Seat] = field(default_factory=list)
    arriving: list[Seat] = field(default_factory=list)  # seats taken over, their takeover not yet seen
    pending: list[Entry] = field(default_factory=list)
    # STATEs taken but not yet published: their keys' costs (0: deleted), and what they
    # change the snapshot's size by, so that max_snapshot_bytes holds within a batch too.
    pending_state: dict[tuple[int, str | int], int] = field(default_factory=dict)
    pending_state_change: int = 0
    rules: GuardedRules | None = None  # the game rules of the room's type, if any
    last_publish: float = -1e9  # loop time of the room's last published batch
    publish_timer: asyncio.TimerHandle | None = None
    gone_checks: list[tuple[int, Seat]] = field(default_factory=list)  # see Node.seat_gone


class Node:
    def __init__(self, backplane: Backplane, settings: Settings, stats: Stats) -> None:
        self.backplane = backplane
        self.settings = settings
        self.stats = stats
        self.rooms: dict[str, LocalRoom] = {}
        self._to_publish: list[LocalRoom] = []
        self._publish_scheduled = False
        self._to_flush: set[Seat] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self.tokens: dict[str, Seat] = {}  # resume token -> seat, for seats in a room
        self._batch_per_member_s = settings.batch_us_per_member / 1e6
        self._max_batch_s = settings.max_batch_ms / 1000.0
        self._keeps_seqs = backplane.hands_off_seats
        # The loop, once started: asyncio.get_running_loop() makes a getpid() system call
        # on every call in Python 3.11, and the hot path would make one per move.
        self._loop: asyncio.AbstractEventLoop | None = None
        self.rules = {
            room_type: load(spec) for room_type, spec in parse_rules_setting(settings.rules).items()
        }
        self.rules_failures = RulesFailures(stats.rules_failures)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop or asyncio.get_running_loop()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.backplane.start(self)
        interval = self.settings.flush_ms / 1000.0
        self._ticker = asyncio.create_task(self._tick(interval))

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        await self.backplane.close()

    def seats(self) -> list[Seat]:
        return [seat for room in self.rooms.values() for seat in room.seats.values()]

    # --- joining and leaving ---------------------------------------------------------

    async def join(self, seat: Seat) -> Joined:
        """Seat a connection in its room; WELCOME is queued on its outbox. May raise RoomFull."""
        joined = await self._enter(seat, None)
        assert joined is not None
        return joined

    async def _enter(self, seat: Seat, resume: _Resume | None) -> Joined | None:
        """Join, or take over a seat held elsewhere (``resume``; None when there is no such
        seat). WELCOME, then any replayed history, then the room's live order."""
        room = seat.room
        if room.name not in self.rooms:
            self.rooms[room.name] = room
            try:
                await self.backplane.subscribe(room.name)
            except BaseException:
                if not room.seats and not room.joining and self.rooms.get(room.name) is room:
                    del self.rooms[room.name]
                raise
        room = seat.room = self.rooms[room.name]
        self._publish_room(room)  # moves already read come before this JOIN
        room.joining.append(seat)
        missed = None
        try:
            if resume is None:
                joined = await self.backplane.join(
                    room.name,
                    seat.player,
                    seat.meta,
                    max_players=self.settings.max_players_per_room,
                    secret=seat.secret,
                )
            else:
                seat.actor = resume.actor  # DIRECTs passed on from its old node may come before WELCOME
                seat.arriving = True
                room.arriving.append(seat)
                joined = await self.backplane.takeover(room.name, resume.actor, resume.secret, seat.player)
                if joined is not None and resume.offset is not None and resume.epoch is not None:
                    missed = await self._missed(room.name, resume.offset, resume.epoch, resume.actor)
        except BaseException:
            room.joining.remove(seat)
            self._arrived(seat)
            await self._forget_if_empty(room)
            raise
        room.joining.remove(seat)
        if joined is not None:
            seat.arrive_after = joined.offset
        else:
            self._arrived(seat)
            # No such seat: the caller may join afresh.
            seat.actor, seat.held_directs, seat.held_directs_lost = 0, None, 0
            await self._forget_if_empty(room)
            return None
        seat.actor = joined.member.actor
        if resume is not None:
            seat.secret, seat.last_seq = resume.secret, joined.last_seq
            seat.held_directs_lost += joined.directs_lost
            if joined.directs:  # kept by the backplane while the seat was held: before any passed on since
                kept = [*joined.directs, *(seat.held_directs or [])]
                self._keep_held_directs(seat, kept)
        seat.resume_token = f"{seat.actor}.{seat.secret}"
        if room.state is None or room.state.epoch != joined.epoch:
            s = self.settings
            room.state = _mirror(room.name, joined, s.history_size, s.max_replay_bytes + s.max_snapshot_bytes)
            self._start_rules(room)
            for entry in chain.from_iterable(seat.early or ()):  # delivered while this node had no copy of the room
                if entry.offset > room.state.offset:
                    room.state.apply(entry)
                    if room.rules is not None:
                        room.rules.tell(entry, entry.actor in room.seats)
        early, seat.early = seat.early or [], None
        room.seats[seat.actor] = seat
        self.tokens[seat.resume_token] = seat
        now = time.monotonic()
        seen = joined.offset  # the seat has the room up to here
        back = None
        if missed is not None:
            assert resume is not None and resume.offset is not None
            back = _as_of(joined, room.state, resume.offset, missed)
        if back is not None:
            assert missed is not None and resume is not None and resume.offset is not None
            seat.outbox.push_control(self._welcome(seat, back), now)
            self._replay(seat, missed, now)
            # What this node has delivered so far may end before the takeover's offset:
            # the rest comes through deliver(), so the seat must take it from here.
            seen = missed[-1].offset if missed else resume.offset
        else:
            seat.outbox.push_control(self._welcome(seat, joined), now)
        for entries in early:
            later = [e for e in entries if e.offset > seen]
            own_leave = next((i for i, e in enumerate(later) if e.kind is LEAVE and e.actor == seat.actor), None)
            if own_leave is not None:
                later = later[:own_leave]  # the seat is no member past its own LEAVE (closed below)
            if later:
                self._push(seat, Batch(b"".join(e.wire for e in later), later), now)
                seen = later[-1].offset
            if own_leave is not None:
                break
        seat.after_offset = seen
        self._push_held_directs(seat, now)
        seat.wake()
        gone = [e for e in chain.from_iterable(early) if e.kind is LEAVE and e.actor == seat.actor and e.offset > joined.offset]
        if gone:
            # Its player joined again while this join was on its way (with Redis, the JOIN
            # reply can come after the room's LEAVE for it): the room has replaced it already.
            self.loop.call_soon(self._removed_elsewhere, seat, _leave_code(gone[0]))
        return joined

    async def _missed(self, room_name: str, offset: int, epoch: str, actor: int) -> list[Entry] | None:
        """What a resuming seat missed, or None (a fresh snapshot) when history cannot give
        it all, it passes ``max_replay_bytes``, or ``offset`` comes before the seat's own
        JOIN (no client saw the room then, and a WELCOME as of then could not list it).

        Never raises: the seat is already taken over, and a failed read must not leave it
        held in the backplane with no connection here to play or leave it.
        """
        try:
            missed = await self.backplane.history(room_name, offset, epoch)
        except Exception:
            log.exception("reading %s's history for a resume failed; sending a fresh snapshot", room_name)
            return None
        if missed is not None and sum(len(e.wire) for e in missed) > self.settings.max_replay_bytes:
            return None
        if missed and any(e.kind is JOIN and e.actor == actor for e in missed):
            return None
        return missed

    def _replay(self, seat: Seat, entries: list[Entry], now: float) -> None:
        """Queue room messages a resuming seat missed (not its own, unless it echoes): sent
        as fast as its socket takes them, whatever the outbox limits (see Outbox.catch_up)."""
        mine = [e for e in entries if seat.echo or e.actor != seat.actor]
        seat.outbox.catch_up(mine, self.settings.max_replay_bytes)

    async def leave(self, seat: Seat, close_code: int) -> None:
        """Take a seat out of its room; the room gets LEAVE. Safe to call twice."""
        if seat.left:
            return
        seat.left = True
        self._arrived(seat)
        if seat.held is not None:
            self._end_hold(seat)
        if self.tokens.get(seat.resume_token) is seat:
            del self.tokens[seat.resume_token]
        room = seat.room
        self._publish_room(room)  # the leaver's last moves come before its LEAVE
        if room.seats.get(seat.actor) is seat:
            del room.seats[seat.actor]
        self._to_flush.discard(seat)
        try:
            await self.backplane.leave(room.name, seat.actor, close_code)
        finally:
            await self._forget_if_empty(room)

    # --- holding a seat for resume --------------------------------------------------------

    def hold(self, seat: Seat, close_code: int) -> None:
        """Keep a broken connection's seat for ``resume_window_s``; then it leaves."""
        if seat.left or seat.held is not None:
            return
        seat.outbox = Outbox(soft_bytes=1, hard_bytes=1, max_frame_bytes=1)  # free the backlog
        seat.unplug()
        seat.held_code = close_code
        loop = asyncio.get_running_loop()
        seat.held = loop.call_later(self.settings.resume_window_s, self._hold_ran_out, seat, close_code)

    def _hold_ran_out(self, seat: Seat, close_code: int) -> None:
        # Over now, not when the LEAVE task gets to run: a resume in between would
        # take the seat back, and that LEAVE would then take it from under it.
        seat.hold_over = True
        self._spawn(self.leave(seat, close_code))

    def holds(self, token: str | None, player: str, room_name: str) -> bool:
        """Whether ``token`` resumes a seat held here for ``player`` in that room."""
        seat = self.tokens.get(token) if token else None
        return (
            seat is not None and seat.held is not None and not seat.left and not seat.hold_over
            and seat.player == player and seat.room.name == room_name
        )

    def _end_hold(self, seat: Seat) -> None:
        seat.held.cancel()  # type: ignore[union-attr]
        seat.held = None
        release, seat.release = seat.release, None
        if release is not None:
            release()

    async def resume(
        self, token: str, player: str, room_name: str, offset: int | None, epoch: str | None, seat: Seat
    ) -> Seat | None:
        """Put a new connection in the seat its token names; None when there is no such seat.

        The WELCOME (same actor) goes on ``seat``'s outbox, followed by the room's
        messages after ``offset`` when history still has them all (else WELCOME
        carries the current snapshot), then any DIRECTs kept while it was away.
        A seat of another node is taken over through the backplane (see
        :meth:`seat_moved` for the other side).
        """
        old = self.tokens.get(token)
        if old is None and self.backplane.hands_off_seats:
            actor, _, secret = token.partition(".")
            if not actor.isdigit() or not secret or seat.room.name != room_name:
                return None
            joined = await self._enter(seat, _Resume(int(actor), secret, offset, epoch))
            if joined is not None:
                self.stats.resumes["another_node"] += 1
            return seat if joined is not None else None
        if old is None or old.left or old.hold_over or old.player != player or old.room.name != room_name:
            return None
        room = old.room
        self._publish_room(room)
        missed = None
        if offset is not None and epoch is not None:
            # Read first, leaving the seat as it is meanwhile (held, or served by its old
            # connection): with Redis this is a round trip, and the seat may leave during it.
            missed = await self._missed(room.name, offset, epoch, old.actor)
            if old.left or old.hold_over or self.tokens.get(token) is not old:
                return None  # its hold ran out meanwhile: the caller joins afresh
        if old.held is not None:
            self._end_hold(old)
        else:  # the old connection is still open (a half-dead link): it is replaced
            old.close(CloseCode.REPLACED, "this seat was resumed by a new connection", False)
        state = room.state
        assert state is not None
        old.outbox, old.wake, old.close, old.echo = seat.outbox, seat.wake, seat.close, seat.echo
        old.owner, old.send_framed = seat.owner, seat.send_framed
        old.after_offset = state.offset
        now = time.monotonic()
        joined = Joined(
            # With Redis the mirror can lag behind the seat (its JOIN still on the way).
            member=state.members.get(old.actor) or Member(old.actor, old.player, old.meta),
            members=state.member_list(),
            snapshot={actor: dict(values) for actor, values in state.snapshot.items()},
            offset=state.offset,
            epoch=state.epoch,
        )
        if missed is not None and offset is not None:
            back = _as_of(joined, state, offset, missed)
            if back is None:
                missed = None  # a fresh snapshot at the current offset instead
            else:
                joined = back
        old.outbox.push_control(self._welcome(old, joined), now)
        if missed:
            self._replay(old, missed, now)
        self._push_held_directs(old, now)
        old.wake()
        self.stats.resumes["this_node"] += 1
        return old

    def seat_arrived(self, room_name: str, actor: int) -> None:
        """This node's takeover of ``actor``'s seat is in the room's stream: DIRECTs
        published from here on are for this node to deliver (earlier ones, the seat's
        old node passes on)."""
        room = self.rooms.get(room_name)
        for seat in room.arriving if room is not None else ():
            if seat.actor == actor:
                self._arrived(seat)
                return

    def _arrived(self, seat: Seat) -> None:
        if seat.arriving:
            seat.arriving = False
            seat.room.arriving.remove(seat)

    def seat_moved(self, room_name: str, actor: int) -> None:
        """The seat's player resumed on another node: let the seat go here, without a LEAVE."""
        room = self.rooms.get(room_name)
        seat = room.seats.get(actor) if room is not None else None
        if room is None or seat is None:
            return
        if seat.held is not None:
            self._end_hold(seat)
        else:  # the old connection is still open here (a half-dead link): it is replaced
            seat.close(CloseCode.REPLACED, "this seat was resumed on another node", False)
        self._let_go(seat)
        if seat.held_directs_lost:  # the count goes with them, as the DROPPED its player gets
            self.backplane.direct(room_name, actor, protocol.dropped(seat.held_directs_lost))
        for wire in seat.held_directs or ():  # kept for it here: passed on to its new node
            self.backplane.direct(room_name, actor, wire)
        seat.held_directs, seat.held_directs_lost = None, 0
        self._spawn(self._forget_if_empty(room))

    def seat_gone(self, room_name: str, actor: int, offset: int) -> None:
        """The backplane refused moves of a seat no longer in the room, whose order had
        reached ``offset``. The seat's LEAVE, at or before it, tells why (4409: replaced)
        and closes the seat with the matching code when it is delivered here. Closing now
        with 1011 could beat a 4409 LEAVE, and the client, rejoining, would then replace
        its player's newer connection. So the seat is closed with 1011 only if the room's
        order reaches ``offset`` here and it is still seated (a LEAVE this node missed)."""
        room = self.rooms.get(room_name)
        seat = room.seats.get(actor) if room is not None else None
        if room is None or seat is None:
            return
        if room.state is not None and room.state.offset >= offset:
            self._removed_elsewhere(seat, None)
        else:
            room.gone_checks.append((offset, seat))

    def _check_gone(self, room: LocalRoom, delivered: int) -> None:
        due = [(at, seat) for at, seat in room.gone_checks if at <= delivered]
        room.gone_checks = [(at, seat) for at, seat in room.gone_checks if at > delivered]
        for _, seat in due:
            if room.seats.get(seat.actor) is seat:
                self._removed_elsewhere(seat, None)

    def _removed_elsewhere(self, seat: Seat, leave_code: int | None) -> None:
        """The room no longer has this node's seat: its player joined again (4409), or the
        other nodes took this one for dead and removed it (1011: the client rejoins)."""
        if leave_code == CloseCode.REPLACED:
            self.kick(seat, CloseCode.REPLACED, "this player joined again", flush=True)
        else:
            why = "this seat was removed from the room while its server was unreachable; rejoin"
            self.kick(seat, CloseCode.INTERNAL_ERROR, why, flush=True)
        # No longer a member: what the room does next (its successor's JOIN, with the
        # LEAVE before it not delivered to the seat itself) is not for it.
        if seat.room.seats.get(seat.actor) is seat:
            del seat.room.seats[seat.actor]

    def hand_off(self, seat: Seat) -> None:
        """This process is going away: its seat stays in the room, held by the backplane for
        a resume on another node (``hands_off_seats``), which sends LEAVE if none comes."""
        self._publish_room(seat.room)  # its last moves go out first
        self._let_go(seat)

    def _let_go(self, seat: Seat) -> None:
        seat.left = True
        self._arrived(seat)
        seat.owner = None  # its connection, if any, neither holds nor leaves it
        if self.tokens.get(seat.resume_token) is seat:
            del self.tokens[seat.resume_token]
        if seat.room.seats.get(seat.actor) is seat:
            del seat.room.seats[seat.actor]
        self._to_flush.discard(seat)

    def kick(self, seat: Seat, code: int, reason: str, *, flush: bool) -> None:
        """Close a seat's connection from the server side and take it out of its room."""
        if seat.left or seat.held is not None:  # gone, or already closed and held for a resume
            return
        seat.close(code, reason, flush)
        if code == CloseCode.SLOW_CONSUMER:
            self.stats.slow_consumer_closes += 1
            if self.settings.resume_window_s > 0:
                self.hold(seat, code)  # it may resume and catch up from the room's history
                return
        self._spawn(self.leave(seat, code))

    async def _forget_if_empty(self, room: LocalRoom) -> None:
        if not room.seats and not room.joining and self.rooms.get(room.name) is room:
            del self.rooms[room.name]
            await self.backplane.unsubscribe(room.name)

    # --- moves in --------------------------------------------------------------------

    def submit(self, seat: Seat, entry: Entry, seq: int | None = None, state_change: int = 0) -> bool:
        """Queue a move for the room order; published at the end of this loop iteration.

        While the backplane is unavailable (Redis down) the move is refused with
        ERROR ``unavailable`` instead (False): never taken and then silently lost.
        A STATE comes with what it changes the snapshot's size by (:meth:`snapshot_change`).
        """
        if not self.backplane.ready():
            self._unavailable(seat, seq if seq is not None else _seq_of(entry))
            return False
        room = seat.room
        if not room.pending:
            self._to_publish.append(room)
            if not self._publish_scheduled:
                self._publish_scheduled = True
                self.loop.call_soon(self._publish_all)
        if entry.kind is STATE:
            room.pending_state_change += state_change
            room.pending_state[(entry.actor, entry.key)] = (  # type: ignore[index]
                0 if entry.value == protocol.NIL else snapshot_cost(entry.value)  # type: ignore[arg-type]
            )
        room.pending.append(entry)
        if seq is not None:
            seat.last_seq = seq  # taken: recorded with the batch that carries it (see _publish_room)
        return True

    def has_actor(self, seat: Seat, actor: int) -> bool:
        state = seat.room.state
        return state is not None and actor in state.members

    def direct(self, seat: Seat, to_actor: int, seq: int, data: bytes) -> bool:
        """Send a DIRECT to a member (``has_actor``); False when it could not be taken
        (the backplane is unavailable: ERROR ``unavailable``, as :meth:`submit`)."""
        room = seat.room
        if not self.backplane.ready():
            self._unavailable(seat, seq)
            return False
        if room.pending:  # the seat's earlier moves are taken first (``seqs`` stay in order)
            self._publish_room(room)
        self.backplane.direct(room.name, to_actor, protocol.direct(seat.actor, seq, data), seat.actor, seq)
        return True

    def snapshot_change(self, seat: Seat, key: str | int, data: bytes) -> int | None:
        """How much setting (or, with nil, deleting) the seat's ``key`` changes the room's
        snapshot size; None when the change would take it past ``max_snapshot_bytes``, as
        this node sees the room with the STATEs it has taken (with Redis, not those of
        other nodes still on their way: one round trip's worth)."""
        room, state = seat.room, seat.room.state
        now = room.pending_state.get((seat.actor, key))
        if now is None:
            before = state.snapshot.get(seat.actor, {}).get(key) if state is not None else None
            now = snapshot_cost(before) if before is not None else 0
        change = (0 if data == protocol.NIL else snapshot_cost(data)) - now
        if change > 0 and state is not None:
            if state.snapshot_size + room.pending_state_change + change > self.settings.max_snapshot_bytes:
                return None
        return change

    def _unavailable(self, seat: Seat, seq: int | None) -> None:
        self.stats.errors[ErrorCode.UNAVAILABLE.value] += 1
        why = "the relay cannot reach its backplane right now; the move was not relayed"
        self.reply(seat, protocol.error(seq, ErrorCode.UNAVAILABLE, why))

    def _publish_all(self) -> None:
        """Publish the rooms that got moves this iteration, or hold busy big rooms briefly.

        A room whose last batch went out less than its batch window ago waits for
        the rest of that window. The window grows with the room's local members
        (``batch_us_per_member``, at most ``max_batch_ms``) because each batch
        costs a frame per member: a big busy room sends fewer, fuller frames, and
        a quiet room's move, or a small room's, goes out at once.
        """
        self._publish_scheduled = False
        rooms, self._to_publish = self._to_publish, []
        loop = self.loop
        now = loop.time()
        per_member, cap = self._batch_per_member_s, self._max_batch_s
        for room in rooms:
            window = len(room.seats) * per_member
            if window > cap:
                window = cap
            if now - room.last_publish < window:
                if room.publish_timer is None:
                    room.publish_timer = loop.call_at(room.last_publish + window, self._publish_held, room)
                continue
            self._publish_room(room)

    def _publish_held(self, room: LocalRoom) -> None:
        room.publish_timer = None
        self._publish_room(room)

    def _publish_room(self, room: LocalRoom) -> None:
        if room.pending:
            entries, room.pending = room.pending, []
            if room.pending_state:  # from here on the room's order counts them
                room.pending_state.clear()
                room.pending_state_change = 0
            room.last_publish = self.loop.time()
            seqs = None
            if self._keeps_seqs:  # for a takeover elsewhere: what the room has from each seat
                seats = room.seats
                seqs = {}
                for actor in {e.actor for e in entries}:
                    seat = seats.get(actor)
                    if seat is not None and seat.last_seq is not None:
                        seqs[actor] = seat.last_seq
            self.backplane.publish(room.name, entries, seqs)

    # --- the room order out ----------------------------------------------------------

    def deliver(self, room_name: str, entries: list[Entry]) -> None:
        room = self.rooms.get(room_name)
        if room is None or not entries:
            return
        state = room.state
        if state is not None:
            if entries[0].offset <= state.offset:  # some were in the snapshot already
                entries = [e for e in entries if e.offset > state.offset]
            for entry in entries:
                state.apply(entry)
                if room.rules is not None:
                    room.rules.tell(entry, entry.actor in room.seats)
            if not entries:
                return
        if room.arriving:  # an entry sequenced after a takeover comes after its notice
            last = entries[-1].offset
            for seat in [s for s in room.arriving if 0 < s.arrive_after < last]:
                self._arrived(seat)
        for seat in room.joining:
            if seat.early is not None:
                seat.early.append(entries)
        for entry in entries:
            if entry.kind is LEAVE:
                gone = room.seats.get(entry.actor)
                if gone is not None:  # seated here but removed elsewhere
                    self._removed_elsewhere(gone, _leave_code(entry))
        if room.gone_checks:
            self._check_gone(room, entries[-1].offset)
        seats = room.seats
        if not seats:
            return
        first = entries[0].offset
        wire = entries[0].wire if len(entries) == 1 else b"".join(e.wire for e in entries)
        shared = Batch(wire, entries)
        authors = {e.actor for e in entries}
        now = time.monotonic()
        framed: bytes | None = None  # the WebSocket frame of ``wire``, made once for everyone
        written = 0
        for seat in list(seats.values()):
            if seat.held is not None:
                continue  # it will catch up from the room's history when it resumes
            if seat.after_offset < first and (seat.echo or seat.actor not in authors):
                # The common case first: nothing queued for this seat and a socket that
                # can take the frame now, so it is written at once, with no copy.
                send = seat.send_framed
                outbox = seat.outbox
                if send is not None and not outbox.size and not outbox.backlog_size:  # nothing queued
                    if framed is None:
                        framed = binary_frame(wire)
                    if send(framed):
                        written += 1
                        continue
                self._push(seat, shared, now)
            elif len(entries) > 1:  # a lone entry is either this seat's own or already seen
                own = [e for e in entries if e.offset > seat.after_offset and (seat.echo or e.actor != seat.actor)]
                if own:
                    self._push(seat, Batch(b"".join(e.wire for e in own), own), now)
        stats = self.stats
        stats.count_out(entries, len(seats))
        if written:
            stats.frames_out += written
            stats.bytes_out += written * len(framed)  # type: ignore[arg-type]

    def resync(self, room_name: str) -> None:
        """The backplane lost part of this room's order: close its seats here (1011), so
        that their clients rejoin with a fresh snapshot, and forget the room's mirror."""
        room = self.rooms.get(room_name)
        if room is None:
            return
        room.state = None
        room.rules = None
        seats, room.seats = list(room.seats.values()), {}
        for seat in seats:
            self.kick(seat, CloseCode.INTERNAL_ERROR, "room resynchronising; rejoin", flush=True)

    def deliver_direct(self, room_name: str, to_actor: int, wire: bytes) -> None:
        room = self.rooms.get(room_name)
        if room is None:
            return
        seat = room.seats.get(to_actor)
        if seat is None:  # maybe a seat being taken over here, its DIRECTs passed on from its old node
            seat = next((s for s in room.joining if s.actor == to_actor), None)
            if seat is None:
                return
        elif seat.held is None and not seat.arriving:
            entry = Entry(DIRECT, to_actor, b"", wire=wire)
            self._push(seat, Batch(wire, [entry]), time.monotonic())
            self.stats.messages_out[DIRECT] += 1
            return
        if seat.arriving:
            return  # published before the takeover: the seat's old node keeps it, and passes it on
        if wire.startswith(_DROPPED_HEAD):  # a count passed on from the seat's old node (seat_moved)
            seat.held_directs_lost += msgpack.unpackb(wire)[1]
            return
        kept = seat.held_directs if seat.held_directs is not None else []
        kept.append(wire)
        self._keep_held_directs(seat, kept)

    def _keep_held_directs(self, seat: Seat, kept: list[bytes]) -> None:
        """Keep the newest ``max_held_directs`` for the held seat, and count the others."""
        over = len(kept) - self.settings.max_held_directs
        if over > 0:
            del kept[:over]
            seat.held_directs_lost += over
            self.stats.dropped += over
        seat.held_directs = kept

    def _push_held_directs(self, seat: Seat, now: float) -> None:
        if seat.held_directs_lost:  # the player is told, after its WELCOME, before the DIRECTs kept
            seat.outbox.push_control(protocol.dropped(seat.held_directs_lost), now)
            seat.held_directs_lost = 0
        for wire in seat.held_directs or ():
            self._push(seat, Batch(wire, [Entry(DIRECT, seat.actor, b"", wire=wire)]), now)
            self.stats.messages_out[DIRECT] += 1
        seat.held_directs = None

    # --- game rules ------------------------------------------------------------------

    def _start_rules(self, room: LocalRoom) -> None:
        cls = self.rules.get(room.name.partition(":")[0]) if ":" in room.name else None
        if cls is None or room.state is None:
            room.rules = None
            return
        s = self.settings
        room.rules = GuardedRules(
            cls, room.state, self.rules_failures, max_message_bytes=s.max_message_bytes, max_depth=s.max_depth
        )

    def reply(self, seat: Seat, wire: bytes) -> None:
        """Queue a control message (ERROR, PONG) for one seat."""
        self._push(seat, Batch(wire, None), time.monotonic())

    def _push(self, seat: Seat, batch: Batch, now: float) -> None:
        outbox = seat.outbox
        dropped, coalesced = outbox.dropped_total, outbox.coalesced_total
        outbox.push(batch, now)
        if outbox.dropped_total != dropped or outbox.coalesced_total != coalesced:
            self.stats.dropped += outbox.dropped_total - dropped
            self.stats.coalesced += outbox.coalesced_total - coalesced
        if outbox.must_close or (
            outbox.congested_since is not None
            and outbox.overdue(now, self.settings.slow_client_timeout_s)
        ):
            self.kick(seat, CloseCode.SLOW_CONSUMER, "could not keep up with the room", flush=False)
        elif self.settings.flush_ms > 0:
            self._to_flush.add(seat)  # the ticker wakes it
        else:
            # Everything this event-loop iteration queues for a seat goes out as one frame.
            if not self._to_flush:
                self.loop.call_soon(self._flush_seats)
            self._to_flush.add(seat)

    def _flush_seats(self) -> None:
        seats, self._to_flush = self._to_flush, set()
        for seat in seats:
            seat.wake()

    async def _tick(self, interval: float) -> None:
        """Wake writers on a fixed tick (``flush_ms``); also close overdue slow readers."""
        sweep_every = 1.0
        next_sweep = time.monotonic() + sweep_every
        while True:
            await asyncio.sleep(interval if interval > 0 else sweep_every)
            if self._to_flush:
                seats, self._to_flush = self._to_flush, set()
                for seat in seats:
                    seat.wake()
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + sweep_every
                self._sweep(now)

    def _sweep(self, now: float) -> None:
        timeout = self.settings.slow_client_timeout_s
        for seat in self.seats():
            if seat.outbox.overdue(now, timeout):
                self.kick(seat, CloseCode.SLOW_CONSUMER, "could not keep up with the room", flush=False)

    def _welcome(self, seat: Seat, joined: Joined) -> bytes:
        return protocol.welcome(
            actor=seat.actor,
            room=seat.room.name,
            members=joined.members,
            snapshot=joined.snapshot,
            server_time_ms=int(time.time() * 1000),
            limits=self.settings.limits(),
            offset=joined.offset,
            epoch=joined.epoch,
            resume_token=seat.resume_token,
            last_seq=seat.last_seq,
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _nothing(*args: Any) -> None:
    pass


def _seq_of(entry: Entry) -> int | None:
    """An EVENT's seq, read back from its head ([1, actor, seq, data]); None otherwise."""
    if entry.kind is not EVENT:
        return None
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(entry.head[:20])  # type, actor and seq fit in 20 bytes
    try:
        unpacker.read_array_header()
        unpacker.skip()
        unpacker.skip()
        seq = unpacker.unpack()
    except (msgpack.OutOfData, ValueError):
        return None
    return seq if type(seq) is int else None


def _leave_code(entry: Entry) -> int | None:
    """The close code a LEAVE carries: ``[6, actor, close_code, offset]``."""
    try:
        code = msgpack.unpackb(entry.wire)[2]
    except (ValueError, IndexError, TypeError):
        return None
    return code if type(code) is int else None


def _as_of(joined: Joined, state: RoomState, offset: int, missed: list[Entry] | None = None) -> Joined | None:
    """A resume's WELCOME: the member list and snapshot as they were at ``offset``, which
    the replay that follows (``missed``) then brings up to date. The mirror's undo log
    rewinds it, then the undo records that Redis keeps with its history take it on (a
    room new to this node, whose mirror starts at the takeover). None where neither
    reaches: the seat then gets a fresh snapshot at the current offset, since a WELCOME
    must hold the room exactly as of its offset."""
    at = state.rewound(offset, missed)
    if at is None:
        return None
    members, snapshot = at
    return replace(joined, members=members, snapshot=snapshot, offset=offset)


def _mirror(name: str, joined: Joined, undo_size: int, undo_bytes: int) -> RoomState:
    # The undo log reaches back as far as the history a resume can replay.
    state = RoomState(
        name, epoch=joined.epoch, offset=joined.offset, undo_size=undo_size, undo_bytes=undo_bytes,
        undo_floor=joined.offset,
    )
    for actor, player, meta in joined.members:
        state.members[actor] = Member(actor, player, meta)
    state.snapshot = {actor: dict(values) for actor, values in joined.snapshot.items()}
    state.snapshot_size = sum(snapshot_cost(v) for values in state.snapshot.values() for v in values.values())
    return state
