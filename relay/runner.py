"""Running the relay under uvicorn, with a graceful shutdown that closes with 1001.

uvicorn's own shutdown closes WebSockets with 1012 without flushing what the app
has queued. On SIGTERM or SIGINT this server first stops listening, then lets
every relay in the process flush its outboxes and close its clients with 1001
(bounded by ``shutdown_timeout_s``), and only then runs uvicorn's shutdown.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import socket

import uvicorn
from uvicorn.supervisors import Multiprocess, multiprocess

from relay import server
from relay.config import Settings
from relay.websocket import RelayHttpProtocol, RelayWebSocketProtocol


class RelayServer(uvicorn.Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for listener in self.servers:
            listener.close()
        for relay in list(server.RUNNING):
            await relay.shutdown()
        await super().shutdown(sockets)


class RelayWorker(multiprocess.Process):
    """A ``--workers`` process that runs :class:`RelayServer` (uvicorn's runs a plain Server)."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = RelayServer(config=self.config)
        return self._server

    def target(self, sockets: list[socket.socket] | None = None) -> None:
        stop_with_parent()
        super().target(sockets)


PR_SET_PDEATHSIG = 1


def stop_with_parent() -> None:
    """Have this worker get SIGTERM (a graceful 1001 shutdown) when its supervisor dies.

    A supervisor killed with SIGKILL cannot stop its workers: they would go on serving
    the port, orphaned, as a node nobody manages. Linux only; elsewhere a no-op.
    """
    libc_name = ctypes.util.find_library("c")
    if not libc_name or not hasattr(os, "getppid"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the call above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    config = uvicorn.Config(
        "relay.server:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http=RelayHttpProtocol,
        ws=RelayWebSocketProtocol,
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.ping_interval_s,
        ws_ping_timeout=settings.ping_timeout_s,
        ws_per_message_deflate=False,  # compression costs more CPU per frame than it saves here
        lifespan="on",
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) + 2,
    )
    config.relay_request_timeout_s = settings.request_timeout_s  # read by RelayHttpProtocol
    config.relay_max_request_head_bytes = settings.max_request_head_bytes  # and this one
    config.relay_close_timeouts = (settings.close_timeout_s, settings.max_close_wait_s)  # and RelayWebSocketProtocol
    config.relay_send_buffer_bytes = settings.send_buffer_bytes  # RelayWebSocketProtocol too
    config.relay_max_fragments = settings.max_fragments  # and here
    config.relay_ping_limits = (settings.max_msgs_per_s, float(settings.burst))  # and here
    return config


def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT. Worker processes read the settings from RELAY_* variables."""
    os.environ.update(settings.to_env())
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s: %(message)s")
    config = uvicorn_config(settings)
    relay_server = RelayServer(config)
    if settings.workers > 1:
        sock = config.bind_socket()
        multiprocess.Process = RelayWorker  # type: ignore[misc]  # the supervisor makes workers by this name
        Multiprocess(config, sockets=[sock]).run()
    else:
        relay_server.run()
