"""Typed server messages, parsed from decoded msgpack arrays (protocol v1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, frozen=True)
class Member:
    actor: int
    player: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Welcome:
    actor: int
    room: str
    members: list[Member]
    snapshot: dict[int, dict[Any, Any]]
    server_time_ms: int
    limits: dict[str, Any]
    offset: int
    epoch: str
    resume_token: str
    last_seq: int | None


@dataclass(slots=True)
class Event:
    actor: int
    seq: int
    data: Any
    offset: int


@dataclass(slots=True)
class State:
    actor: int
    key: str | int
    data: Any
    offset: int


@dataclass(slots=True)
class Direct:
    actor: int
    seq: int
    data: Any


@dataclass(slots=True)
class Join:
    actor: int
    player: str
    meta: dict[str, Any]
    offset: int


@dataclass(slots=True)
class Leave:
    actor: int
    code: int
    offset: int


@dataclass(slots=True)
class Error:
    ref_seq: int | None
    code: str
    message: str


@dataclass(slots=True)
class Dropped:
    count: int


@dataclass(slots=True)
class Pong:
    client_time: Any
    server_time_ms: int


@dataclass(slots=True)
class Resumed:
    """The connection broke and the client took its seat back: nothing was missed."""

    actor: int
    offset: int


@dataclass(slots=True)
class Resynced:
    """The connection broke and the client came back with a fresh snapshot (``welcome``):
    members and snapshot were replaced, and messages in between were not replayed.

    ``unsent_directs``: the seqs of this client's DIRECTs that had not left when the
    room started a new order (a new epoch, as after a Redis restart). Actors are numbered
    anew there, so they were not sent: their ``to_actor`` could now be someone else.
    """

    welcome: Welcome
    unsent_directs: list[int] = field(default_factory=list)


Message = Welcome | Event | State | Direct | Join | Leave | Error | Dropped | Pong | Resumed | Resynced


def parse(raw: Any) -> Message | None:
    """A typed message, or None for a type this client does not know (to be ignored)."""
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], int):
        return None
    kind = raw[0]
    if kind == 1:
        return Event(raw[1], raw[2], raw[3], raw[4])
    if kind == 2:
        return State(raw[1], raw[2], raw[3], raw[4])
    if kind == 3:
        return Direct(raw[1], raw[2], raw[3])
    if kind == 5:
        return Join(raw[1], raw[2], raw[3] or {}, raw[4])
    if kind == 6:
        return Leave(raw[1], raw[2], raw[3])
    if kind == 7:
        return Error(raw[1], raw[2], raw[3])
    if kind == 8:
        return Dropped(raw[1])
    if kind == 9:
        return Pong(raw[1], raw[2])
    if kind == 0:
        return Welcome(
            actor=raw[2],
            room=raw[3],
            members=[Member(a, p, m or {}) for a, p, m in raw[4]],
            snapshot={a: dict(v) for a, v in raw[5].items()},
            server_time_ms=raw[6],
            limits=raw[7],
            offset=raw[8],
            epoch=raw[9],
            resume_token=raw[10],
            last_seq=raw[11],
        )
    return None
