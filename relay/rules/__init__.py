"""Game rules: per room type, validate moves on the server before they are relayed."""

from relay.rules.base import Accept, Move, Reject, Replace, RoomView, Rules, Verdict, load

__all__ = ["Accept", "Move", "Reject", "Replace", "RoomView", "Rules", "Verdict", "load"]
