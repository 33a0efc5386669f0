"""Prometheus metrics of one daemon (its own registry, so two daemons in a test never mix).

Names follow Prometheus conventions: base units in the name (``_bytes``, ``_seconds``),
counters end in ``_total``, rates are gauges of bytes per second. Every metric is described
in docs/operations.md (a test compares that table with what ``/metrics`` exposes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

disable_created_metrics()  # no *_created series: nothing here reads them

# Link figures exported per peer: (metric name, figures_json key, help)
LINK_GAUGES = (
    ("kvship_link_rate_limit_bytes_per_second", "rate_limit_Bps", "The link's cap (absent: none)"),
    ("kvship_link_wire_bytes_per_second", "wire_Bps", "Achieved wire rate over the last second"),
    ("kvship_link_payload_bytes_per_second", "payload_Bps", "Achieved KV payload rate"),
    ("kvship_link_compression_ratio", "compression_ratio", "Payload bytes per wire byte"),
    ("kvship_link_queued_bytes", "queued_bytes", "Staged chunk bytes waiting for the link"),
    ("kvship_link_queue_wait_seconds", "queue_wait_s", "How long chunks wait for a stripe"),
    ("kvship_link_rtt_seconds", "rtt_s", "Link RTT: the kernel's (TCP_INFO) if known, else PING"),
    ("kvship_link_ping_rtt_seconds", "ping_rtt_s", "PING/PONG round trip through the daemons"),
    ("kvship_link_tcp_rtt_seconds", "tcp_rtt_s", "Kernel's smoothed RTT (TCP_INFO, worst stripe)"),
    ("kvship_link_connections", "connections", "Open connections of the link"),
)
LINK_COUNTERS = (
    ("kvship_link_tcp_retransmits", "tcp_retransmits", "Retransmitted TCP segments (TCP_INFO)"),
)

STORE_GAUGES = (
    ("kvship_store_capacity_bytes", "capacity", "The block stores' byte bound (store_bytes)"),
    ("kvship_store_bytes", "bytes", "KV bytes held by the dedup block stores"),
    ("kvship_store_blocks", "blocks", "KV blocks held by the dedup block stores"),
    ("kvship_store_states", "states", "Linear-attention states held"),
    ("kvship_store_pinned_bytes", "pinned_bytes", "Store bytes pinned by transfers"),
    ("kvship_store_models", "models", "Model namespaces with a block store"),
)
STORE_COUNTERS = (
    ("kvship_store_hits", "hits", "Blocks and states served from the store"),
    ("kvship_store_misses", "misses", "Store look-ups that found nothing"),
    ("kvship_store_evictions", "evictions", "Entries evicted (least recently used)"),
    ("kvship_store_refused", "refused", "Puts refused: the bound was full of pinned entries"),
)

# Buckets: transfers take ms (loopback) to minutes (GiBs over a capped WAN link).
TRANSFER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SHORT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class StoreCollector(Collector):
    """The block stores' figures, read at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        figures = self.stats()
        for name, key, help_text in STORE_GAUGES:
            yield GaugeMetricFamily(name, help_text, value=float(figures.get(key, 0)))
        for name, key, help_text in STORE_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=float(figures.get(key, 0)))


