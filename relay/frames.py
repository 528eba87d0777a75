"""WebSocket framing of the server's binary frames (RFC 6455, section 5.2). Pure bytes.

A server's frames are not masked, so a complete frame is a 2, 4 or 10 byte
header and the payload. The relay frames a room batch once and writes the same
bytes to every member's socket, so no per-recipient copy or header is made.
"""

from __future__ import annotations


def binary_frame(payload: bytes) -> bytes:
    """One final binary frame (FIN, opcode 2) carrying ``payload``."""
    n = len(payload)
    if n < 126:
        return b"\x82" + bytes((n,)) + payload
    if n < 65536:
        return b"\x82\x7e" + n.to_bytes(2, "big") + payload
    return b"\x82\x7f" + n.to_bytes(8, "big") + payload
