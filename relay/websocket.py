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
  without waiting, and abort the connection if the peer has not finished the
  closing handshake within ``close_timeout`` seconds.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

CLOSE_TIMEOUT_S = 5.0


class RelayWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.close_timeout = CLOSE_TIMEOUT_S

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        self.transport.abort()

    async def send(self, message: Any) -> None:
        if message["type"] == "websocket.close" and self.handshake_complete:
            if not self.close_sent and not self.disconnected:
                # Bypass the wait for a writable socket: the close frame joins the
                # transport buffer at once, and the abort below bounds its wait.
                self.writable.set()
                await super().send(message)
                self.loop.call_later(self.close_timeout + 1.0, self._abort_if_open)
            return
        await super().send(message)

    def _abort_if_open(self) -> None:
        if not self.disconnected and self.transport is not None:
            self.transport.abort()
