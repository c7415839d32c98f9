"""Prometheus metrics of the admission server.

Each application gets its own ``CollectorRegistry`` so several servers (tests, benchmarks)
can live in one process without "duplicated timeseries" errors from the global registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Admission latency sits far below the API server's timeoutSeconds (<= 5 s); buckets are
# dense under 50 ms where regressions show first.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Metrics:
    """The server's metrics, registered in a private registry."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.admissions = Counter(
            "modelcache_webhook_admissions",
            "AdmissionReviews answered, by decision.",
            ["decision"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "modelcache_webhook_admission_duration_seconds",
            "Time from receiving a /mutate body to having the response ready.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "modelcache_webhook_errors",
            "Failures by stage: read (body), parse (envelope), admit (pipeline), "
            "respond (encoding), tls_reload (cert files), internal (a bug).",
            ["stage"],
            registry=self.registry,
        )
        self.cert_reloads = Counter(
            "modelcache_webhook_cert_reloads",
            "Serving certificate reload attempts, by result.",
            ["result"],
            registry=self.registry,
        )

        self.connections = Gauge(
            "modelcache_webhook_open_connections",
            "Client connections accepted and not yet closed (including TLS handshakes).",
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "modelcache_webhook_connections_closed",
            "Connections the server closed, by reason: header_timeout, body_timeout, "
            "idle_timeout, handshake (failed or too slow).",
            ["reason"],
            registry=self.registry,
        )
        self.client_disconnects = Counter(
            "modelcache_webhook_client_disconnects",
            "Requests whose client hung up before the answer (not an error of the server).",
            registry=self.registry,
        )
        self.rejected = Counter(
            "modelcache_webhook_rejected_requests",
            "Requests answered 503 because the server was at a bound, by bound: in_flight "
            "(maxRequestsInFlight), large (large bodies waiting for a worker).",
            ["bound"],
            registry=self.registry,
        )
        self.events = Counter(
            "modelcache_webhook_events",
            "Kubernetes Events about decisions, by result: sent, failed (API error), dropped "
            "(queue full), skipped (nothing to attach it to).",
            ["result"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The text exposition format of every metric in this registry."""
        return generate_latest(self.registry)
