"""Prometheus metrics of one daemon (its own registry, so two daemons in a test never mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.bytes_sent = Counter(
            "kvship_payload_bytes_sent", "KV bytes sent to peer daemons", ["peer"], registry=r
        )
        self.wire_bytes_sent = Counter(
            "kvship_wire_bytes_sent",
            "Bytes put on peer connections for chunks (headers included)",
            ["peer"],
            registry=r,
        )
        self.bytes_received = Counter(
            "kvship_payload_bytes_received", "KV bytes received from peer daemons", registry=r
        )
        self.chunks_sent = Counter("kvship_chunks_sent", "Chunks sent to peers", registry=r)
        self.chunks_received = Counter(
            "kvship_chunks_received", "Chunks received and verified", registry=r
        )
        self.transfers = Counter(
            "kvship_transfers",
            "Transfers by direction and outcome",
            ["direction", "outcome"],
            registry=r,
        )
        self.chunks_staged = Counter(
            "kvship_chunks_staged",
            "Received chunks that had to wait in daemon memory (no engine arena room yet)",
            registry=r,
        )
        self.protocol_errors = Counter(
            "kvship_protocol_errors",
            "Connections closed because the other side broke the protocol, by error code",
            ["code"],
            registry=r,
        )
        self.in_flight = Gauge(
            "kvship_transfers_in_flight", "Transfers in progress", ["direction"], registry=r
        )
        self.staged_bytes = Gauge(
            "kvship_staged_bytes", "Received KV bytes held in daemon memory", registry=r
        )
        self.connections = Gauge(
            "kvship_connections", "Open connections by kind", ["kind"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