class LinkCollector(Collector):
    """Reads the links' live figures at scrape time: nothing is updated per chunk for it."""

    def __init__(self, links: Callable[[], list[dict[str, Any]]]) -> None:
        self.links = links

    def collect(self) -> Iterator[Metric]:
        figures = self.links()
        families: list[GaugeMetricFamily | CounterMetricFamily] = []
        keys: list[str] = []
        for name, key, help_text in LINK_GAUGES:
            families.append(GaugeMetricFamily(name, help_text, labels=["peer"]))
            keys.append(key)
        for name, key, help_text in LINK_COUNTERS:
            families.append(CounterMetricFamily(name, help_text, labels=["peer"]))
            keys.append(key)
        for family, key in zip(families, keys, strict=True):
            for link in figures:
                if link.get(key) is not None:
                    family.add_metric([str(link["peer"])], float(link[key]))
            yield family


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.bytes_sent = Counter(
            "kvship_payload_sent_bytes", "KV bytes sent to peer daemons", ["peer"], registry=r
        )
        self.wire_bytes_sent = Counter(
            "kvship_wire_sent_bytes",
            "Bytes put on peer connections for chunks (frame headers included)",
            ["peer"],
            registry=r,
        )
        self.bytes_received = Counter(
            "kvship_payload_received_bytes", "KV bytes received from peer daemons", registry=r
        )
        self.chunks_sent = Counter("kvship_chunks_sent", "Chunks sent to peers", registry=r)
        self.chunks_received = Counter(
            "kvship_chunks_received", "Chunks received and verified", registry=r
        )
        self.transfers = Counter(
            "kvship_transfers",
            "Finished transfers by direction and outcome (complete, failed)",
            ["direction", "outcome"],
            registry=r,
        )
        self.chunks_staged = Counter(
            "kvship_chunks_staged",
            "Received chunks that had to wait in daemon memory (no engine arena room yet)",
            registry=r,
        )
        self.chunks_corrupt = Counter(
            "kvship_chunks_corrupt",
            "Chunks from peers whose bytes did not match their checksum (raw or decoded): "
            "each failed its transfer, the connection stayed",
            registry=r,
        )
        self.protocol_errors = Counter(
            "kvship_protocol_errors",
            "Connections closed because the other side broke the protocol, by error code",
            ["code"],
            registry=r,
        )
        self.transfers_resumed = Counter(
            "kvship_transfers_resumed",
            "Transfers re-opened on new connections after theirs were lost (SPEC §7.7)",
            registry=r,
        )
        self.chunks_resent = Counter(
            "kvship_chunks_resent",
            "Chunks sent again on a resumed transfer (lost with their connection, unacked)",
            registry=r,
        )
        self.chunks_duplicate = Counter(
            "kvship_chunks_duplicate",
            "Chunks received again though already held (a resumed sender's second copy): "
            "dropped, acknowledged",
            registry=r,
        )
        self.transfers_held = Counter(
            "kvship_transfers_held",
            "Outgoing transfers paused by their receiver's HOLD (its staging full of them, no "
            "engine claimed them there yet; the link's other transfers go on)",
            registry=r,
        )
        self.holds_sent = Counter(
            "kvship_holds_sent",
            "HOLDs sent to senders: an unclaimed transfer paused so that a claimed one's "
            "connections keep their credit while staging is full",
            registry=r,
        )
        self.receive_stalls = Counter(
            "kvship_receive_stalls",
            "Incoming transfers that moved nothing for stall_report_s while this daemon "
            "withheld credit (staging full): each is logged with what it holds",
            registry=r,
        )
        self.control_refused = Counter(
            "kvship_control_refused",
            "Control-plane changes refused: not from loopback and without the bearer token",
            registry=r,
        )
        self.in_flight = Gauge(
            "kvship_transfers_in_flight", "Transfers in progress", ["direction"], registry=r
        )
        self.staged_bytes = Gauge(
            "kvship_staged_bytes", "Received KV bytes held in daemon memory", registry=r
        )
        self.unacked_copied_bytes = Counter(
            "kvship_unacked_copied_bytes",
            "Sent chunk bytes copied out of the engine's memory to wait for the receiver's "
            "ACK (the engine's arena holds less than the link's bandwidth x RTT)",
            registry=r,
        )
        self.warmup_bytes = Counter(
            "kvship_warmup_bytes",
            "PAD bytes sent on new peer connections to open their congestion windows",
            registry=r,
        )
        self.window_growth = Gauge(
            "kvship_receive_window_growth_bytes",
            "How far the receive windows of all peer connections grew past window_bytes",
            registry=r,
        )
        self.connections = Gauge(
            "kvship_connections", "Open connections by kind", ["kind"], registry=r
        )
        self.loop_lag = Histogram(
            "kvship_event_loop_lag_seconds",
            "How late the daemon's event loop ran a 10 ms timer (blocking work shows here)",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.transfer_seconds = Histogram(
            "kvship_transfer_duration_seconds",
            "Open to end of a transfer (out: to the peer's COMPLETE; in: to the engine's "
            "delivery), by direction and outcome",
            ["direction", "outcome"],
            buckets=TRANSFER_BUCKETS,
            registry=r,
        )
        self.first_layer_seconds = Histogram(
            "kvship_first_layer_seconds",
            "Decode side: a transfer's OPEN arriving to its first layer handed to the engine",
            buckets=TRANSFER_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "kvship_chunk_queue_wait_seconds",
            "How long a chunk waited for its stripe on the sending daemon (rate limit included)",
            buckets=SHORT_BUCKETS,
            registry=r,
        )
        self.codec_seconds = Histogram(
            "kvship_codec_seconds",
            "Time a codec worker took for one chunk, by operation (encode, decode)",
            ["op"],
            buckets=SHORT_BUCKETS,
            registry=r,
        )
        self.have_rtt_seconds = Histogram(
            "kvship_dedup_have_rtt_seconds",
            "Prefix dedup: OPEN with a manifest sent to the peer's HAVE answer",
            buckets=SHORT_BUCKETS,
            registry=r,
        )

    def watch_links(self, links: Callable[[], list[dict[str, Any]]]) -> None:
        self.registry.register(LinkCollector(links))

    def watch_store(self, stats: Callable[[], dict[str, int]]) -> None:
        self.registry.register(StoreCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
