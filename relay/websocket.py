"""uvicorn's sans-I/O WebSocket protocol, taught to let go of dead and stuck peers.

Two changes to uvicorn's behaviour, both about peers that stop reading:

* A keepalive ping that gets no pong means the peer is dead. uvicorn then
  *closes* the transport, which waits for the write buffer to drain: with a
  half-open TCP connection or a peer whose receive window is zero, that never
  happens and the app never hears the connection is gone. We abort instead, so
  the relay sees the disconnect (and the room gets LEAVE) within
  ``ping_interval_s + ping_timeout_s``.
* A close frame for a peer whose socket is not writable would wait forever
  behind the data it is not reading. We queue the close frame behind that data
  without waiting, and abort the connection if the peer reads nothing for
  ``close_timeout_s``. A peer that keeps reading (a slow consumer working
  through its backlog towards its 4008) gets more time, up to
  ``max_close_wait_s`` in all, so that it can read why it was closed.

It also offers the relay a fast path past ASGI for binary frames, because the
cost per frame is what limits a relay (docs/design.md, "The hot path"):

* ``attach(on_binary)``: binary frames go straight to ``on_binary`` from
  ``data_received``, synchronously, instead of through uvicorn's queue, a task
  switch, and a pause/resume of reading per frame.
* Once attached, a read that holds only whole, final, masked binary frames of
  at most 65535 bytes (what a game client sends) is split here, without
  websockets' general parser (a generator step per header field, about as much
  CPU as the rest of a move's way through the relay). Anything else (a control
  frame, a fragment, a partial frame, a frame over the size limit) goes to
  websockets as before, and so does every read after it until its parser
  stands between two frames again (it says so by waiting in ``at_eof()``).
* ``send_frame_now(data)``: write one binary frame to the transport now, if it
  can take it. A server's frames are unmasked, so a frame is a 2-10 byte header
  and the payload. The payload is the shared ``bytes`` object, not a copy.

The ASGI app finds the protocol in ``scope["extensions"]["relay.websocket"]``.
Handshake, control frames, close, keepalive and parsing stay uvicorn's and
websockets' job.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.frames import apply_mask  # websockets' C version when it is built
from websockets.protocol import State

from relay.frames import binary_frame
from relay.slim import SlimEvent, SlimQueue

CLOSE_TIMEOUT_S = 5.0  # the settings' defaults (close_timeout_s, max_close_wait_s)
MAX_CLOSE_WAIT_S = 30.0
OUTQ = getattr(termios, "TIOCOUTQ", None)  # ioctl: bytes in a TCP socket's send queue (Linux, macOS)
REQUEST_TIMEOUT_S = 10.0  # a connection that has not sent its request headers by then is cut
MAX_REQUEST_HEAD_BYTES = 65536  # the max_request_head_bytes setting's default
TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
PING_FLOOD_BYTES = 1 << 20  # pongs a peer lets pile up unread before it is cut off
MAX_FRAGMENTS = 64  # the max_fragments setting's default
PING_LIMITS = (120.0, 240.0)  # WebSocket pings per second and at once: max_msgs_per_s and burst's defaults
EXTENSION = "relay.websocket"
log = logging.getLogger("relay")


class RelayWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The same methods in far less memory per connection (relay/slim.py).
        self.queue = SlimQueue()  # type: ignore[assignment]
        self.writable = SlimEvent(True)  # type: ignore[assignment]
        self.close_timeout, self._max_close_wait = getattr(
            self.config, "relay_close_timeouts", (CLOSE_TIMEOUT_S, MAX_CLOSE_WAIT_S)
        )
        self._max_fragments = getattr(self.config, "relay_max_fragments", MAX_FRAGMENTS)
        self._ping_limits: tuple[float, float] = getattr(self.config, "relay_ping_limits", PING_LIMITS)
        self._ping_tokens = self._ping_limits[1]
        self._pinged_at = 0.0
        self.on_binary: Callable[[bytes], None] | None = None
        self._split_here = False  # binary frames are split by split_binary_frames (attach)
        self._parser_idle = False  # websockets' parser known to wait between frames

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Data in the kernel's send buffer is out of the outbox's reach: it can be neither
        # coalesced nor dropped, and for a slow reader Linux grows that buffer to megabytes.
        # A fixed size keeps a slow reader's backlog in the outbox, where its limits apply.
        size = getattr(self.config, "relay_send_buffer_bytes", 0)
        sock = transport.get_extra_info("socket")
        if size and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def handle_cont(self, event: Any) -> None:
        # uvicorn keeps every fragment of a message until its last. Empty ones cost no
        # bytes, so max_frame_bytes never stops a peer that sends them without end: its
        # memory and the event loop's time would grow with it.
        if len(self.frames) >= self._max_fragments:
            self._fail(1009, f"a message in more than {self._max_fragments} fragments")
            return
        super().handle_cont(event)

    def handle_ping(self) -> None:
        # websockets answers every ping with a pong. A peer that floods pings and
        # reads nothing would make those pongs pile up in memory: cut it off.
        if self.transport.get_write_buffer_size() > PING_FLOOD_BYTES:
            self.transport.abort()
            return
        # One that reads them would hold the event loop for as long as it sends: its
        # pings count against the message rate (max_msgs_per_s, burst), as moves do.
        now = self.loop.time()
        rate, burst = self._ping_limits
        tokens = min(burst, self._ping_tokens + (now - self._pinged_at) * rate)
        self._pinged_at = now
        if tokens < 1.0:
            self._fail(4029, "more WebSocket pings than max_msgs_per_s")
            return
        self._ping_tokens = tokens - 1.0
        super().handle_ping()

    def _fail(self, code: int, reason: str) -> None:
        """Close now, for a flood: the close frame goes out, the app hears of it, reading stops."""
        if self.close_sent or self.conn.state is not State.OPEN:
            return
        self.conn.fail(code, reason)
        self.handle_parser_exception()

    def data_received(self, data: bytes) -> None:
        if self._split_here:
            payloads = read_binary_frames(self.conn, data, self._parser_idle)
            self._parser_idle = payloads is not None  # None: websockets' parser is fed below
            if payloads is not None:
                on_binary = self.on_binary
                for payload in payloads:
                    if self.close_sent:
                        return  # as uvicorn does: past the close, messages are dropped
                    on_binary(payload)  # type: ignore[misc]
                return
        self.conn.receive_data(data)
        if self.conn.parser_exc is not None:
            # A bad frame (too big, unmasked, a bad close code...) ends the connection, but
            # the frames before it in the same read were good: they are the player's moves,
            # and would be relayed had they come in a read of their own. uvicorn drops them.
            self.handle_events()
            if not self.close_sent:
                self.handle_parser_exception()
            else:  # our close went first: end the connection all the same
                self.transport.write(b"".join(self.conn.data_to_send()))
                self.transport.close()
            return
        self.handle_events()
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            # websockets refused the request (a line over 8 KiB, too many headers) and
            # queued its 414/431 answer; uvicorn only writes on a valid request.
            if not self.transport.is_closing():
                self.transport.write(b"".join(self.conn.data_to_send()))
                self.transport.close()

    async def send(self, message: Any) -> None:
        if message["type"] != "websocket.close" or not self.handshake_complete or self.close_sent:
            await super().send(message)
            return
        # uvicorn waits for the transport to be writable first: a slow consumer's may
        # never be. The close frame goes behind what the socket holds instead, now.
        if self.transport.is_closing():
            return
        code, reason = message.get("code", 1000), message.get("reason", "") or ""
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        try:
            self.conn.send_close(code, reason)
        except InvalidState:
            return  # the peer's close came first
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        # close() would wait for the buffer to drain, which a peer that reads nothing never lets happen.
        deadline = self.loop.time() + self._max_close_wait
        self.close_timer = self.loop.call_later(self.close_timeout, self._abort_unless_reading, self._unread(), deadline)

    def _unread(self) -> int:
        """Bytes written to the peer and not yet taken by it: ours, and the kernel's send queue."""
        unread = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None and OUTQ is not None:
            with contextlib.suppress(OSError, ValueError):
                unread += struct.unpack("i", fcntl.ioctl(sock.fileno(), OUTQ, b"\0\0\0\0"))[0]
        return unread

    def _abort_unless_reading(self, unread_before: int, deadline: float) -> None:
        """The closing handshake's deadline: wait on while the peer reads, else abort."""
        unread = self._unread()
        left = deadline - self.loop.time()
        if unread < unread_before and left > 0:
            wait = min(self.close_timeout, left)
            self.close_timer = self.loop.call_later(wait, self._abort_unless_reading, unread, deadline)
        else:
            self.close_timer = None
            self.transport.abort()

    def keepalive_timeout(self) -> None:
        answering = not (self.close_sent or self.transport.is_closing())
        super().keepalive_timeout()
        if answering:  # no pong: dead, or reading nothing. uvicorn's close() would wait for a drain.
            self.transport.abort()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        # websockets' parser keeps the Request for the connection's life; its headers
        # were copied into the scope already.
        event.headers.clear()
        scope = getattr(self, "scope", None)
        if scope is not None:  # the app task has been created but has not run yet
            scope["extensions"][EXTENSION] = self

    def forget_handshake(self) -> None:
        """Drop the 101 response's headers, sent already, kept by uvicorn for the connection's life."""
        response = getattr(self, "response", None)
        if response is not None and self.handshake_complete:
            response.headers.clear()

    def attach(self, on_binary: Callable[[bytes], None]) -> None:
        """Deliver binary frames to ``on_binary`` from now on, after those already queued."""
        queued, keep = [], []
        while not self.queue.empty():
            message = self.queue.get_nowait()
            if not keep and message["type"] == "websocket.receive" and message.get("bytes") is not None:
                queued.append(message["bytes"])
            else:  # from the first other message on, all stay in order for the app
                keep.append(message)
        for message in keep:
            self.queue.put_nowait(message)
        if not any(m.get("text") is not None for m in keep):
            # No text frame waiting for its 1003: later frames may take the fast path.
            self.on_binary = on_binary
            self._split_here = can_read_binary_frames(self.conn)
        for data in queued:
            on_binary(data)
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            self.transport.resume_reading()

    def detach(self) -> None:
        """The app is done with this connection: frames go the ASGI way again (and are
        dropped there), never to a callback of a connection that has ended."""
        self.on_binary = None
        self._split_here = False

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            # The relay answers any text frame with 1003, so it is not decoded: one that is
            # not UTF-8 gets 1003 too, not uvicorn's 1007 and a logged traceback.
            self.frames = []
            self.queue.put_nowait({"type": "websocket.receive", "text": ""})
            # The app closes with 1003 once it reads that: binary frames after it (in this
            # read, too) queue behind it instead of being relayed first.
            self.on_binary = None
            self._split_here = False
            if not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()
            return
        on_binary = self.on_binary
        if on_binary is None or self.curr_msg_data_type != "bytes" or self.close_sent:
            super().send_receive_event_to_app()
            return
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        on_binary(data)

    def writable_now(self) -> bool:
        return self.writable.value and not (self.close_sent or self.disconnected)  # type: ignore[attr-defined]

    def send_frame_now(self, data: bytes) -> None:
        """Write one binary frame; the caller checked :meth:`writable_now`."""
        if len(data) < 65536:
            self.transport.write(binary_frame(data))
        else:  # no copy of a big payload: the header and the payload go out together
            self.transport.writelines((b"\x82\x7f" + len(data).to_bytes(8, "big"), data))


class RelayHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a deadline and a size limit for the request headers.

    httptools buffers a header, and uvicorn the URL, whole, with no bound, copying
    what it has at every read: a stranger's 128 MiB header took 250 MB and held the
    event loop for seconds before anything answered it.
    """

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._request_timeout = getattr(self.config, "relay_request_timeout_s", REQUEST_TIMEOUT_S)
        self._headers_deadline: asyncio.TimerHandle | None = None
        self._start_deadline()
        self._max_head = getattr(self.config, "relay_max_request_head_bytes", MAX_REQUEST_HEAD_BYTES)
        # Bytes read while a request's head is incomplete (-1: between a head and the end of
        # its request). Whole reads count, so a read that also holds a pipelined request
        # counts with it: the limit is meant for heads thousands of times too big.
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self._head_bytes >= 0:
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head:
                if self._head_bytes - len(data) <= self._max_head:  # the first time over
                    # Answer, and half-close; what else comes is dropped unread until a
                    # deadline aborts the connection. (Closing with data unread would reset
                    # the connection, and the answer could be lost.)
                    self.transport.write(TOO_LARGE)
                    if self.transport.can_write_eof():
                        self.transport.write_eof()
                    self._start_deadline()
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._start_deadline()  # a next request on a kept-alive connection has its own
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._head_bytes = -1
        self._headers_deadline.cancel()  # type: ignore[union-attr]
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._head_bytes = 0  # what comes next is the next request's head
        super().on_message_complete()

    def _start_deadline(self) -> None:
        if self._headers_deadline is None or self._headers_deadline.cancelled():
            self._headers_deadline = self.loop.call_later(self._request_timeout, self._no_request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._headers_deadline is not None:
            self._headers_deadline.cancel()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        # The WebSocket protocol has the transport now. Drop this protocol's references
        # to itself (its parser's callbacks, the deadline's) so that reference counting
        # frees it: the cycle collector runs rarely here (server.py), and each upgraded
        # connection would otherwise leave about 8 KiB behind until it does.
        self._headers_deadline.cancel()
        self._headers_deadline = None  # type: ignore[assignment]
        self.parser = None  # type: ignore[assignment]

    def _no_request(self) -> None:
        if self.transport.get_protocol() is self and not self.transport.is_closing():
            self.transport.abort()


def can_read_binary_frames(conn: Any) -> bool:
    """Whether this websockets exposes the parser state :func:`read_binary_frames` checks."""
    return (
        isinstance(getattr(conn.reader, "buffer", None), bytearray)
        and hasattr(conn, "current_size")
        and hasattr(getattr(conn, "parser", None), "gi_yieldfrom")
    )


def read_binary_frames(conn: Any, data: bytes, idle: bool = False) -> list[bytes] | None:
    """The payloads of ``data`` when websockets' parser stands between two frames
    and ``data`` holds only whole binary frames (:func:`split_binary_frames`);
    else None, and ``data`` is websockets' to parse.

    ``idle``: the previous read was taken here, so the parser, fed nothing since,
    still stands between frames; its state need not be walked again (per read, the
    walk costs about as much as the split).
    """
    if conn.state is not State.OPEN:
        return None
    if not idle and (conn.current_size is not None or conn.reader.buffer or not _between_frames(conn.parser)):
        return None
    return split_binary_frames(data, conn.max_message_size)


def _between_frames(parser: Any) -> bool:
    """Whether websockets' parser waits for the first byte of a frame.

    An empty buffer is not enough: ``read_exact`` takes each piece of a frame (its
    first two bytes, its extended length, its mask, its payload) as soon as the
    piece is whole, so a read that ended between two pieces leaves the buffer
    empty with the parser in the middle of that frame. Between frames, and only
    there, the parse loop waits in ``StreamReader.at_eof()``.
    """
    inner = parser
    while (awaited := getattr(inner, "gi_yieldfrom", None)) is not None:
        inner = awaited  # down the chain of ``yield from`` to the innermost wait
    code = getattr(inner, "gi_code", None)
    return inner is not parser and code is not None and code.co_name == "at_eof"


def split_binary_frames(data: bytes, max_size: int | None) -> list[bytes] | None:
    """The unmasked payloads of ``data`` when it is nothing but whole, final, masked
    binary frames of at most 65535 bytes and ``max_size``; else None (websockets parses it)."""
    payloads = []
    end = len(data)
    at = 0
    while at < end:
        if end - at < 6 or data[at] != 0x82:  # FIN, no RSV bits, opcode 2
            return None
        length = data[at + 1]
        if length < 0x80:  # a client's frames must be masked: websockets refuses this one
            return None
        length &= 0x7F
        if length == 126:
            length = int.from_bytes(data[at + 2 : at + 4], "big")
            key = at + 4
        elif length == 127:
            return None
        else:
            key = at + 2
        start = key + 4
        stop = start + length
        if stop > end or (max_size is not None and length > max_size):
            return None
        payloads.append(apply_mask(data[start:stop], data[key:start]))
        at = stop
    return payloads
