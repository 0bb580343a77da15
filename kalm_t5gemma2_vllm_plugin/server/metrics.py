# SPDX-License-Identifier: Apache-2.0
"""Prometheus metrics of the service (its own registry, served at ``/metrics``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ServiceMetrics"]

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


class _EngineCollector(Collector):
    """Reads the engine counters (see ``counters.py``) at scrape time."""

    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._read()
        if not stats:
            return
        reused = max(
            0,
            stats["requests_scored"]
            - stats["passages_encoded"]
            - stats["passages_from_store"],
        )
        for name, value, doc in (
            (
                "kalm_passages_encoded",
                stats["passages_encoded"],
                "Passages run through the encoder.",
            ),
            (
                "kalm_passage_tokens_encoded",
                stats["passage_tokens_encoded"],
                "Encoder tokens of those passages.",
            ),
            (
                "kalm_passages_reused",
                reused,
                "Scored requests whose passage came from a cache (vLLM's encoder "
                "cache or the plugin's passage cache).",
            ),
            (
                "kalm_passages_from_store",
                stats["passages_from_store"],
                "Scored requests whose passage came precomputed from a passage store.",
            ),
            (
                "kalm_requests_scored",
                stats["requests_scored"],
                "Requests run through the decoder.",
            ),
            (
                "kalm_passage_cache_hits",
                stats["passage_cache_hits"],
                "Passages the plugin's passage cache served (no encoder work).",
            ),
            (
                "kalm_passage_cache_misses",
                stats["passage_cache_misses"],
                "Passage cache lookups that found nothing (then encoded).",
            ),
            (
                "kalm_passage_cache_evictions",
                stats["passage_cache_evictions"],
                "Passages dropped from the passage cache to stay within its size.",
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "kalm_passage_cache_bytes",
            "Bytes of pooled states the plugin's passage cache holds now.",
            value=stats["passage_cache_bytes"],
        )


class ServiceMetrics:
    def __init__(self, read_engine_counters: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kalm_http_requests",
            "HTTP requests by route and status code.",
            ["route", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kalm_http_request_duration_seconds",
            "Request latency by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.pairs = Counter(
            "kalm_pairs_scored",
            "(query, document) pairs scored.",
            registry=self.registry,
        )
        self.truncated = Counter(
            "kalm_documents_truncated",
            "Documents cut to the document length limit.",
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(read_engine_counters))

    def observe(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route=route, code=str(code)).inc()
        self.latency.labels(route=route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
