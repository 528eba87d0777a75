"""Prometheus metrics, served at ``GET /metrics``.

The hot path only adds to plain integers on :class:`Stats` (a prometheus-client
counter takes a lock per increment); a custom collector turns them into metric
families when Prometheus scrapes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from relay.protocol import CloseCode, MsgType

KNOWN_CLOSES = frozenset(range(1000, 1016)) | frozenset(int(c) for c in CloseCode)

if TYPE_CHECKING:
    from relay.room import Entry

_TYPE_NAMES = {
    MsgType.EVENT: "EVENT",
    MsgType.STATE: "STATE",
    MsgType.DIRECT: "DIRECT",
    MsgType.JOIN: "JOIN",
    MsgType.LEAVE: "LEAVE",
}


class Stats:
    def __init__(self) -> None:
        self.connections_total = 0
        self.messages_in: Counter[str] = Counter()
        self.messages_out: Counter[int] = Counter()
        self.frames_in = 0
        self.bytes_in = 0
        self.frames_out = 0
        self.bytes_out = 0
        self.errors: Counter[str] = Counter()
        self.closes: Counter[int] = Counter()
        self.dropped = 0
        self.coalesced = 0
        self.slow_consumer_closes = 0
        self.resumes: Counter[str] = Counter()  # seats taken back, by where they were held
        self.rules_failures: Counter[str] = Counter()  # game rules that raised or misbehaved, by hook

    def count_out(self, entries: list[Entry], recipients: int) -> None:
        """Count one batch delivered to ``recipients`` seats (own moves included, roughly)."""
        out = self.messages_out
        for entry in entries:
            out[entry.kind] += recipients


class BackplaneStats:
    """The Redis backplane's counters: round trips, batches, errors (plain integers)."""

    # Upper bounds (seconds) of the round-trip histogram's buckets.
    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

    def __init__(self) -> None:
        self.round_trips = 0
        self.round_trip_seconds = 0.0
        self.round_trip_buckets = [0] * (len(self.BUCKETS) + 1)
        self.operations = 0  # script calls and commands sent, all rooms
        self.batches = 0  # batches of moves sequenced (one script call each)
        self.entries = 0  # moves in those batches
        self.errors: Counter[str] = Counter()
        self.resyncs = 0  # rooms whose local seats were closed to start again
        self.repairs = 0  # rooms checked against Redis after a cut or a gap
        self.replayed = 0  # entries a node missed and then delivered from a room's history
        self.connects = 0
        self.reaped = 0  # players of dead nodes removed

    def round_trip(self, seconds: float, operations: int) -> None:
        self.round_trips += 1
        self.round_trip_seconds += seconds
        self.operations += operations
        i = 0
        for bound in self.BUCKETS:
            if seconds <= bound:
                break
            i += 1
        self.round_trip_buckets[i] += 1

    def collect(self) -> Iterator[Metric]:
        buckets, total = [], 0
        for bound, n in zip((*map(str, self.BUCKETS), "+Inf"), self.round_trip_buckets):
            total += n
            buckets.append((bound, total))
        yield HistogramMetricFamily(
            "relay_backplane_round_trip_seconds",
            "time of one pipelined round trip to Redis (many rooms' batches)",
            buckets=buckets,
            sum_value=self.round_trip_seconds,
        )
        yield _counter("relay_backplane_operations", "room operations sent to Redis", self.operations)
        yield _counter("relay_backplane_batches", "batches of moves sequenced in Redis", self.batches)
        yield _counter("relay_backplane_batched_moves", "moves in those batches", self.entries)
        yield _by_label("relay_backplane_errors", "backplane errors, by kind", "kind", self.errors)
        yield _counter("relay_backplane_resyncs", "rooms resynchronised (local seats closed)", self.resyncs)
        yield _counter("relay_backplane_repairs", "rooms checked against Redis after a cut", self.repairs)
        yield _counter("relay_backplane_replayed", "missed entries delivered from history", self.replayed)
        yield _counter("relay_backplane_connects", "(re)connections to Redis", self.connects)
        yield _counter("relay_backplane_reaped", "players of dead nodes removed", self.reaped)


class RelayCollector:
    """Reads :class:`Stats` and live gauges at scrape time."""

    def __init__(
        self, stats: Stats, gauges: Callable[[], dict[str, float]], backplane: BackplaneStats | None = None
    ) -> None:
        self.stats = stats
        self.gauges = gauges
        self.backplane = backplane

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        yield _counter("relay_connections", "WebSocket connections accepted", s.connections_total)
        yield _by_label("relay_messages_in", "messages received, by type", "type", s.messages_in)
        out = {_TYPE_NAMES.get(MsgType(kind), str(kind)): n for kind, n in s.messages_out.items()}
        yield _by_label("relay_messages_out", "messages queued to clients", "type", out)
        yield _counter("relay_frames_in", "binary frames received", s.frames_in)
        yield _counter("relay_bytes_in", "bytes received in binary frames", s.bytes_in)
        yield _counter("relay_frames_out", "frames sent", s.frames_out)
        yield _counter("relay_bytes_out", "bytes sent in frames", s.bytes_out)
        yield _by_label("relay_errors", "ERROR messages sent, by code", "code", s.errors)
        closes: Counter[str] = Counter()
        for code, n in s.closes.items():  # a client picks its own close code: no label per code it makes up
            closes[str(int(code)) if int(code) in KNOWN_CLOSES else "other"] += n
        yield _by_label("relay_closes", "connections closed, by close code", "code", closes)
        yield _counter(
            "relay_dropped_events",
            "EVENTs and DIRECTs dropped for slow readers, and DIRECTs past max_held_directs for held seats",
            s.dropped,
        )
        yield _counter("relay_coalesced_states", "STATEs replaced by newer ones", s.coalesced)
        yield _counter(
            "relay_slow_consumer_closes", "connections closed with 4008", s.slow_consumer_closes
        )
        yield _by_label("relay_resumes", "seats resumed, by the node that held them", "held_by", s.resumes)
        yield _by_label(
            "relay_rules_failures",
            "game rules that raised, returned a bad verdict, or took over 5 ms in validate (slow_validate), by hook",
            "hook",
            s.rules_failures,
        )
        for name, value in self.gauges().items():
            yield GaugeMetricFamily(f"relay_{name}", name.replace("_", " "), value=value)
        if self.backplane is not None:
            yield from self.backplane.collect()


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _by_label(name: str, doc: str, label: str, counts: Mapping[str, float]) -> CounterMetricFamily:
    """One counter per label value, in a stable order."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, n in sorted(counts.items()):
        family.add_metric([value], n)
    return family


def registry(
    stats: Stats, gauges: Callable[[], dict[str, float]], backplane: BackplaneStats | None = None
) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RelayCollector(stats, gauges, backplane))  # type: ignore[arg-type]
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
