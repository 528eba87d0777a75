"""Backplanes: where a room's order is made and how it reaches every node."""

from relay.backplane.base import Backplane, Joined, Receiver, RoomFull, Unavailable

__all__ = ["Backplane", "Joined", "Receiver", "RoomFull", "Unavailable"]
