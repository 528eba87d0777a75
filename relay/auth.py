"""Player tokens: JWT HS256, so any game backend's JWT library can mint them.

Claims: ``sub`` (the player id), ``rooms`` (glob patterns of rooms it may join,
``["*"]`` when absent), ``exp`` (expiry, required), ``name`` (optional display
name). PyJWT checks the signature (in constant time) and the expiry.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from typing import Any

import jwt

from relay.protocol import CloseCode

ALGORITHM = "HS256"
LEEWAY_S = 5  # clock skew tolerated between the token's issuer and this server


class AuthError(Exception):
    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Grant:
    player: str
    rooms: tuple[str, ...]
    name: str | None

    def allows(self, room: str) -> bool:
        return any(fnmatch.fnmatchcase(room, pattern) for pattern in self.rooms)


def issue(
    secret: str, player: str, *, rooms: list[str] | None = None, ttl_s: float = 3600, name: str | None = None
) -> str:
    claims: dict[str, Any] = {"sub": player, "exp": int(time.time() + ttl_s), "rooms": rooms or ["*"]}
    if name:
        claims["name"] = name
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(token: str | None, secret: str, room: str) -> Grant:
    """The grant in a valid token for ``room``; AuthError with 4001 or 4003 otherwise."""
    if not token:
        raise AuthError(CloseCode.BAD_TOKEN, "a token is required")
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], leeway=LEEWAY_S, options={"require": ["exp", "sub"]}
        )
    except jwt.ExpiredSignatureError:
        raise AuthError(CloseCode.BAD_TOKEN, "the token has expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError(CloseCode.BAD_TOKEN, "the token's signature is not valid") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(CloseCode.BAD_TOKEN, f"the token is not valid: {exc}") from None
    player, rooms, name = claims.get("sub"), claims.get("rooms", ["*"]), claims.get("name")
    # The same limits as for ?player= and ?name= (a token only says who may set them).
    if not isinstance(player, str) or not 0 < len(player.encode()) <= 64 or not player.isprintable():
        raise AuthError(CloseCode.BAD_TOKEN, "the token's player (sub) must be 1-64 bytes of printable characters")
    if name is not None and (not isinstance(name, str) or len(name) > 64 or not name.isprintable()):
        raise AuthError(CloseCode.BAD_TOKEN, "the token's name must be at most 64 printable characters")
    if not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
        raise AuthError(CloseCode.BAD_TOKEN, "the token's rooms must be a list of patterns")
    grant = Grant(player, tuple(rooms), name or None)
    if not grant.allows(room):
        raise AuthError(CloseCode.ROOM_FORBIDDEN, f"the token does not allow room {room!r}")
    return grant
