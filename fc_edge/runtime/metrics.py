"""Prometheus metrics of an edge server (``fc-edge serve --metrics-port``), with
``prometheus_client``: the well-kept client library Prometheus itself maintains (text format,
HTTP exporter, thread-safe counters and histograms).

Each :class:`~fc_edge.runtime.server.EdgeService` has its own registry (several servers may share
a process: the tests, the demo). Levels (sessions, streams, queued steps, KV blocks, engine
liveness) and the engine's own totals (tokens, preemptions, iterations) are read from the
service when Prometheus scrapes; the rest is counted as it happens. Names and meanings:
docs/deploy.md, "Metrics".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

#: Reasons a stream or a session is refused (the ``reason`` label of ``fc_edge_refusals_total``).
REFUSAL_REASONS = (
    "max_streams", "max_streams_per_peer", "max_sessions", "max_sessions_per_peer", "draining",
    "unauthenticated", "mismatch", "bad_open", "too_long",
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """The metrics of one service (see the module doc); :meth:`serve` exports them over HTTP."""

    def __init__(self, service: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.refusals = Counter("fc_edge_refusals", "Streams or sessions refused, by reason",
                                ["reason"], registry=r)
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)  # every reason is exported from the start, at 0
        self.session_errors = Counter(
            "fc_edge_session_errors", "Sessions the server ended with an error status, by gRPC "
            "status code", ["code"], registry=r)
        self.received_bytes = Counter(
            "fc_edge_received_bytes", "Activation payload bytes received, by the payload's codec",
            ["codec"], registry=r)
        self.decode_batch = Histogram(
            "fc_edge_decode_batch_rows", "Decode rows (sessions) per engine iteration",
            buckets=BATCH_BUCKETS, registry=r)
        self.iteration_seconds = Histogram(
            "fc_edge_engine_iteration_seconds", "Seconds of one engine iteration (packed forward "
            "+ sampling)", buckets=SECONDS_BUCKETS, registry=r)
        self.step_seconds = Histogram(
            "fc_edge_step_seconds", "Seconds from an activation frame's arrival to its token, by "
            "phase (prefill: several rows; decode: one)", ["phase"], buckets=SECONDS_BUCKETS,
            registry=r)
        r.register(_Levels(service))
        self._http: Any = None

    def on_iteration(self, decode_rows: int, prefill_rows: int, seconds: float) -> None:
        """The engine's iteration callback."""
        if decode_rows:
            self.decode_batch.observe(decode_rows)
        self.iteration_seconds.observe(seconds)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Export on ``http://host:port/metrics`` (a thread); returns the port (0: a free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _Levels:
    """What the service and its engine report at scrape time."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def describe(self) -> list:
        return []  # names are known only from collect(); keep registration cheap

    def collect(self) -> Iterator[Any]:
        s = self.service
        stats = s.engine.stats()
        gauges = (
            ("fc_edge_sessions", "Open sessions", s.open_sessions()),
            ("fc_edge_streams", "Open streams (Generate, with or without a session, and health "
             "Watch)", s.open_streams()),
            ("fc_edge_queued_steps", "Steps waiting for the engine", stats.queued_steps),
            ("fc_edge_kv_blocks_used", "KV cache blocks held by sessions",
             stats.total_blocks - stats.free_blocks),
            ("fc_edge_kv_blocks_total", "KV cache blocks in all", stats.total_blocks),
            ("fc_edge_kv_block_positions", "Positions per KV block", s.engine.cache.block_size),
            ("fc_edge_max_sessions", "Sessions the server admits at most", s.max_sessions),
            ("fc_edge_engine_alive", "1 while the engine loop runs", int(stats.alive)),
            ("fc_edge_draining", "1 while the server drains", int(s.draining)),
        )
        for name, text, value in gauges:
            yield GaugeMetricFamily(name, text, value=value)
        counters = (
            ("fc_edge_tokens", "Tokens sampled", stats.tokens),
            ("fc_edge_preemptions", "Sessions whose KV blocks were taken for others (recomputed "
             "later)", stats.preemptions),
            ("fc_edge_engine_iterations", "Engine iterations", stats.iterations),
        )
        for name, text, value in counters:
            yield CounterMetricFamily(name, text, value=value)
