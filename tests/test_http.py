"""The HTTP routes: health, rooms, metrics."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from relay_client import Event, connect
from tests.helpers import next_of, raw_connect, wait_metrics

pytestmark = pytest.mark.asyncio


async def test_health_and_ready(relay):
    assert relay.get_json("/healthz") == {"status": "ok"}
    assert relay.get_json("/readyz") == {"ready": True}


async def test_rooms_lists_rooms_with_member_counts(relay, room):
    async with connect(relay.url, room, player="a"), connect(relay.url, room, player="b", name="Bee"):
        rooms = {r["room"]: r["members"] for r in relay.get_json("/rooms")["rooms"]}
        assert rooms[room] == 2
        info = relay.get_json(f"/rooms/{room}")
        assert info["room"] == room
        assert sorted((m["player"], m["meta"]) for m in info["members"]) == [("a", {}), ("b", {"name": "Bee"})]
        assert {"actor", "player", "meta"} <= set(info["members"][0])
        assert info["snapshot_bytes"] == 0
    assert room not in {r["room"] for r in relay.get_json("/rooms")["rooms"]}


async def test_unknown_room_is_404(relay):
    with pytest.raises(urllib.error.HTTPError) as info:
        relay.get_json("/rooms/no-such-room")
    assert info.value.code == 404


async def test_metrics_count_traffic(relay, room):
    before = relay.get_text("/metrics")
    async with connect(relay.url, room, player="a") as a, connect(relay.url, room, player="b") as b:
        a.send_event("hi")
        await next_of(b, Event)
        await a.send_raw(b"\xc1")
        await a.ping()
        text = relay.get_text("/metrics")
    for name in (
        "relay_connections_total", 'relay_messages_in_total{type="EVENT"}',
        'relay_messages_out_total{type="EVENT"}', "relay_frames_out_total", "relay_bytes_out_total",
        'relay_errors_total{code="malformed"}', "relay_dropped_events_total",
        "relay_coalesced_states_total", "relay_slow_consumer_closes_total",
        "relay_outbox_bytes", "relay_connections_open", "relay_rooms_local",
    ):
        assert f"\n{name} " in text, name
    assert before != text


async def test_the_browser_client_can_be_imported_by_a_page_on_another_origin(relay):
    request = urllib.request.Request(relay.http + "/client.js", headers={"Origin": "http://game.example"})
    with urllib.request.urlopen(request, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/javascript")
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert b"export" in r.read()
    head = urllib.request.Request(relay.http + "/client.js", method="HEAD")
    with urllib.request.urlopen(head, timeout=5) as r:
        assert r.status == 200 and r.read() == b""


async def test_close_codes_a_client_makes_up_share_one_metrics_label(relay_with, room):
    server = relay_with()
    for code in (4321, 4322, 1000):
        ws = await raw_connect(server.url, room, f"?player=p{code}")
        await ws.recv()  # WELCOME
        await ws.close(code=code)
    await wait_metrics(server, {'relay_closes_total{code="other"}': 2.0, 'relay_closes_total{code="1000"}': 1.0}, 5)
    assert "4321" not in server.get_text("/metrics")
