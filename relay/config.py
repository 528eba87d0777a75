"""Settings, read once. Every limit the relay enforces is named and documented here.

Each setting comes from, in order: the command line (``--max-frame-bytes``),
the environment (``RELAY_MAX_FRAME_BYTES``), the default below. The README's
settings table is generated from :data:`SETTINGS` (``relay settings``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "RELAY_"


def _setting(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True, kw_only=True)
class Settings:
    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(8000, "TCP port to listen on")
    workers: int = _setting(1, "worker processes on one port (more than 1 needs --redis)")
    redis: str = _setting(
        "", "Redis URL (redis://, rediss://; a Cluster is detected) for the multi-process backplane"
    )
    redis_prefix: str = _setting("relay", "namespace for every Redis key and channel")
    redis_timeout_s: float = _setting(2.0, "Redis connect and command timeout; past it Redis counts as down")
    node_ttl_s: float = _setting(
        10.0, "a node silent this long (dead) has its players' seats held for resume, then removed, by the others"
    )
    secret: str = _setting("", "token secret: when set, players need a signed token (JWT HS256)")
    allowed_origins: str = _setting("*", "comma-separated browser origins allowed to connect, or *")
    rules: str = _setting(
        "grid=relay.rules.grid:GridRules,turns=relay.rules.turns:TurnRules",
        "game rules per room type, TYPE=module:Class, comma-separated (or none)",
    )
    max_frame_bytes: int = _setting(16384, "largest frame a client may send; bigger: close 1009")
    max_fragments: int = _setting(
        64, "frames one fragmented message may come in (empty ones cost no bytes); more: close 1009"
    )
    max_message_bytes: int = _setting(8192, "largest data of one move; bigger: ERROR too_large")
    max_depth: int = _setting(32, "deepest nesting of arrays and maps in a move's data")
    max_msgs_per_s: float = _setting(120.0, "messages per second per connection, sustained")
    burst: int = _setting(240, "messages a connection may send at once above the sustained rate")
    max_bytes_per_s: int = _setting(262144, "bytes per second per connection, sustained")
    burst_bytes: int = _setting(524288, "bytes a connection may send at once above that rate")
    max_errors: int = _setting(20, "rejected messages tolerated per errors_window_s; then 1008")
    errors_window_s: float = _setting(10.0, "window for max_errors")
    max_rate_errors: int = _setting(100, "rate_limited answers per errors_window_s; then 4029")
    max_players_per_room: int = _setting(256, "members in one room; the next joiner gets 4009")
    max_snapshot_bytes: int = _setting(
        262144, "a room's STATE in all (each key counts 64 bytes plus its value); past it: ERROR too_large"
    )
    max_connections: int = _setting(
        20000, "open WebSockets per process (seats held for resume count); the next gets 1013"
    )
    max_connections_per_ip: int = _setting(
        4096, "open WebSockets per client IP (seats held for resume count); the next gets 1013"
    )
    max_rooms: int = _setting(10000, "rooms with players on this process; a new one gets 1013")
    outbox_soft_bytes: int = _setting(65536, "queued bytes past which STATE is coalesced")
    outbox_hard_bytes: int = _setting(262144, "queued bytes past which oldest EVENTs are dropped")
    slow_client_timeout_s: float = _setting(5.0, "time past the hard limit before close 4008")
    max_out_frame_bytes: int = _setting(262144, "largest frame the server sends (batches split)")
    send_buffer_bytes: int = _setting(
        65536,
        "kernel send buffer per WebSocket (SO_SNDBUF, which Linux doubles); 0: the OS's own, which grows "
        "to MBs for a slow reader, beyond the outbox's limits",
    )
    flush_ms: float = _setting(0.0, "fixed flush tick in ms; 0 sends as soon as the socket can")
    batch_us_per_member: float = _setting(
        50.0, "a busy room's moves wait up to this many us per local member to share a frame"
    )
    max_batch_ms: float = _setting(10.0, "the longest a busy room's moves wait to share a frame")
    ping_interval_s: float = _setting(10.0, "WebSocket ping interval (dead-peer detection)")
    ping_timeout_s: float = _setting(10.0, "time to wait for a pong before the peer is dead")
    request_timeout_s: float = _setting(10.0, "time a new connection has to send its request headers")
    max_request_head_bytes: int = _setting(
        65536, "largest HTTP request line and headers a connection may send; more: 431 and close"
    )
    close_timeout_s: float = _setting(
        5.0, "a closing peer that reads nothing this long (the close frame behind unread data) is cut off"
    )
    max_close_wait_s: float = _setting(
        30.0, "the longest a closing peer that keeps reading its backlog is waited for, to reach the close frame"
    )
    shutdown_timeout_s: float = _setting(5.0, "time to flush queued messages on shutdown")
    resume_window_s: float = _setting(
        10.0, "how long a broken connection's seat is held for resume (on any node with --redis)"
    )
    history_size: int = _setting(1000, "room messages kept per room for resume (0: none)")
    max_held_directs: int = _setting(100, "DIRECTs kept for a held seat until it resumes")
    max_replay_bytes: int = _setting(
        4194304, "missed messages a resume replays, paced by the client's socket; more: a fresh snapshot"
    )
    log_level: str = _setting("info", "log level: debug, info, warning, error")

    def __post_init__(self) -> None:
        for f in fields():
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not (value >= 0 and value < float("inf")):
                raise ValueError(f"{f.name} must be a finite number >= 0, not {value!r}")
        for name in ("port", "workers", "max_frame_bytes", "max_fragments", "max_message_bytes", "max_msgs_per_s",
                     "burst", "max_bytes_per_s", "max_players_per_room", "max_connections",
                     "max_connections_per_ip", "max_rooms", "outbox_soft_bytes", "max_snapshot_bytes",
                     "outbox_hard_bytes", "max_out_frame_bytes", "max_depth", "max_held_directs",
                     "max_request_head_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be greater than 0")
        if self.redis_timeout_s <= 0 or self.node_ttl_s <= 0:
            raise ValueError("redis_timeout_s and node_ttl_s must be greater than 0")
        if self.close_timeout_s <= 0 or self.max_close_wait_s < self.close_timeout_s:
            raise ValueError("close_timeout_s must be greater than 0, and max_close_wait_s at least that")
        if self.burst_bytes < self.max_frame_bytes:
            raise ValueError("burst_bytes must be at least max_frame_bytes, or big frames never pass")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``RELAY_*`` variables, then ``overrides`` (those not None)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        return {ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields()}

    def limits(self) -> dict[str, int | float]:
        """The limits a client is told in WELCOME."""
        return {
            "max_frame_bytes": self.max_frame_bytes,
            "max_message_bytes": self.max_message_bytes,
            "max_msgs_per_s": self.max_msgs_per_s,
            "burst": self.burst,
            "max_bytes_per_s": self.max_bytes_per_s,
            "max_depth": self.max_depth,
            "max_players_per_room": self.max_players_per_room,
            "max_snapshot_bytes": self.max_snapshot_bytes,
            "outbox_hard_bytes": self.outbox_hard_bytes,
        }


def fields() -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(Settings)


def parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = type(f.default)
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None


def table_markdown() -> str:
    rows = ["| setting | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for f in fields():
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default != "" else "(none)"
        env = ENV_PREFIX + f.name.upper()
        rows.append(f"| `{flag}` | `{env}` | `{default}` | {f.metadata['doc']} |")
    return "\n".join(rows)
