"""Real Redis servers for tests: `redis-server` on free loopback ports.

A :class:`RedisServer` can be killed and started again on the same port (a Redis
restart, which forgets everything: tests run it with no persistence). A
:class:`RedisClusterProcs` is three masters (and optionally a replica each) made
into a Redis Cluster with ``redis-cli --cluster create``.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.relayproc import RelayProcess, free_port, timeout

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def command(port: int, *args: str) -> bytes:
    """One Redis command over a plain socket (inline protocol); the raw reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout(5)) as s:
        s.sendall((" ".join(args) + "\r\n").encode())
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


@dataclass
class RedisServer:
    port: int = field(default_factory=free_port)
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="relay-redis-")))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None, "redis-server is not installed"
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir), "--logfile", "redis.log", *self.args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout(10)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log()}")
            try:
                if command(self.port, "PING").startswith(b"+PONG"):
                    return self
            except OSError:
                time.sleep(0.02)  # polling until the server accepts connections
        raise RuntimeError("redis-server did not start in time")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout(10))
        self.proc = None

    def restart(self) -> None:
        """Kill and start again on the same port: an empty Redis, as after a crash."""
        self.stop()
        self.start()

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class RedisClusterProcs:
    """A 3-master Redis Cluster, with ``replicas`` replicas per master."""

    replicas: int = 0
    masters: list[RedisServer] = field(default_factory=list)  # as created (a failover may change roles)
    others: list[RedisServer] = field(default_factory=list)  # the replicas, as created

    @property
    def url(self) -> str:
        return self.masters[0].url

    @property
    def servers(self) -> list[RedisServer]:
        return self.masters + self.others

    def start(self) -> RedisClusterProcs:
        assert REDIS_CLI is not None, "redis-cli is not installed"
        for i in range(3 * (1 + self.replicas)):
            server = RedisServer()
            server.args = ["--cluster-enabled", "yes", "--cluster-config-file", str(server.dir / "nodes.conf"),
                           "--cluster-node-timeout", "2000", "--cluster-port", str(free_port())]
            (self.masters if i < 3 else self.others).append(server.start())
        nodes = [f"127.0.0.1:{s.port}" for s in self.servers]  # redis-cli makes the first three masters
        subprocess.run([REDIS_CLI, "--cluster", "create", *nodes, "--cluster-replicas", str(self.replicas),
                        "--cluster-yes"], check=True, capture_output=True, timeout=timeout(60))
        self.wait_ok(20)
        return self

    def wait_ok(self, seconds: float) -> None:
        """Until every running node says the cluster is up (every slot served)."""
        deadline = time.monotonic() + timeout(seconds)
        while time.monotonic() < deadline:
            alive = [s for s in self.servers if s.proc is not None]
            replicas = [s for s in alive if b"role:slave" in command(s.port, "INFO", "replication")]
            if all(b"cluster_state:ok" in command(s.port, "CLUSTER", "INFO") for s in alive) and all(
                b"master_link_status:up" in command(s.port, "INFO", "replication") for s in replicas
            ):  # a replica that has not synced yet would not take over from its master
                return
            time.sleep(0.05)  # polling until every node agrees the cluster is up
        raise RuntimeError("the Redis Cluster is not up")

    def cleanup(self) -> None:
        for server in self.servers:
            server.cleanup()


def ready(relay: RelayProcess) -> bool:
    try:
        with urllib.request.urlopen(relay.http + "/readyz", timeout=2) as r:
            return r.status == 200
    except urllib.error.HTTPError as exc:
        exc.close()
        return False
    except OSError:
        return False


def wait_until(condition, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    """Poll ``condition`` (a blocking check) until true; fail after ``seconds``."""
    deadline = time.monotonic() + timeout(seconds)
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)  # polling an outside process's state
    raise AssertionError(f"timed out waiting for {what}")


def start_relays(url: str, count: int, **settings: object) -> list[RelayProcess]:
    """``count`` relays sharing the Redis at ``url``, each ready (backplane connected)."""
    relays: list[RelayProcess] = []
    try:
        for _ in range(count):
            relays.append(RelayProcess(free_port(), {"redis": url, **settings}).start())
        for relay in relays:
            wait_until(lambda: ready(relay), 10, "the relay's backplane")  # noqa: B023
    except BaseException:
        for relay in relays:
            relay.stop()
        raise
    return relays
