"""One connection's checks on what it sends: seq order, rate, error budget. No I/O.

A message passes :meth:`Session.admit` or gets an :class:`Invalid` to answer
with ERROR. Rejections are counted: too many in ``errors_window_s`` ends the
connection with 1008, too many ``rate_limited`` with 4029.
"""

from __future__ import annotations

from relay.config import Settings
from relay.protocol import CloseCode, ErrorCode, Invalid, Ping


class _Window:
    """Counts events in fixed windows of ``length`` seconds."""

    __slots__ = ("length", "started", "count")

    def __init__(self, length: float) -> None:
        self.length = length
        self.started = 0.0
        self.count = 0

    def add(self, now: float) -> int:
        if now - self.started > self.length:
            self.started = now
            self.count = 0
        self.count += 1
        return self.count


class Session:
    __slots__ = (
        "last_seq", "_rate", "_burst", "_tokens", "_refilled", "_byte_rate", "_byte_burst",
        "_byte_tokens", "_bytes_refilled", "_max_errors", "_max_rate_errors", "_errors",
        "_rate_errors",
    )

    def __init__(self, settings: Settings, now: float) -> None:
        self.last_seq: int | None = None
        self._rate = settings.max_msgs_per_s
        self._burst = float(settings.burst)
        self._tokens = float(settings.burst)
        self._refilled = now
        self._byte_rate = float(settings.max_bytes_per_s)
        self._byte_burst = float(settings.burst_bytes)
        self._byte_tokens = self._byte_burst
        self._bytes_refilled = now
        self._max_errors = settings.max_errors
        self._max_rate_errors = settings.max_rate_errors
        self._errors = _Window(settings.errors_window_s)
        self._rate_errors = _Window(settings.errors_window_s)

    def admit_frame(self, size: int, now: float) -> Invalid | None:
        """Check a frame against the bytes/s budget before decoding it."""
        tokens = self._byte_tokens + (now - self._bytes_refilled) * self._byte_rate
        if tokens > self._byte_burst:
            tokens = self._byte_burst
        self._bytes_refilled = now
        if tokens < size:
            self._byte_tokens = tokens
            why = f"more than {self._byte_rate:g} bytes/s: frame dropped"
            return Invalid(None, ErrorCode.RATE_LIMITED, why)
        self._byte_tokens = tokens - size
        return None

    def admit(self, seq: int | None, now: float) -> Invalid | None:
        """Check one decoded message (``seq`` None for PING); None means go ahead."""
        tokens = self._tokens + (now - self._refilled) * self._rate
        self._refilled = now
        if tokens < 1.0:
            self._tokens = tokens if tokens < self._burst else self._burst
            return Invalid(seq, ErrorCode.RATE_LIMITED, f"more than {self._rate:g} messages/s")
        self._tokens = (tokens if tokens < self._burst else self._burst) - 1.0
        if seq is None:
            return None
        last = self.last_seq
        if last is not None and seq <= last:
            return Invalid(seq, ErrorCode.BAD_SEQ, f"seq {seq} is not greater than {last}")
        return None

    def accepted(self, seq: int) -> None:
        """Record a move that was taken (relayed): only those advance the last seq."""
        self.last_seq = seq

    def rejected(self, invalid: Invalid, now: float) -> CloseCode | None:
        """Count a rejection; a close code when the connection has used up its budget."""
        if invalid.code is ErrorCode.RATE_LIMITED:
            if self._rate_errors.add(now) > self._max_rate_errors:
                return CloseCode.RATE_LIMITED
            return None
        if self._errors.add(now) > self._max_errors:
            return CloseCode.TOO_MANY_ERRORS
        return None


def seq_of(message: object) -> int | None:
    return None if isinstance(message, Ping) else getattr(message, "seq", None)
