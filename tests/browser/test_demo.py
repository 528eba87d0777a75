"""The demo page in real headless Chromium against a real relay process.

The browser side is ``demo_e2e.mjs`` (playwright-core). This test owns the relay:
it starts ``python -m relay serve`` on a free loopback port, and kills and
restarts it when the script asks: a line ``@@restart-server kill`` (a crash, so
the browsers see 1006) or ``@@restart-server term`` (a graceful shutdown: 1001)
on its stdout, answered with ``ok`` on its stdin once the new process is up.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("demo_e2e.mjs")
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
PLAYWRIGHT = ROOT / "clients" / "js" / "node_modules" / "playwright-core"
E2E_TIMEOUT_S = 90  # the whole browser run; each wait inside it has its own bound
START_TIMEOUT_S = 15


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    if shutil.which("node") is None:
        return "node is not installed"
    if not PLAYWRIGHT.is_dir():
        return f"{PLAYWRIGHT} is missing (npm ci in clients/js)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RelayProcess:
    """One ``python -m relay serve`` on a fixed port, which may be killed and started again."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "relay", "serve", "--host", "127.0.0.1"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*cmd, "--port", str(self.port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"relay exited with {self.proc.returncode}:\n{self.log.read_text()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"relay did not answer /healthz in {START_TIMEOUT_S} s:\n{self.log.read_text()}"
                )
            time.sleep(0.05)  # poll interval of the bounded wait above

    def stop(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """SIGKILL is a crash (the browsers see 1006); SIGTERM a shutdown (they get 1001)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)


@pytest.fixture
def relay(tmp_path: Path):
    server = RelayProcess(free_port(), tmp_path / "relay.log")
    server.start()
    yield server
    server.stop()


def test_demo_in_chromium(relay: RelayProcess) -> None:
    env = dict(os.environ, CHROMIUM=str(CHROMIUM), NO_COLOR="1")
    output: list[str] = []
    deadline = time.monotonic() + E2E_TIMEOUT_S
    with subprocess.Popen(
        ["node", str(SCRIPT), relay.url],
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
                    relay.stop(signal.SIGTERM if how == "term" else signal.SIGKILL)
                    relay.start()
                    proc.stdin.write(b"ok\n")
                    proc.stdin.flush()
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except (TimeoutError, subprocess.TimeoutExpired):
            code = None
            output.append(f"(still running after {E2E_TIMEOUT_S} s: stopped)")
        finally:
            if proc.poll() is None:
                proc.kill()
    report = "\n".join(output)
    assert code == 0, (
        f"demo_e2e.mjs exited with {code}:\n{report}\n--- relay log ---\n{relay.log.read_text()}"
    )


def _lines(proc: subprocess.Popen[bytes], deadline: float):
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
