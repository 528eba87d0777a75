"""The demo page in real headless Chromium against a real relay process.

The browser side is ``demo_e2e.mjs`` (playwright-core). This test owns its relay,
which it stops and starts again on the same port when the script asks: a line
``@@restart-server kill`` (a crash, so the browsers see 1006) or
``@@restart-server term`` (a graceful shutdown: 1001) on the script's stdout,
answered with ``ok`` on its stdin once the new process answers ``/healthz``.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.relayproc import RelayProcess, free_port, timeout

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("demo_e2e.mjs")
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
PLAYWRIGHT = ROOT / "clients" / "js" / "node_modules" / "playwright-core"
RUN_TIMEOUT_S = timeout(90)  # the whole browser run
WAIT_TIMEOUT_S = timeout(15)  # each wait for a condition inside it


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    if shutil.which("node") is None:
        return "node is not installed"
    if not PLAYWRIGHT.is_dir():
        return f"{PLAYWRIGHT} is missing (npm ci in clients/js)"
    return None


pytestmark = [
    pytest.mark.skipif(_missing() is not None, reason=_missing() or ""),
    pytest.mark.timeout(RUN_TIMEOUT_S + timeout(30)),
]


@pytest.fixture
def own_relay() -> Iterator[RelayProcess]:
    """A relay for this test alone: it gets killed and restarted."""
    server = RelayProcess(free_port()).start()
    yield server
    server.stop(signal.SIGKILL)


def test_demo_in_chromium(own_relay: RelayProcess) -> None:
    env = dict(
        os.environ,
        CHROMIUM=str(CHROMIUM),
        E2E_TIMEOUT_MS=os.environ.get("E2E_TIMEOUT_MS", str(int(WAIT_TIMEOUT_S * 1000))),
        NO_COLOR="1",
    )
    output: list[str] = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    with subprocess.Popen(
        ["node", str(SCRIPT), own_relay.http],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        assert proc.stdin is not None
        try:
            for line in _lines(proc, deadline):
                output.append(line)
                if line.startswith("@@restart-server"):
                    how = line.split()[-1]
                    own_relay.stop(signal.SIGTERM if how == "term" else signal.SIGKILL)
                    own_relay.start()
                    proc.stdin.write(b"ok\n")
                    proc.stdin.flush()
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except (TimeoutError, subprocess.TimeoutExpired):
            code = None
            output.append(f"(still running after {RUN_TIMEOUT_S:.0f} s: stopped)")
        finally:
            if proc.poll() is None:
                proc.kill()
    report = "\n".join(output)
    assert code == 0, f"demo_e2e.mjs exited with {code}:\n{report}"


def _lines(proc: subprocess.Popen[bytes], deadline: float) -> Iterator[str]:
    """The script's output lines, until it closes stdout; TimeoutError at the deadline."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            if buffer:
                yield buffer.decode(errors="replace")
            raise TimeoutError
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            if buffer:
                yield buffer.decode(errors="replace")
            return
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.decode(errors="replace")
