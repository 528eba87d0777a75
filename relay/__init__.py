"""relay: a fast, hard-to-break multiplayer game state relay over WebSocket."""

__version__ = "0.1.0"
