"""A one-line progress bar on stderr (redrawn with ``\\r``; quiet when not a terminal)."""

from __future__ import annotations

import sys
import time


class Progress:
    WIDTH = 24

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.line = ""

    def update(self, done: float, total: float, note: str = "") -> None:
        now = time.monotonic()
        if not self.tty or now - self.last < 0.1:
            self.line = note
            return
        self.last = now
        share = 0.0 if total <= 0 else min(1.0, done / total)
        filled = int(share * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        text = f"\r{self.label:<28} [{bar}] {share:4.0%} {note}"
        sys.stderr.write(text[:160].ljust(len(self.line)))
        self.line = text[:160]
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\r" + " " * len(self.line) + "\r")
            sys.stderr.flush()


def say(text: str) -> None:
    """A line of its own on stderr, e.g. a run that finished or was skipped."""
    print(text, file=sys.stderr, flush=True)
