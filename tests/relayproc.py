"""Real relay servers for tests: `python -m relay serve` on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

# One time unit scales every timeout in the tests (slow CI machines: raise it).
SCALE = float(os.environ.get("RELAY_TEST_TIMEOUT_SCALE", "1"))


def timeout(seconds: float) -> float:
    return seconds * SCALE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RelayProcess:
    port: int
    settings: dict[str, object] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log: Any = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None  # where it starts (a rules module of the current directory)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RelayProcess:
        args = [sys.executable, "-m", "relay", "serve", "--port", str(self.port)]
        for name, value in {"log_level": "warning", **self.settings}.items():
            args += ["--" + name.replace("_", "-"), str(value)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(self.env)
        # A file, not a pipe: a pipe nobody reads would block a chatty server.
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(args, env=env, cwd=self.cwd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout(15)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                out = self.log.read().decode(errors="replace")
                raise RuntimeError(f"relay exited with {self.proc.returncode}:\n{out}")
            try:
                with urllib.request.urlopen(self.http + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)  # polling the health endpoint until it answers
        self.stop()
        raise RuntimeError("relay did not become healthy in time")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout(15))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
        return self.proc.returncode

    def get_json(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(self.http + path, timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the response open
            raise

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(self.http + path, timeout=5) as r:
            return r.read().decode()
