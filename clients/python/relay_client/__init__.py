"""relay_client: the asyncio client for the relay (protocol v1)."""

from relay_client.client import Client, RelayClosed, connect, open_client
from relay_client.messages import (
    Direct,
    Dropped,
    Error,
    Event,
    Join,
    Leave,
    Member,
    Message,
    Pong,
    Resumed,
    Resynced,
    State,
    Welcome,
)

__all__ = [
    "Client", "RelayClosed", "connect", "open_client", "Message",
    "Welcome", "Event", "State", "Direct", "Join", "Leave", "Error", "Dropped", "Pong", "Member",
    "Resumed", "Resynced",
]
