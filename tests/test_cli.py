"""The `relay` command line."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from relay import config
from relay_client import connect
from tests.relayproc import RelayProcess, free_port, timeout


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=30, env=env)


def test_serve_help_lists_every_setting_with_its_default():
    out = run("serve", "--help").stdout
    for f in config.fields():
        flag = "--" + f.name.replace("_", "-")
        assert flag in out
        assert f"RELAY_{f.name.upper()}" in out.replace("\n", " ").replace("  ", "")
    assert "[default: 16384" in out


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--workers", "2"], "needs --redis"),
        (["--outbox-soft-bytes", "10", "--outbox-hard-bytes", "5"], "must not exceed"),
        (["--rules", "grid=no.such.module:Rules"], "cannot import"),
        (["--max-frame-bytes", "lots"], "not a valid int"),
    ],
)
def test_serve_refuses_what_it_cannot_honour(args, words):
    result = run("serve", "--port", str(free_port()), *args)
    assert result.returncode != 0
    assert words in result.stderr


def test_settings_table_is_markdown():
    out = run("settings").stdout
    assert out.startswith("| setting |")
    assert "`--outbox-hard-bytes`" in out


@pytest.mark.asyncio
async def test_settings_come_from_environment(room):
    server = RelayProcess(free_port(), env={"RELAY_MAX_PLAYERS_PER_ROOM": "7"}).start()
    try:
        async with connect(server.url, room) as client:
            assert client.limits["max_players_per_room"] == 7
    finally:
        server.stop()


def test_ctrl_c_stops_the_relay_quietly():
    """Ctrl+C is how a developer stops `relay serve`: a clean shutdown, exit 0, no traceback."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell ignores it
    )
    try:
        deadline = time.monotonic() + timeout(15)
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)  # polling for the port to open
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=timeout(15))
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-2000:]
    assert "Traceback" not in out and "Application shutdown complete" in out
