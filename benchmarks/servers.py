"""Starting and stopping the servers under test, each a subprocess on a free port.

A server is optionally pinned with ``taskset -c CPUS`` (taskset execs, so the pid
we hold is the server's own and /proc readings of its tree are the server's).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("relay", "tutorial", "broadcast")


class ServerFailed(RuntimeError):
    """The server exited before it accepted connections; the message is its own output."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Server:
    """One subprocess listening on 127.0.0.1:port."""

    name: str
    argv: list[str]
    port: int
    cpus: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: tempfile._TemporaryFileWrapper[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> None:
        argv = self.argv
        if self.cpus and shutil.which("taskset"):
            argv = ["taskset", "-c", self.cpus, *argv]
        # The benchmark alone says how a server runs: a RELAY_SECRET exported for a
        # relay of one's own would otherwise turn every player away (4001).
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        # Open until stop(): the server writes to it for its whole life.
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix=f"bench-{self.name}-", suffix=".log"
        )
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(
                    f"{self.name} exited with {self.proc.returncode}: {self.output()}"
                )
            if _port_open(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise ServerFailed(f"{self.name} did not listen on port {self.port} within {timeout:.0f} s")

    def output(self, limit: int = 2000) -> str:
        if self.log is None:
            return ""
        self.log.flush()
        text = Path(self.log.name).read_text(errors="replace").strip()
        return text[-limit:]

    def stop(self, timeout: float = 3.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None


def target_argv(
    target: str,
    port: int,
    *,
    flush_ms: float | None = None,
    redis_url: str | None = None,
    relay_args: list[str] | None = None,
) -> list[str]:
    py = sys.executable
    if target == "relay":
        argv = [
            py,
            "-m",
            "relay",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        if flush_ms is not None:
            argv += ["--flush-ms", str(flush_ms)]
        if redis_url:
            argv += ["--redis", redis_url]
        return argv + list(relay_args or [])
    if target in ("tutorial", "broadcast"):
        return [py, "-m", f"benchmarks.baselines.{target}", "--port", str(port)]
    raise ValueError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")


def start_target(target: str, *, cpus: str | None, **options: object) -> Server:
    port = free_port()
    argv = target_argv(target, port, **options)  # type: ignore[arg-type]
    server = Server(target, argv, port, cpus)
    server.start()
    return server


def start_redis(*, cpus: str | None) -> Server:
    exe = shutil.which("redis-server")
    if exe is None:
        raise ServerFailed("redis-server is not installed")
    port = free_port()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = Server("redis", argv, port, cpus)
    server.start()
    return server
